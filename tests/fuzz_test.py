"""Property-based tests of every reader, through the config-driven `load`: random bytes, odd
encodings, separators, empty and huge lines, negative and overflowing ids, NaN ratings. Every
outcome is a dataset that passes its invariants or a `DataError` naming the file, never another
exception or a hang."""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdrec_jax import data
from kdrec_jax.data import DataError

FUZZ = settings(max_examples=40, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_IDS = st.one_of(st.integers(-5, 40), st.integers(-2**70, 2**70), st.sampled_from(
    ["u1", "é", "", " ", "1.5", "nan", "inf", "0x10", "𝔘"]))
_NUMS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10),
                  st.sampled_from(["", "NaN", "five", "1e400", "-0"]))


def _line(sep: str, n_fields: int):
  fields = st.lists(st.one_of(_IDS.map(str), _NUMS.map(str)), min_size=0, max_size=n_fields + 2)
  return fields.map(lambda xs: sep.join(xs))


def _valid_line(sep: str, n_fields: int):
  """A well-formed record: small non-negative ids, a rating in 1..5, a timestamp."""
  if n_fields == 0:  # citeulike: a count, then that many item ids
    return st.lists(st.integers(0, 30), min_size=1, max_size=8).map(
        lambda xs: " ".join(map(str, [len(xs), *xs])))
  return st.tuples(st.integers(0, 20), st.integers(0, 30), st.integers(1, 5),
                   st.integers(0, 10**9)).map(lambda t: sep.join(map(str, t[:n_fields])))


def _text(sep: str, n_fields: int, header: str = ""):
  """Mostly well-formed lines, with empty, huge, malformed and random ones mixed in."""
  valid = _valid_line(sep, n_fields)
  odd = st.one_of(_line(sep, max(n_fields, 6)), st.just(""), st.just("x" * 5000),
                  st.just("\t \t"))
  lines = st.lists(st.one_of(*[valid] * 12, odd), min_size=0, max_size=16)
  return lines.map(lambda ls: (header + "\n" if header else "") + "\n".join(ls))


def _contents(text_strategy):
  """Text in a random encoding (mostly utf-8), or raw random bytes."""
  encoded = st.tuples(text_strategy, st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"])).map(
      lambda t: t[0].encode(t[1], errors="replace"))
  return st.one_of(encoded, encoded, encoded, st.binary(max_size=2000))


def _check(cfg: dict, content: bytes, suffix: str = ".txt"):
  fd, path = tempfile.mkstemp(suffix=suffix)
  with os.fdopen(fd, "wb") as f:
    f.write(content)
  try:
    cfg = dict(cfg, path=path, min_user_interactions=0, split="ratio", val_ratio=0.1,
               test_ratio=0.2)
    try:
      inter = data.load(cfg)
    except DataError as e:
      assert path in str(e), str(e)
      return
    inter.validate()
    assert inter.num_users > 0 and inter.num_items > 0 and inter.num_train > 0
    for split in ("train", "val", "test"):
      indptr, indices = inter.split(split)
      assert np.all(np.diff(indptr) >= 0)
      assert len(indices) == 0 or (indices.min() >= 0 and indices.max() < inter.num_items)
  finally:
    os.remove(path)


@pytest.mark.slow
@FUZZ
@given(_contents(_text(" ", 0)))
def test_citeulike_reader(content):
  _check(dict(format="citeulike"), content, ".dat")


@FUZZ
@given(st.sampled_from([",", "\t", "::", ";"]).flatmap(
    lambda sep: st.tuples(st.just(sep), _contents(_text(sep, 4)))))
def test_delimited_reader(sep_content):
  sep, content = sep_content
  _check(dict(format="delimited", sep=sep, columns="user,item,rating,timestamp",
              min_rating=3.0), content)


@FUZZ
@given(_contents(_text("\t", 4, header="user_id:token\titem_id:token\trating:float\t"
                                       "timestamp:float")))
def test_recbole_reader(content):
  _check(dict(format="recbole"), content, ".inter")


@FUZZ
@given(_contents(st.lists(st.one_of(
    st.fixed_dictionaries({"user_id": _IDS, "business_id": _IDS, "stars": _NUMS}).map(
        lambda d: __import__("json").dumps({k: (v if not isinstance(v, float) or math.isfinite(v)
                                                else str(v)) for k, v in d.items()})),
    st.just("{"), st.just(""), st.just("[1, 2]")), max_size=20).map("\n".join)))
def test_json_lines_reader(content):
  _check(dict(format="jsonl", json_fields="user=user_id,item=business_id,rating=stars"), content,
         ".json")


@FUZZ
@given(_contents(_text(" ", 2)), _contents(_text(" ", 2)), _contents(_text(" ", 2)))  # user item
def test_splits_reader(train, val, test):
  paths = []
  try:
    for content in (train, val, test):
      fd, path = tempfile.mkstemp(suffix=".txt")
      with os.fdopen(fd, "wb") as f:
        f.write(content)
      paths.append(path)
    try:
      inter = data.load(dict(format="splits", train=paths[0], val=paths[1], test=paths[2]))
    except DataError as e:
      assert any(p in str(e) for p in paths), str(e)
      return
    inter.validate()
  finally:
    for p in paths:
      os.remove(p)


def test_fuzz_strategies_produce_both_outcomes(tmp_path):
  """The generators reach valid datasets too, not only errors (a sanity check of the fuzzing)."""
  good = tmp_path / "ok.csv"
  good.write_text("1,2,5,10\n1,3,4,11\n2,2,3,12\n2,4,5,13\n3,1,5,14\n3,2,4,15\n")
  _check(dict(format="delimited", sep=",", columns="user,item,rating,timestamp"),
         good.read_bytes())
  with pytest.raises(DataError):
    data.load(dict(format="delimited", path=str(tmp_path / "missing.csv")))
