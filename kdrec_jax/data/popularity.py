"""Items split into popularity groups by their training interactions (the groups of UnKD and of
the popularity-bias metrics)."""
from __future__ import annotations

from absl import logging
import numpy as np


def groups(train_indptr: np.ndarray, train_indices: np.ndarray, num_items: int,
                      num_groups: int) -> np.ndarray:
  """Items split into popularity groups of about equal training interaction mass, as UnKD does it
  (chengang95/UnKD `dataloader.py::Loader.splitGroup`, at commit 0251e5a lines ~285-324).

  Rule: let c_i be item i's number of training interactions, C = sum_i c_i and A = C / G (float)
  for G = `num_groups`. Items with c_i > 0 are visited by decreasing c_i (ties: lower item id
  first; the reference keeps first appearance in its training list) and appended to the current
  group, whose running mass m grows by c_i. When m > A after appending item i:
    * if i is alone in the group, the group is closed with it (a new empty group starts);
    * otherwise i is taken out, the group is closed without it and a new group starts with i
      (m = c_i, not re-checked until the next item is appended).
  At the end, a non-empty current group with m > A / 2 becomes a group of its own; otherwise it
  joins the last closed group (one exists: a remainder that is everything has m = C > A / 2).
  Items with c_i = 0 belong to no group (-1). Groups are numbered 0, 1, ... from the most popular.

  The rule can give fewer groups than asked (e.g. counts (10, 1, 1), G = 3: item 0 alone exceeds
  A = 4 and closes group 0; the remainder (1, 1) has mass 2, not > A / 2, and joins group 0: one
  group) or more (counts (3, 3, 3, 1), G = 2 gives 3 groups); the count is logged (warning) when
  it differs from `num_groups`, and is `groups.max() + 1`.

  Args:
    train_indptr, train_indices: the training CSR (int [U+1], int [nnz]).
    num_items: number of items I.
    num_groups: G >= 1, the number of groups asked for.

  Returns:
    int32 [I]: each item's group in 0..G'-1, or -1 for items without training interactions.
  """
  if num_groups < 1:
    raise ValueError(f"num_groups must be >= 1, got {num_groups}")
  counts = np.bincount(np.asarray(train_indices[:int(train_indptr[-1])], np.int64),
                       minlength=num_items)
  groups = np.full(num_items, -1, np.int32)
  items = np.flatnonzero(counts > 0)
  if not len(items):
    return groups
  order = items[np.argsort(-counts[items], kind="stable")]
  average = float(counts.sum()) / num_groups
  closed: list[list[int]] = []
  current: list[int] = []
  mass = 0
  for item in order.tolist():  # host-side, once per run: O(I)
    c = int(counts[item])
    current.append(item)
    mass += c
    if mass > average:
      if len(current) == 1:
        closed.append(current)
        current, mass = [], 0
      else:
        closed.append(current[:-1])
        current, mass = [item], c
  if current:
    if mass > average / 2 or not closed:
      closed.append(current)
    else:
      closed[-1].extend(current)
  for g, members in enumerate(closed):
    groups[members] = g
  if len(closed) != num_groups:
    logging.warning("popularity groups: the greedy split gives %d groups, not the %d asked for "
                    "(items per group %s)", len(closed), num_groups,
                    [len(m) for m in closed])
  return groups
