"""Popularity groups (UnKD's greedy split, by hand) and the per-group bias metrics of the
Evaluator against a slow numpy reference."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kdrec_jax import metrics
from kdrec_jax.data.interactions import Interactions
from metrics_test import random_data, row, table_score, tied_scores

KS = (1, 3, 10, 60)  # 60 > NUM_ITEMS exercises the clamped top_k


def csr_with_counts(counts) -> tuple[np.ndarray, np.ndarray]:
  """A training CSR in which item i has counts[i] interactions (user u holds items with
  counts > u)."""
  counts = np.asarray(counts)
  rows = [np.flatnonzero(counts > u) for u in range(int(counts.max()))]
  data = Interactions.from_rows("c", len(counts), rows, [[]] * len(rows), [[]] * len(rows))
  return data.split("train")


def test_popularity_groups_by_hand():
  # Counts of items 0..7; item 2 has none. Total 16. Order: 1 (5), 3 (3), 4 (3: after 3, the
  # lower id first), 5 (2), 0, 6, 7 (1 each).
  counts = [1, 5, 0, 3, 3, 2, 1, 1]
  indptr, indices = csr_with_counts(counts)
  # G = 2, A = 8: 1 + 3 = 8 is not > 8; adding 4 (11) overflows, so {1, 3} closes and 4 starts
  # the next group; 4, 5, 0, 6, 7 reach 8 (not > 8); the remainder 8 > A / 2 is a group.
  got = metrics.popularity_groups(indptr, indices, 8, 2)
  np.testing.assert_array_equal(got, [1, 0, -1, 0, 1, 1, 1, 1])
  assert got.dtype == np.int32
  # G = 3, A = 16/3: {1} (1 + 3 overflows), {3} (3 + 4 overflows), {4, 5} (then 0 overflows),
  # and the remainder {0, 6, 7} of mass 3 > A / 2 is a fourth group: more than asked.
  np.testing.assert_array_equal(metrics.popularity_groups(indptr, indices, 8, 3),
                                [3, 0, -1, 1, 2, 2, 3, 3])
  # G = 1: everything with an interaction in one group.
  np.testing.assert_array_equal(metrics.popularity_groups(indptr, indices, 8, 1),
                                [0, 0, -1, 0, 0, 0, 0, 0])
  with pytest.raises(ValueError):
    metrics.popularity_groups(indptr, indices, 8, 0)


def test_popularity_groups_can_be_fewer_than_asked(caplog):
  # Counts (10, 1, 1), G = 3, A = 4: item 0 alone exceeds A and is closed as group 0; the
  # remainder {1, 2} has mass 2, not > A / 2, so it joins group 0: one group.
  indptr, indices = csr_with_counts([10, 1, 1])
  with caplog.at_level("WARNING"):
    got = metrics.popularity_groups(indptr, indices, 3, 3)
  np.testing.assert_array_equal(got, [0, 0, 0])
  assert "gives 1 groups, not the 3 asked for" in caplog.text
  # Single items heavier than A = C / G each close a group: (1, 1), G = 4 gives 2 groups.
  indptr, indices = csr_with_counts([1, 1])
  np.testing.assert_array_equal(metrics.popularity_groups(indptr, indices, 2, 4), [0, 1])


def test_popularity_groups_on_random_data_partition_the_mass():
  data = random_data()
  groups = metrics.popularity_groups(*data.split("train"), data.num_items, 4)
  pop = data.item_popularity
  assert np.all((groups == -1) == (pop == 0))
  n = groups.max() + 1
  # Groups are contiguous in the popularity order (more popular -> lower group).
  order = np.lexsort((np.arange(data.num_items), -pop))
  g = groups[order][pop[order] > 0]
  assert np.all(np.diff(g) >= 0) and n >= 1
  mass = np.bincount(g, weights=pop[order][pop[order] > 0])
  assert mass.sum() == pop.sum()


def reference_group_metrics(data: Interactions, scores: np.ndarray, groups: np.ndarray,
                            split: str, ks) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Per evaluated user, from the definitions (NaN where the user has no held-out item in g)."""
  other = "val" if split == "test" else "test"
  num_groups = int(groups.max()) + 1
  users, rows = [], []
  for u in range(data.num_users):
    held = row(data, split, u)
    if not len(held):
      continue
    excluded = set(row(data, "train", u)) | set(row(data, other, u))
    cand = np.array([i for i in range(data.num_items) if i not in excluded or i in held])
    order = cand[np.argsort(-scores[u][cand].astype(np.float64), kind="stable")]
    rank = {int(i): r + 1 for r, i in enumerate(order)}
    out = {}
    for g in range(num_groups):
      held_g = [h for h in held if groups[h] == g]
      for k in ks:
        top = order[:k]
        out[f"Share@{k}/g{g}"] = np.mean(groups[top] == g)
        # UnKD's `RecallAndPrecisionByGroup`: set intersections of the top-K list, the held-out
        # items and the group; recall 0 without held-out items in g; precision over K.
        in_group = set(np.flatnonzero(groups == g).tolist())
        both = len(set(top.tolist()) & set(held) & in_group)
        n_held = len(set(held) & in_group)
        out[f"UnKDRecall@{k}/g{g}"] = both / n_held if n_held else 0.0
        out[f"UnKDPrecision@{k}/g{g}"] = both / k
        if not held_g:
          out[f"Recall@{k}/g{g}"] = out[f"NDCG@{k}/g{g}"] = np.nan
          continue
        r = np.array([rank[int(h)] for h in held_g])
        hits = r[r <= k]
        idcg = sum(1 / math.log2(j + 1) for j in range(1, min(k, len(held_g)) + 1))
        out[f"Recall@{k}/g{g}"] = len(hits) / len(held_g)
        out[f"NDCG@{k}/g{g}"] = float(np.sum(1 / np.log2(hits + 1))) / idcg
    users.append(u)
    rows.append(out)
  return np.array(users), {n: np.array([r[n] for r in rows]) for n in rows[0]}


