"""Datasets for kdrec_jax: readers, preprocessing and the config-driven `load`."""
from __future__ import annotations

import os
from typing import Any

import ml_collections

from kdrec_jax.data import preprocess
from kdrec_jax.data import readers
from kdrec_jax.data.errors import DataError
from kdrec_jax.data.interactions import Interactions
from kdrec_jax.data.preprocess import dedupe, filter_min, leave_one_out, ratio_split, reindex
from kdrec_jax.data.readers import (DEFAULT_CACHE_DIR, SHIPPED_CITEULIKE, Records, download,
                                    read_citeulike, read_delimited, read_splits)

__all__ = [
    "DataError", "Interactions", "Records", "SHIPPED_CITEULIKE", "DEFAULT_CACHE_DIR",
    "default_data_config", "load", "download", "read_citeulike", "read_delimited",
    "read_splits", "dedupe", "filter_min", "reindex", "leave_one_out", "ratio_split",
    "readers", "preprocess",
]

FORMATS = ("citeulike", "delimited", "splits")
SPLITS = ("loo", "ratio")


def default_data_config() -> ml_collections.ConfigDict:
  """Data settings; the defaults load the shipped CiteULike-t with leave-one-out by file order."""
  return ml_collections.ConfigDict(dict(
      name="",                      # '' = derived from the file
      format="citeulike",           # 'citeulike' | 'delimited' | 'splits'
      path="",                      # '' = the shipped CiteULike-t (format 'citeulike')
      url="",                       # http(s) URL downloaded into cache_dir (needs sha256)
      sha256="",
      cache_dir=DEFAULT_CACHE_DIR,
      sep="",                       # delimited: '' = whitespace, or ',', '\t', '::', ...
      columns="user,item",          # delimited: user,item,rating,timestamp or '_' to skip
      header=False,
      min_rating=None,              # delimited: drop records rated below this
      min_user_interactions=5,
      min_item_interactions=0,
      kcore=False,                  # repeat the min filters until a fixed point
      split="loo",                  # 'loo' | 'ratio'
      loo_order="file",             # 'file' | 'timestamp' | 'random'
      val_ratio=0.1,
      test_ratio=0.2,
      ratio_order="random",         # 'random' | 'timestamp' | 'file'
      ratio_rounding="round",       # 'round' | 'ceil' | 'floor' (train floor(0.8 n), val to 0.9 n)
      heldout_test_users=0.0,       # ratio: > 0 splits held-out sets by user (UnKD): this
                                    # fraction of users is test, the others validation
      seed=0,
      train="",                     # format 'splits': the three files of user-item pairs
      val="",
      test="",
  ))


_DEFAULTS = default_data_config().to_dict()


def _get(cfg: Any, key: str) -> Any:
  if isinstance(cfg, dict):
    return cfg.get(key, _DEFAULTS[key])
  return getattr(cfg, key, _DEFAULTS[key])


def _source_path(cfg: Any) -> str:
  url = _get(cfg, "url")
  if url:
    return download(url, _get(cfg, "sha256"), _get(cfg, "cache_dir") or DEFAULT_CACHE_DIR)
  path = _get(cfg, "path")
  if path:
    return os.path.expanduser(path)
  if _get(cfg, "format") == "citeulike":
    return SHIPPED_CITEULIKE
  raise ValueError(f"data format {_get(cfg, 'format')!r} needs a path or url")


def _default_name(path: str) -> str:
  if os.path.abspath(path) == os.path.abspath(SHIPPED_CITEULIKE):
    return "citeulike-t"
  base = os.path.basename(path)
  for ext in (".gz", ".dat", ".csv", ".tsv", ".txt", ".inter"):
    if base.endswith(ext) and len(base) > len(ext):
      base = base[:-len(ext)]
  return base


def load(cfg: Any) -> Interactions:
  """Reads, cleans and splits the dataset that `cfg` (see `default_data_config`) describes.

  Pipeline: read -> dedupe -> filter_min -> reindex -> leave_one_out | ratio_split; format
  'splits' reads a ready-made split as is. Bad input raises DataError naming the file.
  """
  fmt = _get(cfg, "format")
  if fmt not in FORMATS:
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
  name = _get(cfg, "name") or None
  if fmt == "splits":
    paths = [_get(cfg, k) for k in ("train", "val", "test")]
    if not all(paths):
      raise ValueError("data format 'splits' needs train, val and test paths")
    return read_splits(*[os.path.expanduser(p) for p in paths], name=name)
  split = _get(cfg, "split")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

  path = _source_path(cfg)
  min_rating = None
  if fmt == "citeulike":
    records = read_citeulike(path)
  else:
    columns = _get(cfg, "columns")
    min_rating = _get(cfg, "min_rating")
    records = read_delimited(path, sep=_get(cfg, "sep") or None, columns=columns,
                             header=bool(_get(cfg, "header")), min_rating=min_rating)
    if not len(records):
      raise DataError(f"{path}: no interactions left after filtering (min_rating={min_rating})")
  records = dedupe(records)
  records = filter_min(records, int(_get(cfg, "min_user_interactions") or 0),
                       int(_get(cfg, "min_item_interactions") or 0), bool(_get(cfg, "kcore")))
  records = reindex(records)
  name = name or _default_name(path)
  seed = int(_get(cfg, "seed"))
  if split == "loo":
    return leave_one_out(records, order=_get(cfg, "loo_order"), seed=seed, name=name)
  inter = ratio_split(records, val_ratio=float(_get(cfg, "val_ratio")),
                      test_ratio=float(_get(cfg, "test_ratio")),
                      order=_get(cfg, "ratio_order"), seed=seed, name=name,
                      rounding=_get(cfg, "ratio_rounding"))
  if float(_get(cfg, "heldout_test_users") or 0):
    inter = preprocess.heldout_by_user(inter, float(_get(cfg, "heldout_test_users")), seed)
  return inter
