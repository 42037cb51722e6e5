"""Tests for kdrec_jax.data: readers, preprocessing, load() and the shipped CiteULike-t."""
from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import urllib.request

import numpy as np
import pytest

from conftest import raises_data_error_at as _raises_at

from kdrec_jax import data
from kdrec_jax.data import DataError


def _write(tmp_path: pathlib.Path, name: str, text: str) -> str:
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _rows(inter: data.Interactions, split: str) -> list[list[int]]:
  indptr, indices = inter.split(split)
  return [indices[indptr[u]:indptr[u + 1]].tolist() for u in range(inter.num_users)]


def _records(users, items, timestamps=None, source="mem") -> data.Records:
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  return data.Records(
      source=source, users=users, items=items, order=np.arange(len(users), dtype=np.int64),
      num_users=int(users.max()) + 1, num_items=int(items.max()) + 1,
      timestamps=None if timestamps is None else np.asarray(timestamps, np.float64))


# ----------------------------------------------------------------------------- citeulike reader


def test_read_citeulike_keeps_file_order_and_empty_users(tmp_path):
  path = _write(tmp_path, "users.dat", "3 5 1 9\n0\n2 4 4\n")
  rec = data.read_citeulike(path)
  assert rec.users.tolist() == [0, 0, 0, 2, 2]
  assert rec.items.tolist() == [5, 1, 9, 4, 4]
  assert rec.order.tolist() == [0, 1, 2, 3, 4]
  assert (rec.num_users, rec.num_items) == (3, 10)
  assert rec.timestamps is None


def test_read_citeulike_gzip(tmp_path):
  path = tmp_path / "users.dat.gz"
  path.write_bytes(gzip.compress(b"2 0 1\n1 3"))
  rec = data.read_citeulike(path)
  assert rec.users.tolist() == [0, 0, 1] and rec.items.tolist() == [0, 1, 3]


@pytest.mark.parametrize("text,line,fragment", [
    ("2 1 2\n\n1 3\n", 2, "empty line"),
    ("2 1 2\n1 x\n", 2, "'x' is not an integer"),
    ("2 1 2\n1 3\n1.5 3\n", 3, "is not an integer"),
    ("2 1 -4\n", 1, "negative id -4"),
    ("-1\n", 1, "count: negative count -1"),
    ("1 1_0\n", 1, "item 1: '1_0' is not an integer"),
    ("1 3\n2 1 2\n3 1 2\n", 3, "count 3 does not match 2 item ids"),
    ("1 3\n0 7\n", 2, "count 0 does not match 1 item ids"),
])
def test_read_citeulike_bad_input(tmp_path, text, line, fragment):
  path = _write(tmp_path, "users.dat", text)
  _raises_at(lambda: data.read_citeulike(path), "users.dat", line, fragment)


def test_read_citeulike_corrupt_gzip(tmp_path):
  path = tmp_path / "users.dat.gz"
  path.write_bytes(gzip.compress(b"2 0 1\n1 3\n")[:-12])
  _raises_at(lambda: data.read_citeulike(path), "users.dat.gz", None, "cannot read file")


def test_read_citeulike_empty_and_missing_file(tmp_path):
  path = _write(tmp_path, "users.dat", "")
  _raises_at(lambda: data.read_citeulike(path), "users.dat", None, "empty file")
  missing = str(tmp_path / "nope.dat")
  _raises_at(lambda: data.read_citeulike(missing), "nope.dat", None, "does not exist")


# ----------------------------------------------------------------------------- delimited reader


def test_read_delimited_movielens_style(tmp_path):
  path = _write(tmp_path, "ratings.dat",
                "u7::i3::5::100\nu2::i3::3::90\nu7::i1::4::80\n\nu2::i9::1::70\n")
  rec = data.read_delimited(path, sep="::", columns="user,item,rating,timestamp")
  assert rec.users.tolist() == [0, 1, 0, 1]
  assert rec.items.tolist() == [0, 0, 1, 2]
  assert rec.user_labels.tolist() == ["u7", "u2"]
  assert rec.item_labels.tolist() == ["i3", "i1", "i9"]
  assert rec.ratings.tolist() == [5.0, 3.0, 4.0, 1.0]
  assert rec.timestamps.tolist() == [100.0, 90.0, 80.0, 70.0]
  assert rec.order.tolist() == [1, 2, 3, 5]  # line numbers, blank line skipped
  kept = data.read_delimited(path, sep="::", columns="user,item,rating,timestamp",
                             min_rating=4)
  assert kept.ratings.tolist() == [5.0, 4.0]
  assert kept.user_labels.tolist() == ["u7"] and kept.item_labels.tolist() == ["i3", "i1"]


