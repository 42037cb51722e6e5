r"""Prints a dataset's statistics after the configured preprocessing, to check it before training.

  python -m launch.data --config configs/data/preset.py:movielens_1m \
      --config.data.path=~/data/ml-1m/ratings.dat [--config.data.min_rating=4 ...] [--json]
  python -m launch.data --config configs/bd_bpr_citeulike.py    # any training config

Reads only `config.data` (loaded as `kdrec_jax.data.load` does for training) and
`config.eval.popularity_groups` (4 when absent, as in training; 0 = no groups). Prints users,
items, interactions, density, the train / validation / test sizes, interactions per user and
per item, the cold items (no training interaction) and the held-out pairs that have one, the
held-out items' mean training popularity, and the popularity groups
(`kdrec_jax.metrics.popularity_groups`: items of about equal training interaction mass, most
popular first). Bad data: one line `error: <file>:<line>: ...`, exit status 1.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from kdrec_jax import data as kdata
from kdrec_jax.data import DataError, Interactions
from launch.flags_util import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print the statistics as one JSON object.")
flags.mark_flags_as_required(["config"])

DEFAULT_GROUPS = 4


def _summary(counts: np.ndarray) -> dict[str, float]:
  if not len(counts):
    return dict(min=0, median=0.0, mean=0.0, max=0)
  return dict(min=int(counts.min()), median=float(np.median(counts)),
              mean=float(counts.mean()), max=int(counts.max()))


def statistics(inter: Interactions, num_groups: int = DEFAULT_GROUPS) -> dict[str, Any]:
  """A dataset's sizes, split sizes, per-user / per-item counts and popularity groups.

  Args:
    inter: the preprocessed and split dataset.
    num_groups: popularity groups asked for (`kdrec_jax.metrics.popularity_groups`); 0 = none.

  Returns:
    A JSON-able dict: name, users, items, interactions (all splits), density, train / val /
    test pairs, users with train / val / test items, items without training interactions,
    val / test pairs of such a cold item and the val / test items' mean training popularity,
    per_user / per_item (min, median, mean, max interactions over all splits) and
    popularity_groups (None, or asked, made and per group: items, train_interactions, share of
    the training interactions).
  """
  sizes = {s: int(inter.split(s)[0][-1]) for s in ("train", "val", "test")}
  total = sum(sizes.values())
  users_with = {s: int(np.count_nonzero(np.diff(inter.split(s)[0]))) for s in sizes}
  per_user = sum(np.diff(inter.split(s)[0]) for s in sizes)
  per_item = sum(np.bincount(inter.split(s)[1], minlength=inter.num_items) for s in sizes)
  popularity = inter.item_popularity
  held_out = {s: popularity[inter.split(s)[1]] for s in ("val", "test")}  # per held-out pair
  cells = inter.num_users * inter.num_items
  out = dict(
      name=inter.name, users=inter.num_users, items=inter.num_items, interactions=total,
      density=total / cells if cells else 0.0,
      train=sizes["train"], val=sizes["val"], test=sizes["test"],
      users_with_train=users_with["train"], users_with_val=users_with["val"],
      users_with_test=users_with["test"],
      items_without_train=int(np.count_nonzero(popularity == 0)),
      # held-out pairs whose item has no training interaction (no model learns it from the
      # training data), and the held-out items' mean training popularity: where validation and
      # test differ in these, so do their accuracies
      **{f"{s}_cold": int(np.count_nonzero(pop == 0)) for s, pop in held_out.items()},
      **{f"{s}_item_popularity": float(pop.mean()) if len(pop) else 0.0
         for s, pop in held_out.items()},
      per_user=_summary(np.asarray(per_user)), per_item=_summary(np.asarray(per_item)),
      popularity_groups=None)
  if num_groups:
    from kdrec_jax import metrics  # imports JAX: only when groups are asked for
    groups = metrics.popularity_groups(*inter.split("train"), inter.num_items, int(num_groups))
    made = int(groups.max()) + 1 if len(groups) else 0
    rows = []
    for g in range(made):
      mass = int(popularity[groups == g].sum())
      rows.append(dict(group=g, items=int(np.count_nonzero(groups == g)),
                       train_interactions=mass,
                       share=mass / sizes["train"] if sizes["train"] else 0.0))
    out["popularity_groups"] = dict(asked=int(num_groups), made=made, groups=rows)
  return out


def format_statistics(stats: dict[str, Any]) -> str:
  """`statistics` as an aligned text table."""
  n = lambda x: f"{x:,}"  # noqa: E731
  dist = lambda d: (f"min {n(d['min'])}, median {d['median']:g}, mean {d['mean']:.1f}, "  # noqa
                    f"max {n(d['max'])}")
  lines = [
      f"dataset        {stats['name']}",
      f"users          {n(stats['users'])}",
      f"items          {n(stats['items'])}",
      f"interactions   {n(stats['interactions'])}",
      f"density        {100 * stats['density']:.4f}%",
      f"split pairs    train {n(stats['train'])}, val {n(stats['val'])}, "
      f"test {n(stats['test'])}",
      f"users with     train items {n(stats['users_with_train'])}, val items "
      f"{n(stats['users_with_val'])}, test items {n(stats['users_with_test'])}",
      f"per user       {dist(stats['per_user'])}",
      f"per item       {dist(stats['per_item'])}",
      f"cold items     {n(stats['items_without_train'])} without training interactions",
      f"held out       cold-item pairs val {n(stats['val_cold'])}, test "
      f"{n(stats['test_cold'])}; items' mean training popularity val "
      f"{stats['val_item_popularity']:.1f}, test {stats['test_item_popularity']:.1f}",
  ]
  pg = stats["popularity_groups"]
  if pg:
    lines.append(f"popularity groups: {pg['made']} made ({pg['asked']} asked), about equal "
                 "training interaction mass, most popular first")
    lines.append(f"  {'group':>5}  {'items':>9}  {'train interactions':>18}  {'share':>6}")
    for row in pg["groups"]:
      lines.append(f"  {row['group']:>5}  {n(row['items']):>9}  "
                   f"{n(row['train_interactions']):>18}  {100 * row['share']:>5.1f}%")
  return "\n".join(lines)


def num_groups_of(config: Any) -> int:
  """`config.eval.popularity_groups`, or DEFAULT_GROUPS when the config has no such key."""
  ev = config.get("eval", None) if hasattr(config, "get") else None
  if ev is None:
    return DEFAULT_GROUPS
  value = ev.get("popularity_groups", DEFAULT_GROUPS)
  return int(value or 0)


def run(config: Any, as_json: bool = False) -> int:
  """Loads `config.data`, prints its statistics (stdout) or one error line (stderr); the exit
  status: 0, or 1 for bad data or a bad data config."""
  try:
    inter = kdata.load(config.data)
    stats = statistics(inter, num_groups_of(config))
  except (DataError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  try:
    print(json.dumps(stats, indent=1) if as_json else format_statistics(stats), flush=True)
  except BrokenPipeError:  # piped into `head`: no traceback, and none at exit either
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0


def main(argv):
  del argv
  sys.exit(run(_CONFIG.value, _JSON.value))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