def custom_groups(data: Interactions) -> np.ndarray:
  """Groups 0-2 by id, some items in no group, and group 3 = items in no test row."""
  ids = np.arange(data.num_items)
  groups = (ids % 3).astype(np.int32)
  groups[ids % 11 == 5] = -1
  untested = np.setdiff1d(ids, data.split("test")[1])
  assert len(untested) >= 2
  groups[untested] = 3
  return groups


@pytest.mark.parametrize("split,chunk_size,special,grouping", [
    ("test", 8, False, "custom"), ("test", 1024, True, "custom"), ("val", 6, True, "popularity")])
@pytest.mark.slow
def test_group_metrics_match_bruteforce(split, chunk_size, special, grouping):
  data = random_data()
  scores = tied_scores(special=special)
  groups = (custom_groups(data) if grouping == "custom" else
            metrics.popularity_groups(*data.split("train"), data.num_items, 4))
  ev = metrics.Evaluator(data, split, ks=KS, chunk_size=chunk_size, item_groups=groups)
  assert ev.num_groups == groups.max() + 1
  got = ev.per_user(table_score, jnp.asarray(scores), bias=True)
  users, want = reference_group_metrics(data, scores, groups, split, KS)
  np.testing.assert_array_equal(ev.users, users)
  assert set(got) == set(metrics.metric_names(KS)) | set(want)
  for name, w in want.items():
    np.testing.assert_allclose(got[name], w, atol=1e-5, err_msg=name)
  # Some users lack held-out items in some group; with the custom groups, group 3 has none.
  assert np.isnan(want["Recall@10/g0"]).any()
  means = ev(table_score, jnp.asarray(scores), bias=True)
  for name, w in want.items():
    if np.isnan(w).all():
      assert math.isnan(means[name]) and not name.startswith("Share"), name
    else:
      np.testing.assert_allclose(means[name], np.nanmean(w), atol=1e-6, err_msg=name)
  if grouping == "custom":
    assert math.isnan(means["Recall@10/g3"]) and math.isnan(means["NDCG@1/g3"])
    assert means["Share@60/g3"] > 0
  # Without the flag: exactly the plain metrics, unchanged.
  plain = ev(table_score, jnp.asarray(scores))
  assert set(plain) == set(metrics.metric_names(KS))
  for name, v in plain.items():
    assert means[name] == v, name