def test_read_delimited_separators_header_and_skipped_columns(tmp_path):
  csv = _write(tmp_path, "r.csv", "ts,item,junk,user\n1.5, a ,x,b\n2e3,c,y,b\n")
  rec = data.read_delimited(csv, sep=",", columns=["timestamp", "item", "_", "user"],
                            header=True)
  assert rec.users.tolist() == [0, 0] and rec.items.tolist() == [0, 1]
  assert rec.item_labels.tolist() == ["a", "c"] and rec.timestamps.tolist() == [1.5, 2000.0]
  assert rec.ratings is None
  tsv = _write(tmp_path, "r.tsv", "1\t2\n3\t2\n")
  rec = data.read_delimited(tsv, sep="\t")
  assert rec.users.tolist() == [0, 1] and rec.items.tolist() == [0, 0]
  ws = _write(tmp_path, "r.txt", "1   2  \n  3 2\n")
  assert data.read_delimited(ws).users.tolist() == [0, 1]


@pytest.mark.parametrize("text,kwargs,line,fragment", [
    ("1,2,3\n1,2\n", dict(columns="user,item,rating"), 2, "expected 3 fields"),
    ("1,2\n1,2,3,4\n", dict(columns="user,item"), 2, "got 4"),
    ("1,2,5\n1,3,five\n", dict(columns="user,item,rating"), 2, "'five' is not a number"),
    ("1,2,5\n1,3,yesterday\n", dict(columns="user,item,timestamp"), 2,
     "field 3 (timestamp): 'yesterday' is not a number"),
    ("h,h\n1,2\n,3\n", dict(header=True), 3, "empty user id"),
])
def test_read_delimited_bad_input(tmp_path, text, kwargs, line, fragment):
  path = _write(tmp_path, "inter.csv", text)
  _raises_at(lambda: data.read_delimited(path, sep=",", **kwargs), "inter.csv", line, fragment)


def test_read_delimited_empty_and_missing(tmp_path):
  empty = _write(tmp_path, "empty.csv", "\n\n")
  _raises_at(lambda: data.read_delimited(empty, sep=","), "empty.csv", None, "empty file")
  header_only = _write(tmp_path, "head.csv", "user,item\n")
  _raises_at(lambda: data.read_delimited(header_only, sep=",", header=True), "head.csv", None,
             "empty file")
  _raises_at(lambda: data.read_delimited(tmp_path / "gone.csv"), "gone.csv", None,
             "does not exist")
  _raises_at(lambda: data.read_delimited(empty, columns="user,item", min_rating=3),
             "empty.csv", None, "needs a 'rating' column")
  with pytest.raises(ValueError, match="unknown column"):
    data.read_delimited(empty, columns="user,item,stars")
  with pytest.raises(ValueError, match="must include"):
    data.read_delimited(empty, columns="user,rating")


# ----------------------------------------------------------------------------- splits reader


def test_read_splits(tmp_path):
  train = _write(tmp_path, "train.txt", "0 1\n0 3 5.0 99\n2 0\n0 1\n")
  val = _write(tmp_path, "val.txt", "0,4\n2,2,extra\n")
  test = _write(tmp_path, "test.txt", "1 7\n")
  inter = data.read_splits(train, val, test)
  assert (inter.num_users, inter.num_items) == (3, 8)
  assert _rows(inter, "train") == [[1, 3], [], [0]]
  assert _rows(inter, "val") == [[4], [], [2]]
  assert _rows(inter, "test") == [[], [7], []]
  cfg = data.default_data_config()
  cfg.format, cfg.train, cfg.val, cfg.test = "splits", train, val, test
  assert _rows(data.load(cfg), "train") == [[1, 3], [], [0]]


@pytest.mark.parametrize("text,line,fragment", [
    ("0 1\n0 -3\n", 2, "negative id -3"),
    ("0 1\nu1 3\n", 2, "'u1' is not an integer"),
    ("0 1\n1 2\n7\n", 3, "expected 'user item'"),
    ("0 1\n0 1.0\n", 2, "field 2 (item)"),
])
def test_read_splits_bad_input(tmp_path, text, line, fragment):
  good = _write(tmp_path, "train.txt", "0 1\n")
  bad = _write(tmp_path, "val.txt", text)
  _raises_at(lambda: data.read_splits(good, bad, good), "val.txt", line, fragment)


