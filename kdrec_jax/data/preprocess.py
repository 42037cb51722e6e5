"""Cleaning and splitting raw `Records` into an `Interactions` value.

The usual pipeline is `dedupe -> filter_min -> reindex -> leave_one_out | ratio_split`.
"""
from __future__ import annotations

import fractions
import os
from typing import Optional

import numpy as np

from kdrec_jax.data.errors import DataError
from kdrec_jax.data.interactions import Interactions
from kdrec_jax.data.readers import Records

LOO_ORDERS = ("file", "timestamp", "random")
RATIO_ORDERS = ("random", "timestamp", "file")
RATIO_ROUNDINGS = ("round", "ceil", "floor")
DEDUPE_KEEPS = ("first", "last")


def dedupe(records: Records, keep: str = "first") -> Records:
  """Keeps one record per (user, item): with keep='first' the earliest by timestamp if any, else
  the first in the file; with keep='last' the latest (e.g. a venue's last check-in, so that a
  leave-one-out by time holds out the venue of each user's last check-in).

  Timestamp ties go by file order. Surviving records keep their order.
  """
  if keep not in DEDUPE_KEEPS:
    raise ValueError(f"unknown dedupe keep {keep!r}; expected one of {DEDUPE_KEEPS}")
  if not len(records):
    return records
  keys = [records.order]
  if records.timestamps is not None:
    keys.append(records.timestamps)
  perm = np.lexsort(keys + [records.items, records.users])
  u, i = records.users[perm], records.items[perm]
  change = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
  pick = np.ones(len(perm), bool)
  if keep == "first":
    pick[1:] = change
  else:
    pick[:-1] = change
  if pick.all():
    return records
  return records.take(np.sort(perm[pick]))


def filter_min(records: Records, min_user: int = 0, min_item: int = 0,
               iterate: bool = False) -> Records:
  """Drops users with < `min_user` and items with < `min_item` interactions.

  Without `iterate`, both counts are taken once on the input and applied together; with
  `iterate`, this repeats until nothing changes (the k-core). Raises DataError if nothing is left.
  """
  keep = np.ones(len(records), bool)
  while True:
    uc = np.bincount(records.users[keep], minlength=records.num_users)
    ic = np.bincount(records.items[keep], minlength=records.num_items)
    new = keep & (uc[records.users] >= min_user) & (ic[records.items] >= min_item)
    done = not iterate or new.sum() == keep.sum()
    keep = new
    if done:
      break
  if not keep.any():
    raise DataError(f"{records.source}: no interactions left after filtering "
                    f"(min_user_interactions={min_user}, min_item_interactions={min_item}, "
                    f"kcore={iterate}; {len(records)} interactions before)")
  return records if keep.all() else records.take(keep)


def reindex(records: Records) -> Records:
  """Renumbers users and items that have records to 0..n-1, keeping the ids' relative order.

  `user_labels` / `item_labels` of the result map new ids back to the original labels (or to
  the original integer ids when there were no labels).
  """
  old_users, users = np.unique(records.users, return_inverse=True)
  old_items, items = np.unique(records.items, return_inverse=True)
  relabel = lambda labels, old: old if labels is None else labels[old]
  return Records(
      source=records.source, users=users.reshape(-1).astype(np.int64),
      items=items.reshape(-1).astype(np.int64), order=records.order,
      num_users=len(old_users), num_items=len(old_items), timestamps=records.timestamps,
      ratings=records.ratings, user_labels=relabel(records.user_labels, old_users),
      item_labels=relabel(records.item_labels, old_items))


def _user_major(records: Records, order: str, seed: int) -> np.ndarray:
  """Permutation grouping records by user, each user's records in the requested order."""
  if order == "file":
    return np.lexsort((records.order, records.users))
  if order == "timestamp":
    if records.timestamps is None:
      raise DataError(f"{records.source}: order='timestamp' but the data has no timestamps")
    return np.lexsort((records.order, records.timestamps, records.users))
  if order == "random":
    key = np.random.default_rng(seed).permutation(len(records))
    return np.lexsort((key, records.users))
  raise ValueError(f"unknown order {order!r}")


