"""The `data` section of a config: its keys and defaults (read by `kdrec_jax.data.load`)."""
from __future__ import annotations

from typing import Any

import ml_collections

from kdrec_jax.data.readers import DEFAULT_CACHE_DIR

FORMATS = ("citeulike", "delimited", "splits", "recbole", "jsonl")
SPLITS = ("loo", "ratio")


def default_data_config() -> ml_collections.ConfigDict:
  """Data settings; the defaults load the shipped CiteULike-t with leave-one-out by file order."""
  return ml_collections.ConfigDict(dict(
      name="",                      # '' = derived from the file
      format="citeulike",           # 'citeulike' | 'delimited' | 'splits' | 'recbole' | 'jsonl'
      path="",                      # '' = the shipped CiteULike-t (format 'citeulike')
      url="",                       # http(s) URL downloaded into cache_dir (needs sha256)
      sha256="",
      cache_dir=DEFAULT_CACHE_DIR,
      sep="",                       # delimited: '' = whitespace, or ',', '\t', '::', ...
      columns="user,item",          # delimited: user,item,rating,timestamp or '_' to skip
      header=False,
      min_rating=None,              # delimited, recbole, jsonl: drop records rated below this
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


# Keys that `load` reads when present (absent = these values). `default_data_config` leaves them
# out so that configs and the config records of existing workdirs stay as they were; the presets
# (`kdrec_jax.data.presets`) and `data_config` include them, so they can be overridden there.
OPTIONAL_KEYS = dict(
    timestamp_format="",          # '' = seconds | 'iso' | a strptime format ('%a %b %d ...')
    json_fields="user=user_id,item=item_id",  # jsonl: role=key, roles user,item,rating,timestamp
    repeats="first",              # repeated (user, item) records: keep the 'first' or 'last'
    count_repeats=False,          # min_*_interactions count every record, repeats included
)


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`default_data_config()` plus the `OPTIONAL_KEYS`, then `overrides` (known keys only)."""
  cfg = default_data_config()
  cfg.update(OPTIONAL_KEYS)
  unknown = sorted(set(overrides) - set(cfg.keys()))
  if unknown:
    raise ValueError(f"unknown data config keys {unknown}; known: {sorted(cfg.keys())}")
  cfg.update(overrides)
  return cfg