def test_read_splits_missing_and_empty(tmp_path):
  good = _write(tmp_path, "train.txt", "0 1\n")
  _raises_at(lambda: data.read_splits(good, good, tmp_path / "test.txt"), "test.txt", None,
             "does not exist")
  empty = _write(tmp_path, "empty.txt", "")
  _raises_at(lambda: data.read_splits(empty, good, good), "empty.txt", None, "empty file")


# ----------------------------------------------------------------------------- preprocessing


def test_dedupe_keeps_first_or_earliest():
  rec = _records([0, 0, 1, 0, 1], [5, 6, 5, 5, 5])
  out = data.dedupe(rec)
  assert out.order.tolist() == [0, 1, 2]
  timed = _records([0, 0, 0, 0, 1, 1], [5, 6, 5, 5, 2, 2], timestamps=[9, 1, 3, 3, 4, 4])
  out = data.dedupe(timed)
  # (0,5): earliest is ts 3, tie between positions 2 and 3 -> the first; (1,2): tie -> first.
  assert out.order.tolist() == [1, 2, 4]
  assert out.timestamps.tolist() == [1, 3, 4]


def test_filter_min_single_pass_and_kcore():
  # User 0: items 0,1,2; user 1: items 0,1; user 2: item 2 only; item 3 only by user 3 (x2 users).
  rec = _records([0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 2, 0, 1, 2, 3, 0])
  once = data.filter_min(rec, min_user=2, min_item=2)
  # Counts from the input: user 2 (1) and item 3 (1) go; user 3 keeps item 0 only.
  assert sorted(zip(once.users.tolist(), once.items.tolist())) == [
      (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (3, 0)]
  core = data.filter_min(rec, min_user=2, min_item=2, iterate=True)
  assert sorted(zip(core.users.tolist(), core.items.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
  uc = np.bincount(core.users)
  ic = np.bincount(core.items)
  assert uc[uc > 0].min() >= 2 and ic[ic > 0].min() >= 2
  assert data.filter_min(rec) is rec


def test_filter_min_empty_result_names_source_and_settings():
  rec = _records([0, 1], [0, 1], source="/x/tiny.csv")
  _raises_at(lambda: data.filter_min(rec, min_user=3, min_item=1, iterate=True), "tiny.csv",
             None, "min_user_interactions=3", "min_item_interactions=1", "kcore=True")


def test_reindex_keeps_relative_order():
  rec = _records([7, 3, 7], [40, 10, 25])
  out = data.reindex(rec)
  assert out.users.tolist() == [1, 0, 1] and out.items.tolist() == [2, 0, 1]
  assert (out.num_users, out.num_items) == (2, 3)
  assert out.user_labels.tolist() == [3, 7] and out.item_labels.tolist() == [10, 25, 40]


def test_leave_one_out_file_order():
  # User 0 lists 9, 2, 5, 1 in that order; user 1 has 2 items; item 8 is only ever held out.
  rec = data.reindex(_records([0, 0, 0, 0, 1, 1, 2, 2, 2], [9, 2, 5, 1, 3, 4, 2, 1, 8]))
  inter = data.leave_one_out(rec, order="file")
  lab = rec.item_labels
  assert inter.num_items == 7  # 1 2 3 4 5 8 9: item 8 appears only in test
  assert [lab[r].tolist() for r in _rows(inter, "test")] == [[1], [], [8]]
  assert [lab[r].tolist() for r in _rows(inter, "val")] == [[5], [], [1]]
  assert [sorted(lab[r].tolist()) for r in _rows(inter, "train")] == [[2, 9], [3, 4], [2]]
  assert inter.num_train == 5 and inter.item_popularity.sum() == 5


def test_leave_one_out_timestamp_ties_are_stable():
  rec = _records([0] * 5 + [1] * 3, [0, 1, 2, 3, 4, 0, 1, 2],
                 timestamps=[5, 1, 5, 5, 2, 7, 7, 7])
  inter = data.leave_one_out(rec, order="timestamp")
  # User 0 by time: 1(t1) 4(t2) 0(t5) 2(t5) 3(t5): ties in file order -> test 3, val 2.
  assert _rows(inter, "test") == [[3], [2]]
  assert _rows(inter, "val") == [[2], [1]]
  assert _rows(inter, "train") == [[0, 1, 4], [0]]
  with pytest.raises(DataError, match="no timestamps"):
    data.leave_one_out(_records([0, 0, 0], [0, 1, 2]), order="timestamp")


def test_leave_one_out_random_is_seeded():
  rng = np.random.default_rng(0)
  users = np.repeat(np.arange(50), 6)
  items = np.concatenate([rng.choice(40, 6, replace=False) for _ in range(50)])
  rec = _records(users, items)
  a = data.leave_one_out(rec, order="random", seed=3)
  b = data.leave_one_out(rec, order="random", seed=3)
  c = data.leave_one_out(rec, order="random", seed=4)
  assert np.array_equal(a.test_indices, b.test_indices)
  assert np.array_equal(a.val_indices, b.val_indices)
  assert not np.array_equal(a.test_indices, c.test_indices)
  for inter in (a, c):
    assert inter.num_train == 50 * 4 and len(inter.test_indices) == 50
    full = [sorted(t + v + s) for t, v, s in
            zip(_rows(inter, "train"), _rows(inter, "val"), _rows(inter, "test"))]
    assert full == [sorted(items[users == u].tolist()) for u in range(50)]


def test_ratio_split_proportions():
  users = np.repeat([0, 1, 2], [10, 20, 2])
  items = np.concatenate([np.arange(10), np.arange(20), [0, 1]])
  rec = _records(users, items, timestamps=np.concatenate([np.arange(10)[::-1], np.arange(20),
                                                          [0, 1]]))
  inter = data.ratio_split(rec, val_ratio=0.1, test_ratio=0.2, order="random", seed=1)
  sizes = [[len(r) for r in _rows(inter, s)] for s in ("train", "val", "test")]
  assert sizes == [[7, 14, 2], [1, 2, 0], [2, 4, 0]]  # 2 * 0.2 rounds to 0
  again = data.ratio_split(rec, val_ratio=0.1, test_ratio=0.2, order="random", seed=1)
  assert np.array_equal(inter.test_indices, again.test_indices)
  by_time = data.ratio_split(rec, val_ratio=0.1, test_ratio=0.2, order="timestamp")
  assert _rows(by_time, "test")[:2] == [[0, 1], [16, 17, 18, 19]]
  assert _rows(by_time, "val")[:2] == [[2], [14, 15]]
  heavy = data.ratio_split(rec, val_ratio=0.4, test_ratio=0.5, seed=2)
  sizes = [[len(r) for r in _rows(heavy, s)] for s in ("train", "val", "test")]
  assert sizes == [[1, 2, 1], [4, 8, 0], [5, 10, 1]]  # every user keeps a training item
  with pytest.raises(ValueError):
    data.ratio_split(rec, val_ratio=0.5, test_ratio=0.5)


# ----------------------------------------------------------------------------- load()


def test_shipped_citeulike_figures():
  inter = data.load(data.default_data_config())
  assert inter.name == "citeulike-t"
  assert (inter.num_users, inter.num_items) == (5219, 25181)
  assert inter.num_train == 115142
  assert len(inter.val_indices) == 5219 and len(inter.test_indices) == 5219
  assert np.all(np.diff(inter.val_indptr) == 1) and np.all(np.diff(inter.test_indptr) == 1)
  # The held-out items are each kept user's last and second-to-last listed ids.
  with gzip.open(data.SHIPPED_CITEULIKE, "rt") as f:
    lists = [[int(t) for t in line.split()[1:]] for line in f]
  assert len(lists) == 7947 and sum(map(len, lists)) == 134860
  kept = [row for row in lists if len(row) >= 5]
  item_ids = np.unique(np.concatenate(kept))
  assert np.array_equal(item_ids[inter.test_indices], [row[-1] for row in kept])
  assert np.array_equal(item_ids[inter.val_indices], [row[-2] for row in kept])
  with gzip.open(data.SHIPPED_CITEULIKE, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert digest == "02d5d429b2c0362e0ed79f6ef204666b4092563d21493abf4dfb521e8a7078bf"


def test_load_delimited_pipeline(tmp_path):
  lines = []
  for u in range(4):
    for k in range(4 + u):
      lines.append(f"user{u}\titem{(u + k) % 6}\t{1 + k % 5}\t{100 - k}")
  lines.append("user0\titem0\t5\t1")  # a later line but the earliest time for (user0, item0)
  path = _write(tmp_path, "log.tsv", "\n".join(lines) + "\n")
  cfg = data.default_data_config()
  cfg.update(dict(format="delimited", path=path, sep="\t", columns="user,item,rating,timestamp",
                  min_user_interactions=3, loo_order="timestamp"))
  inter = data.load(cfg)
  assert inter.name == "log" and inter.num_users == 4 and inter.num_items == 6
  # Time runs backwards along each user's lines (k = 0 is latest). Item ids follow first
  # appearance (item0..item5 -> 0..5). Dedupe keeps the earliest copy, so user0's item0 (t=1)
  # and user3's item3 (k=6) become the oldest: test/val shift to each user's next lines.
  assert inter.test_indices.tolist() == [1, 1, 2, 4]
  assert inter.val_indices.tolist() == [2, 2, 3, 5]
  cfg.min_rating = 9.0
  _raises_at(lambda: data.load(cfg), "log.tsv", None, "min_rating=9.0")
  cfg.min_rating = None
  cfg.min_user_interactions = 100
  _raises_at(lambda: data.load(cfg), "log.tsv", None, "min_user_interactions=100")
  as_dict = dict(format="delimited", path=path, sep="\t", columns="user,item,_,_",
                 split="ratio", val_ratio=0.0, test_ratio=0.25, min_user_interactions=0)
  inter = data.load(as_dict)
  assert len(inter.val_indices) == 0
  assert inter.num_train + len(inter.test_indices) == 21  # 23 lines, 2 duplicates


# ----------------------------------------------------------------------------- download


def test_download_caches_and_checks_hash(tmp_path, monkeypatch):
  payload = gzip.compress(b"3 0 1 2\n3 1 2 3\n")
  src = tmp_path / "remote" / "users.dat.gz"
  src.parent.mkdir()
  src.write_bytes(payload)
  url = src.as_uri()
  good = hashlib.sha256(payload).hexdigest()
  cache = tmp_path / "cache"
  calls = []
  real_urlopen = urllib.request.urlopen
  monkeypatch.setattr(urllib.request, "urlopen",
                      lambda u, *a, **k: calls.append(u) or real_urlopen(u, *a, **k))

  path = data.download(url, good, cache)
  assert pathlib.Path(path).read_bytes() == payload and os.listdir(cache) == ["users.dat.gz"]
  cfg = data.default_data_config()
  cfg.update(dict(url=url, sha256=good, cache_dir=str(cache), min_user_interactions=0))
  inter = data.load(cfg)  # cache hit: no second download
  assert inter.num_users == 2 and inter.num_train == 2 and len(calls) == 1

  bad_cache = tmp_path / "bad"
  with pytest.raises(DataError) as info:
    data.download(url, "0" * 64, bad_cache)
  msg = str(info.value)
  assert url in msg and "0" * 64 in msg and good in msg
  assert os.listdir(bad_cache) == []
  with pytest.raises(DataError, match="sha256"):
    data.download(url, "", bad_cache)
  with pytest.raises(DataError, match="download failed"):
    data.download((tmp_path / "missing.gz").as_uri(), good, bad_cache)
  assert os.listdir(bad_cache) == []


def test_default_config_keys():
  cfg = data.default_data_config()
  for key in ("format", "path", "url", "sha256", "cache_dir", "sep", "columns", "header",
              "min_rating", "min_user_interactions", "min_item_interactions", "kcore", "split",
              "loo_order", "val_ratio", "test_ratio", "seed", "train", "val", "test"):
    assert key in cfg
  assert (cfg.format, cfg.path, cfg.min_user_interactions, cfg.split, cfg.loo_order) == (
      "citeulike", "", 5, "loo", "file")


def test_ceil_ratio_split_and_heldout_by_user():
  """UnKD's protocol: ceil(0.2 n) random items per user held out, then a random half of the users
  keep their held-out items as test and the others' become validation."""
  sizes = [5, 10, 12, 20, 7, 9]
  rec = data.Records(source="x", users=np.repeat(np.arange(6), sizes),
                     items=np.concatenate([np.arange(n) for n in sizes]),
                     order=np.arange(sum(sizes)), num_users=6, num_items=20)
  inter = data.ratio_split(rec, val_ratio=0.0, test_ratio=0.2, order="random", seed=3,
                           rounding="ceil")
  assert np.diff(inter.split("test")[0]).tolist() == [1, 2, 3, 4, 2, 2]  # ceil(0.2 n)
  assert len(inter.val_indices) == 0
  split = data.preprocess.heldout_by_user(inter, 0.5, seed=1)
  val_n, test_n = (np.diff(split.split(s)[0]) for s in ("val", "test"))
  assert ((val_n > 0) ^ (test_n > 0)).all() and (test_n > 0).sum() == 3
  np.testing.assert_array_equal(val_n + test_n, np.diff(inter.split("test")[0]))
  np.testing.assert_array_equal(split.train_indices, inter.train_indices)
  with pytest.raises(ValueError, match="heldout_test_users"):
    data.preprocess.heldout_by_user(inter, 1.0)
