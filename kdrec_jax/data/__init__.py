"""Datasets for kdrec_jax: readers, preprocessing and the config-driven `load`."""
from __future__ import annotations

import os
from typing import Any, Optional

from kdrec_jax.data import preprocess
from kdrec_jax.data import presets
from kdrec_jax.data import readers
from kdrec_jax.data.config import (FORMATS, OPTIONAL_KEYS, SPLITS, data_config,
                                   default_data_config)
from kdrec_jax.data.errors import DataError
from kdrec_jax.data.interactions import Interactions
from kdrec_jax.data.preprocess import dedupe, filter_min, leave_one_out, ratio_split, reindex
from kdrec_jax.data.readers import (DEFAULT_CACHE_DIR, SHIPPED_CITEULIKE, Records, download,
                                    read_citeulike, read_delimited, read_json_lines, read_recbole,
                                    read_splits)

__all__ = [
    "DataError", "Interactions", "Records", "SHIPPED_CITEULIKE", "DEFAULT_CACHE_DIR",
    "default_data_config", "data_config", "OPTIONAL_KEYS", "load", "prepare", "read_records",
    "download", "read_citeulike", "read_delimited", "read_recbole", "read_json_lines",
    "read_splits", "dedupe", "filter_min", "reindex", "leave_one_out", "ratio_split",
    "readers", "preprocess", "presets",
]

_DEFAULTS = {**default_data_config().to_dict(), **OPTIONAL_KEYS}


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
  for ext in (".gz", ".dat", ".csv", ".tsv", ".txt", ".inter", ".json", ".jsonl"):
    if base.endswith(ext) and len(base) > len(ext):
      base = base[:-len(ext)]
  return base


def _sep(sep: str) -> Optional[str]:
  """The separator as given, with the two characters '\\t' read as a tab (for shell flags)."""
  return None if not sep else ("\t" if sep == "\\t" else sep)


def read_records(cfg: Any) -> Records:
  """The raw records of the file `cfg` describes (formats 'citeulike', 'delimited', 'recbole' and
  'jsonl'), before any filtering; DataError if none survive `min_rating`."""
  fmt = _get(cfg, "format")
  if fmt not in FORMATS or fmt == "splits":
    raise ValueError(f"read_records: data format {fmt!r} has no raw records; expected one of "
                     f"{tuple(f for f in FORMATS if f != 'splits')}")
  path = _source_path(cfg)
  if fmt == "citeulike":
    return read_citeulike(path)
  min_rating = _get(cfg, "min_rating")
  stamps = _get(cfg, "timestamp_format") or ""
  if fmt == "delimited":
    records = read_delimited(path, sep=_sep(_get(cfg, "sep")), columns=_get(cfg, "columns"),
                             header=bool(_get(cfg, "header")), min_rating=min_rating,
                             timestamp_format=stamps)
  elif fmt == "recbole":
    records = read_recbole(path, min_rating=min_rating, timestamp_format=stamps)
  else:
    records = read_json_lines(path, fields=_get(cfg, "json_fields"), min_rating=min_rating,
                              timestamp_format=stamps)
  if not len(records):
    raise DataError(f"{path}: no interactions left after filtering (min_rating={min_rating})")
  return records


def prepare(cfg: Any) -> Records:
  """The records that `load` splits: read, repeats merged, filtered and renumbered from 0.

  `user_labels` / `item_labels` of the result map the ids of `load`'s Interactions back to the
  file's ids. With `count_repeats`, the minimum counts are taken before repeats are merged.
  """
  repeats = _get(cfg, "repeats")
  if repeats not in preprocess.DEDUPE_KEEPS:
    raise ValueError(f"unknown data.repeats {repeats!r}; expected one of "
                     f"{preprocess.DEDUPE_KEEPS}")
  records = read_records(cfg)
  mins = (int(_get(cfg, "min_user_interactions") or 0),
          int(_get(cfg, "min_item_interactions") or 0), bool(_get(cfg, "kcore")))
  if bool(_get(cfg, "count_repeats")):
    records = dedupe(filter_min(records, *mins), keep=repeats)
  else:
    records = filter_min(dedupe(records, keep=repeats), *mins)
  return reindex(records)


def load(cfg: Any) -> Interactions:
  """Reads, cleans and splits the dataset that `cfg` (see `default_data_config`) describes.

  Pipeline: read -> dedupe -> filter_min -> reindex -> leave_one_out | ratio_split (with
  `count_repeats`, filter_min comes before dedupe, so the minimum counts include repeated
  records); format 'splits' reads a ready-made split as is. Bad input raises DataError naming
  the file.
  """
  fmt = _get(cfg, "format")
  if fmt not in FORMATS:
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
  name = _get(cfg, "name") or None
  if fmt == "splits":
    paths = [_get(cfg, k) for k in ("train", "val", "test")]
    if not all(paths):
      raise ValueError("data format 'splits' needs train, val and test paths")
    paths = [os.path.expanduser(p) for p in paths]
    return _usable(read_splits(*paths, name=name), " / ".join(paths))
  split = _get(cfg, "split")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

  records = prepare(cfg)
  name = name or _default_name(records.source)
  seed = int(_get(cfg, "seed"))
  if split == "loo":
    return _usable(leave_one_out(records, order=_get(cfg, "loo_order"), seed=seed, name=name),
                   records.source)
  inter = ratio_split(records, val_ratio=float(_get(cfg, "val_ratio")),
                      test_ratio=float(_get(cfg, "test_ratio")),
                      order=_get(cfg, "ratio_order"), seed=seed, name=name,
                      rounding=_get(cfg, "ratio_rounding"))
  if float(_get(cfg, "heldout_test_users") or 0):
    inter = preprocess.heldout_by_user(inter, float(_get(cfg, "heldout_test_users")), seed)
  return _usable(inter, records.source)


def _usable(inter: Interactions, source: str) -> Interactions:
  """`inter`, or a DataError if nothing could be learned or measured from it: fewer than two
  items (nothing to rank), no training pairs, or no test interactions (nothing to evaluate)."""
  sizes = {s: len(inter.split(s)[1]) for s in ("train", "test")}
  problem = ("a catalogue of one item leaves nothing to rank" if inter.num_items < 2 else
             "no training interactions" if sizes["train"] == 0 else
             "no test interactions, so nothing to evaluate" if sizes["test"] == 0 else None)
  if problem:
    raise DataError(f"{source}: after preprocessing and the split, {problem} ({inter!r}); "
                    "check the filters (min_user_interactions, min_rating) and the split")
  return inter