def _positions_from_end(records: Records, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For user-major `perm`: each record's distance from its user's last record, and row sizes."""
  users = records.users[perm]
  counts = np.bincount(records.users, minlength=records.num_users)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  pos = np.arange(len(perm)) - starts[users]
  return counts[users] - 1 - pos, counts[users]


def _csr(users: np.ndarray, items: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
  perm = np.lexsort((items, users))
  indptr = np.zeros(num_users + 1, np.int64)
  np.cumsum(np.bincount(users, minlength=num_users), out=indptr[1:])
  return indptr, items[perm].astype(np.int32)


def _build(records: Records, perm: np.ndarray, which: np.ndarray,
           name: Optional[str]) -> Interactions:
  """Interactions from user-major `perm` and a split code per position (0 train, 1 val, 2 test)."""
  if name is None:
    name = os.path.basename(records.source)
  users, items = records.users[perm], records.items[perm]
  parts = [_csr(users[which == k], items[which == k], records.num_users) for k in range(3)]
  out = Interactions(name=name, num_users=int(records.num_users),
                     num_items=int(records.num_items),
                     train_indptr=parts[0][0], train_indices=parts[0][1],
                     val_indptr=parts[1][0], val_indices=parts[1][1],
                     test_indptr=parts[2][0], test_indices=parts[2][1])
  out.validate()
  return out


def leave_one_out(records: Records, order: str = "file", seed: int = 0,
                  name: Optional[str] = None) -> Interactions:
  """Per user: last item -> test, second-to-last -> val, the rest -> train.

  Args:
    records: deduplicated records (duplicates are dropped here otherwise).
    order: 'file' (order in the source), 'timestamp' (stable: ties keep file order) or
      'random' (a permutation drawn from `seed`).
    seed: used by order='random'.
    name: the dataset name; defaults to the source file's name.

  Users with fewer than 3 interactions keep all of them in train.
  """
  if order not in LOO_ORDERS:
    raise ValueError(f"unknown leave-one-out order {order!r}; expected one of {LOO_ORDERS}")
  records = dedupe(records)
  perm = _user_major(records, order, seed)
  from_end, sizes = _positions_from_end(records, perm)
  which = np.where(sizes >= 3, np.clip(2 - from_end, 0, 2), 0)
  return _build(records, perm, which, name)


def _floor_times(n: np.ndarray, ratio: float) -> np.ndarray:
  """floor(n * ratio) in exact rational arithmetic (0.8 * 35 is 28, not 27.999...)."""
  frac = fractions.Fraction(str(ratio)).limit_denominator(10**9)
  return (n.astype(np.int64) * frac.numerator) // frac.denominator


def _ceil_times(n: np.ndarray, ratio: float) -> np.ndarray:
  """ceil(n * ratio) in exact rational arithmetic."""
  frac = fractions.Fraction(str(ratio)).limit_denominator(10**9)
  return -((-n.astype(np.int64) * frac.numerator) // frac.denominator)


def ratio_split(records: Records, val_ratio: float = 0.1, test_ratio: float = 0.2,
                order: str = "random", seed: int = 0, name: Optional[str] = None,
                rounding: str = "round") -> Interactions:
  """Per user with n items in the chosen order, the first go to train, then val, then test.

  rounding='round': round(n * test_ratio) items -> test, round(n * val_ratio) -> val, the rest
  -> train; every user keeps at least one training item (val is shrunk first, then test).
  rounding='ceil' (the UnKD split): the same with ceil(n * ratio) held out.
  rounding='floor' (the RCE-KD / KDs split): train = the first max(floor(n * (1 - val_ratio -
  test_ratio)), 1), val up to floor(n * (1 - test_ratio)), test the rest; users with few items
  can get no validation item.
  With order='timestamp' (or 'file') the latest items go to test and the ones before to val;
  with 'random' a seeded permutation decides.
  """
  if order not in RATIO_ORDERS:
    raise ValueError(f"unknown ratio-split order {order!r}; expected one of {RATIO_ORDERS}")
  if rounding not in RATIO_ROUNDINGS:
    raise ValueError(f"unknown ratio-split rounding {rounding!r}; expected one of "
                     f"{RATIO_ROUNDINGS}")
  if val_ratio < 0 or test_ratio < 0 or val_ratio + test_ratio >= 1:
    raise ValueError(f"need val_ratio, test_ratio >= 0 and val_ratio + test_ratio < 1, "
                     f"got {val_ratio}, {test_ratio}")
  records = dedupe(records)
  perm = _user_major(records, order, seed)
  from_end, sizes = _positions_from_end(records, perm)
  if rounding == "floor":
    pos = sizes - 1 - from_end
    n_train = np.maximum(_floor_times(sizes, round(1 - val_ratio - test_ratio, 12)), 1)
    n_train_val = np.maximum(_floor_times(sizes, round(1 - test_ratio, 12)), n_train)
    which = np.where(pos < n_train, 0, np.where(pos < n_train_val, 1, 2))
    return _build(records, perm, which, name)
  if rounding == "ceil":
    n_test = _ceil_times(sizes, test_ratio)
    n_val = _ceil_times(sizes, val_ratio)
  else:
    n_test = np.floor(sizes * test_ratio + 0.5).astype(np.int64)
    n_val = np.floor(sizes * val_ratio + 0.5).astype(np.int64)
  excess = np.maximum(n_test + n_val - (sizes - 1), 0)
  cut_val = np.minimum(excess, n_val)
  n_val -= cut_val
  n_test -= excess - cut_val
  which = np.where(from_end < n_test, 2, np.where(from_end < n_test + n_val, 1, 0))
  return _build(records, perm, which, name)


def heldout_by_user(inter: Interactions, test_fraction: float, seed: int = 0) -> Interactions:
  """Splits the held-out users instead of their items (UnKD's protocol): a random
  `int(test_fraction * U)` users keep all their held-out items (val and test) as test, the other
  users' held-out items become validation. Training items are unchanged.
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"heldout_test_users must be in (0, 1), got {test_fraction}")
  u = inter.num_users
  test_users = np.zeros(u, bool)
  test_users[np.random.default_rng(seed).choice(u, int(test_fraction * u), replace=False)] = True
  rows = {s: np.split(inter.split(s)[1], inter.split(s)[0][1:-1]) for s in ("val", "test")}
  held = [np.concatenate([rows["val"][i], rows["test"][i]]) for i in range(u)]
  empty = np.zeros(0, np.int32)
  train = np.split(inter.train_indices, inter.train_indptr[1:-1])
  return Interactions.from_rows(inter.name, inter.num_items, train,
                                [empty if test_users[i] else held[i] for i in range(u)],
                                [held[i] if test_users[i] else empty for i in range(u)])