@pytest.mark.slow
def test_group_metrics_by_hand():
  # One user, 6 items; train item 0 excluded; held-out test items 2 (group 0) and 4 (group 1);
  # item 5 is in no group. Candidates by score: 5, 2, 1, 3, 4.
  data = Interactions.from_rows("hand", 6, [[0]], [[]], [[2, 4]])
  scores = jnp.array([[9., 3., 5., 2., 1., 6.]], jnp.float32)
  groups = np.array([0, 0, 0, 1, 1, -1], np.int32)
  ev = metrics.Evaluator(data, ks=(2, 5), item_groups=groups)
  got = ev(table_score, scores, bias=True)
  l2 = math.log2
  want = {"Recall@2/g0": 1.0, "NDCG@2/g0": 1 / l2(3), "Share@2/g0": 0.5,
          "Recall@2/g1": 0.0, "NDCG@2/g1": 0.0, "Share@2/g1": 0.0,
          "Recall@5/g0": 1.0, "NDCG@5/g0": 1 / l2(3), "Share@5/g0": 0.4,
          "Recall@5/g1": 1.0, "NDCG@5/g1": 1 / l2(6), "Share@5/g1": 0.4,
          # UnKD's: the top 2 (5, 2) hold item 2 of g0: recall 1/1, precision 1/2; the top 5
          # hold both: g0 and g1 recall 1, precision 1/5 each.
          "UnKDRecall@2/g0": 1.0, "UnKDPrecision@2/g0": 0.5,
          "UnKDRecall@2/g1": 0.0, "UnKDPrecision@2/g1": 0.0,
          "UnKDRecall@5/g0": 1.0, "UnKDPrecision@5/g0": 0.2,
          "UnKDRecall@5/g1": 1.0, "UnKDPrecision@5/g1": 0.2}
  for name, v in want.items():
    assert got[name] == pytest.approx(v, abs=1e-6), name


@pytest.mark.slow
def test_unkd_group_metrics_by_hand():
  """UnKD's definitions against ours on 3 users, 8 items, 2 groups (items 0-3: g0, 4-7: g1),
  K = 2 and 4; no training items, every item a candidate; scores rank items by id (0 best).
  User 0 holds out {1, 5}, user 1 {2, 3} (none in g1), user 2 {6}.
    top 2 = {0, 1}: user 0 hits 1 (g0); user 1 none; user 2 none.
    top 4 = {0, 1, 2, 3}: user 0 hits 1; user 1 hits 2, 3; user 2 none.
  Ours average Recall@K/g over the users with held-out items in g (g1: users 0 and 2); UnKD's
  over all 3 evaluated users, counting 0 for user 1 in g1, and precision = hits / K."""
  empty = [[] for _ in range(3)]
  data = Interactions.from_rows("hand", 8, empty, empty, [[1, 5], [2, 3], [6]])
  scores = jnp.tile(-jnp.arange(8, dtype=jnp.float32), (3, 1))
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32)
  got = metrics.Evaluator(data, ks=(2, 4), item_groups=groups)(table_score, scores, bias=True)
  want = {
      "Recall@2/g0": (1 + 0) / 2, "UnKDRecall@2/g0": (1 + 0 + 0) / 3,
      "UnKDPrecision@2/g0": (1 / 2 + 0 + 0) / 3,
      "Recall@4/g0": (1 + 1) / 2, "UnKDRecall@4/g0": (1 + 1 + 0) / 3,
      "UnKDPrecision@4/g0": (1 / 4 + 2 / 4 + 0) / 3,
      "Recall@4/g1": 0.0, "UnKDRecall@4/g1": 0.0, "UnKDPrecision@4/g1": 0.0,
  }
  for name, v in want.items():
    assert got[name] == pytest.approx(v, abs=1e-6), name


@pytest.mark.slow
def test_group_metrics_validation():
  data = random_data()
  with pytest.raises(ValueError, match="full"):
    metrics.Evaluator(data, protocol="sampled", item_groups=np.zeros(data.num_items, np.int32))
  with pytest.raises(ValueError, match="item_groups"):
    metrics.Evaluator(data, item_groups=np.zeros(3, np.int32))
  ev = metrics.Evaluator(data, ks=(5,))
  assert ev.num_groups == 0
  got = ev(table_score, jnp.asarray(tied_scores()), bias=True)
  assert set(got) == set(metrics.metric_names((5,)))
