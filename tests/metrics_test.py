"""Tests for kdrec_jax.metrics against a brute-force numpy reference."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdrec_jax import metrics, ranking
from kdrec_jax.data.interactions import Interactions

NUM_USERS, NUM_ITEMS = 37, 53
KS = (1, 3, 10, 60)  # 60 > NUM_ITEMS exercises the clamped top_k


def table_score(params, users):
  """score_fn looking scores up in a dense [U, I] table."""
  return params[users]


def random_data(seed: int = 0) -> Interactions:
  rng = np.random.default_rng(seed)
  train, val, test = [], [], []
  for u in range(NUM_USERS):
    perm = rng.permutation(NUM_ITEMS)
    if u == 0:  # nearly everything in train: fewer candidates than most cutoffs
      n_tr, n_va, n_te = NUM_ITEMS - 3, 1, 1
    else:
      n_tr, n_va, n_te = rng.integers(0, 20), rng.integers(0, 4), rng.integers(0, 6)
      if u % 7 == 3:
        n_te = 0
      if u % 9 == 4:
        n_va = 0
    train.append(perm[:n_tr])
    val.append(perm[n_tr:n_tr + n_va])
    test.append(perm[n_tr + n_va:n_tr + n_va + n_te])
  return Interactions.from_rows("random", NUM_ITEMS, train, val, test)


def tied_scores(seed: int = 1, special: bool = False) -> np.ndarray:
  """Scores from a few integers (many ties), optionally with some -inf/+inf/NaN/-0.0 entries."""
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 4, size=(NUM_USERS, NUM_ITEMS)).astype(np.float32)
  if special:
    mask = rng.random(scores.shape)
    scores[mask < 0.08] = -np.inf
    scores[(mask >= 0.08) & (mask < 0.12)] = np.nan
    scores[(mask >= 0.12) & (mask < 0.14)] = np.inf
    scores[(mask >= 0.14) & (mask < 0.18)] = -0.0
  return scores


def row(data: Interactions, split: str, u: int) -> np.ndarray:
  indptr, indices = data.split(split)
  return indices[indptr[u]:indptr[u + 1]]


def reference_metrics(scores: np.ndarray, candidates: np.ndarray, held: np.ndarray, ks
                      ) -> dict[str, float]:
  """Metrics for one user from the definitions: stable argsort of -score over id-sorted candidates."""
  cand = np.sort(np.asarray(candidates), kind="stable")
  order = cand[np.argsort(-scores[cand], kind="stable")]
  ranks = np.array([1 + np.flatnonzero(order == h)[0] for h in held], np.float64)
  out = {}
  for k in ks:
    hits = ranks[ranks <= k]
    idcg = sum(1 / math.log2(r + 1) for r in range(1, min(k, len(held)) + 1))
    out[f"HR@{k}"] = float(len(hits) > 0)
    out[f"Recall@{k}"] = len(hits) / len(held)
    out[f"NDCG@{k}"] = float(np.sum(1 / np.log2(hits + 1))) / idcg
  out["MRR"] = 1 / ranks.min()
  return out


def reference_full(data: Interactions, scores: np.ndarray, split: str, ks):
  other = "val" if split == "test" else "test"
  users, per_user = [], []
  for u in range(data.num_users):
    held = row(data, split, u)
    if not len(held):
      continue
    excluded = set(row(data, "train", u)) | set(row(data, other, u))
    cand = np.array([i for i in range(data.num_items) if i not in excluded or i in held])
    users.append(u)
    per_user.append(reference_metrics(scores[u], cand, held, ks))
  return np.array(users), {n: np.array([m[n] for m in per_user]) for n in per_user[0]}


def assert_metrics_close(got: dict, want: dict, atol: float = 1e-5):
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=atol, err_msg=name)


def test_top_k_breaks_ties_by_lower_index():
  for x in (jnp.array([1, 3, 3, 1, 3, 2, 3], jnp.int32),
            jnp.array([1., 3., 3., 1., 3., 2., 3.], jnp.float32)):
    _, idx = jax.lax.top_k(x, 7)
    np.testing.assert_array_equal(idx, np.argsort(-np.asarray(x), kind="stable"))
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 3, size=(16, 300)).astype(np.int32)
  _, idx = jax.lax.top_k(jnp.asarray(x), 40)
  np.testing.assert_array_equal(idx, np.argsort(-x, axis=-1, kind="stable")[:, :40])


def test_order_key_matches_numpy_stable_argsort():
  s = np.array([0., -0., np.inf, -np.inf, np.nan, 1.5, -1.5, 1e-30, -1e-30, np.nan, -np.inf,
                3.4e38, -3.4e38, 1.5, 0.], np.float32)
  key = np.asarray(metrics.order_key(jnp.asarray(s)))
  np.testing.assert_array_equal(np.argsort(-key.astype(np.int64), kind="stable"),
                                np.argsort(-s, kind="stable"))
  assert key.min() > np.iinfo(np.int32).min  # every real score is above the excluded key


@pytest.mark.slow
def test_ranking_metrics_from_ranks_by_hand():
  ranks = jnp.array([[3, 7], [1, 2], [2, 9], [4, 0]])
  valid = jnp.array([[True, False], [True, True], [True, True], [False, False]])
  got = metrics.ranking_metrics_from_ranks(ranks, valid, (1, 5))
  l2 = math.log2
  want = {
      "HR@1": [0, 1, 0, 0], "HR@5": [1, 1, 1, 0],
      "Recall@1": [0, 0.5, 0, 0], "Recall@5": [1, 1, 0.5, 0],
      "NDCG@1": [0, 1, 0, 0],
      "NDCG@5": [0.5, 1, (1 / l2(3)) / (1 + 1 / l2(3)), 0],
      "MRR": [1 / 3, 1, 1 / 2, 0],
  }
  assert_metrics_close({k: np.asarray(v) for k, v in got.items()}, want)
  assert tuple(metrics.metric_names((1, 5))) == (
      "HR@1", "Recall@1", "NDCG@1", "HR@5", "Recall@5", "NDCG@5", "MRR")


@pytest.mark.slow
def test_tiny_hand_derived_full_and_sampled():
  # One user, 5 items, the held-out item 2 has the third best score.
  data = Interactions.from_rows("tiny", 5, [[]], [[]], [[2]])
  scores = jnp.array([[5., 4., 3., 2., 1.]], jnp.float32)
  want = {"HR@1": 0., "Recall@1": 0., "NDCG@1": 0., "HR@5": 1., "Recall@5": 1.,
          "NDCG@5": 0.5, "MRR": 1 / 3}
  got = metrics.evaluate(table_score, scores, data, ks=(1, 5))
  assert_metrics_close(got, want)
  # Sampled: the only unseen items are 0, 1, 3, 4; their draws decide the rank.
  ev = metrics.Evaluator(data, ks=(1, 5), protocol="sampled", num_negatives=3)
  negs, valid = ev.negatives(jax.random.key(3))
  assert valid.all() and not np.isin(negs, [2]).any()
  rank = 1 + int(np.sum(negs[0] < 2))  # items 0 and 1 beat item 2
  got = ev(table_score, scores, jax.random.key(3))
  np.testing.assert_allclose(got["MRR"], 1 / rank, rtol=1e-6)
  np.testing.assert_allclose(got["NDCG@5"], 1 / math.log2(rank + 1), rtol=1e-6)


@pytest.mark.parametrize("split,chunk_size,special", [
    ("test", 8, False), ("val", 5, False), ("test", 1024, True), ("val", 6, True)])
@pytest.mark.slow
def test_full_matches_bruteforce(split, chunk_size, special):
  data = random_data()
  scores = tied_scores(special=special)
  ev = metrics.Evaluator(data, split, ks=KS, chunk_size=chunk_size)
  got = ev.per_user(table_score, jnp.asarray(scores))
  users, want = reference_full(data, scores, split, KS)
  np.testing.assert_array_equal(ev.users, users)
  assert 0 < len(users) < NUM_USERS  # some users are skipped
  assert_metrics_close(got, want)
  means = ev(table_score, jnp.asarray(scores))
  assert_metrics_close(means, {n: v.mean() for n, v in want.items()})


def test_full_rank_beyond_max_k_is_exact_for_mrr():
  data = random_data(3)
  scores = tied_scores(4, special=True)
  ev = metrics.Evaluator(data, ks=(1, 2), chunk_size=7)
  got = ev.per_user(table_score, jnp.asarray(scores))
  _, want = reference_full(data, scores, "test", (1, 2))
  assert_metrics_close(got, want)
  assert np.any(want["MRR"] < 0.5)  # some best ranks lie beyond max(ks)


@pytest.mark.slow
@pytest.mark.parametrize("special", [False, True])
def test_sampled_matches_bruteforce(special):
  data = random_data(5)
  scores = tied_scores(6, special=special)
  key = jax.random.key(7)
  ev = metrics.Evaluator(data, "test", ks=KS, chunk_size=8, protocol="sampled",
                         num_negatives=20)
  negs, valid = ev.negatives(key)
  assert negs.shape == (ev.num_users, 20)
  want_rows = []
  for j, u in enumerate(ev.users):
    held = row(data, "test", u)
    seen = np.concatenate([row(data, s, u) for s in ("train", "val", "test")])
    assert not np.isin(negs[j][valid[j]], seen).any()
    assert valid[j].all() or u == 0  # only user 0 has few unseen items
    cand = np.concatenate([held, negs[j][valid[j]]])
    want_rows.append(reference_metrics(scores[u], cand, held, KS))
  want = {n: np.array([m[n] for m in want_rows]) for n in want_rows[0]}
  got = ev.per_user(table_score, jnp.asarray(scores), key)
  assert_metrics_close(got, want)
  # Deterministic given the key, and independent of chunking.
  ev2 = metrics.Evaluator(data, "test", ks=KS, chunk_size=1024, protocol="sampled",
                          num_negatives=20)
  assert_metrics_close(ev2.per_user(table_score, jnp.asarray(scores), key), got, atol=0)
  np.testing.assert_array_equal(ev2.negatives(key)[0], negs)
  assert not np.array_equal(ev.negatives(jax.random.key(8))[0], negs)


def test_excluded_items_never_count():
  # Train items get the best scores and a held-out item the worst; only candidates are ranked.
  data = Interactions.from_rows("ex", 6, [[0, 1, 2]], [[]], [[3, 5]])
  scores = jnp.array([[9., 9., 9., 1., 5., 2.]], jnp.float32)
  got = metrics.evaluate(table_score, scores, data, ks=(1, 2, 10))
  # Candidates 3, 4, 5 ranked 4 (5.0), 5 (2.0), 3 (1.0): held ranks 2 and 3.
  l2 = math.log2
  assert_metrics_close(got, {
      "HR@1": 0., "Recall@1": 0., "NDCG@1": 0.,
      "HR@2": 1., "Recall@2": 0.5, "NDCG@2": (1 / l2(3)) / (1 + 1 / l2(3)),
      "HR@10": 1., "Recall@10": 1., "NDCG@10": (1 / l2(3) + 1 / l2(4)) / (1 + 1 / l2(3)),
      "MRR": 0.5})


def test_fewer_candidates_than_k_and_neg_inf_candidates():
  # Only items 4 (held, -inf) and 5 (-inf) are candidates; excluded items in the top_k list
  # must not count and -inf candidates still rank (ties by id: 4 before 5).
  data = Interactions.from_rows("few", 6, [[0, 1, 2]], [[3]], [[4]])
  scores = jnp.array([[9., 9., 9., 9., -jnp.inf, -jnp.inf]], jnp.float32)
  got = metrics.evaluate(table_score, scores, data, ks=(1, 10))
  assert_metrics_close(got, {"HR@1": 1., "Recall@1": 1., "NDCG@1": 1., "HR@10": 1.,
                             "Recall@10": 1., "NDCG@10": 1., "MRR": 1.})
  scores = jnp.array([[9., 9., 9., 9., -jnp.inf, 0.]], jnp.float32)
  got = metrics.evaluate(table_score, scores, data, ks=(1, 10))
  assert got["HR@1"] == 0. and got["HR@10"] == 1. and got["MRR"] == 0.5


def test_test_split_excludes_val_and_val_excludes_test():
  # Item 0 is the user's val item, item 1 its test item; both score above everything else.
  data = Interactions.from_rows("vt", 4, [[3]], [[0]], [[1]])
  scores = jnp.array([[10., 9., 1., 20.]], jnp.float32)
  test = metrics.evaluate(table_score, scores, data, "test", ks=(1,))
  assert test["HR@1"] == 1. and test["MRR"] == 1.
  val = metrics.evaluate(table_score, scores, data, "val", ks=(1,))
  assert val["HR@1"] == 1. and val["MRR"] == 1.
  # Without the exclusion the test item would rank 2nd.
  scores = jnp.array([[10., 9., 11., 20.]], jnp.float32)
  test = metrics.evaluate(table_score, scores, data, "test", ks=(1,))
  assert test["MRR"] == 0.5  # item 2 beats it; item 0 (val) does not count


def test_users_without_heldout_are_skipped_and_evaluate_wrapper():
  data = Interactions.from_rows("skip", 4, [[], [0], []], [[], [], []], [[1], [], [2, 3]])
  scores = jnp.array([[0., 5., 1., 1.], [0., 0., 0., 0.], [3., 2., 1., 0.]], jnp.float32)
  ev = metrics.Evaluator(data, ks=(1,), chunk_size=3)
  np.testing.assert_array_equal(ev.users, [0, 2])
  per_user = metrics.evaluate(table_score, scores, data, ks=(1,), per_user=True)
  np.testing.assert_allclose(per_user["MRR"], [1., 1 / 3])
  np.testing.assert_allclose(ev(table_score, scores)["MRR"], (1 + 1 / 3) / 2)
  empty = Interactions.from_rows("empty", 3, [[0]], [[1]], [[]])
  assert math.isnan(metrics.evaluate(table_score, jnp.zeros((1, 3)), empty)["MRR"])
  with pytest.raises(ValueError):
    metrics.Evaluator(data, "train")
  with pytest.raises(ValueError):
    metrics.Evaluator(data, protocol="loo")


def test_heldout_item_also_in_train_stays_a_candidate():
  data = Interactions.from_rows("overlap", 4, [[1, 2]], [[]], [[1]])
  scores = jnp.array([[3., 2., 9., 1.]], jnp.float32)
  got = metrics.evaluate(table_score, scores, data, ks=(1,))
  assert got["MRR"] == 0.5  # item 0 beats it; item 2 (train only) is excluded


# ---------------------------------------------------------------------------------------------
# The one-pass evaluation: bit for bit the previous metrics
# ---------------------------------------------------------------------------------------------

def exact_per_user(ev: metrics.Evaluator, scores: np.ndarray, exclude_other: bool
                   ) -> dict[str, np.ndarray]:
  """Per-user metrics from every held-out item's exact rank (numpy: stable argsort of -score
  over the candidates) through the library's `ranking_metrics_from_ranks` (as the previous
  path did, whose ranks agree wherever the metrics read them)."""
  data, split = ev.data, ev.split
  other = "val" if split == "test" else "test"
  ranks, valid = np.zeros((ev.num_users, data.max_row_length(split)), np.int32), None
  valid = np.zeros(ranks.shape, bool)
  for j, u in enumerate(ev.users):
    held = row(data, split, u)
    excluded = set(row(data, "train", u)) | (set(row(data, other, u)) if exclude_other else set())
    cand = np.array([i for i in range(data.num_items) if i not in excluded or i in held])
    order = cand[np.argsort(-scores[u][cand], kind="stable")]
    ranks[j, :len(held)] = [1 + np.flatnonzero(order == h)[0] for h in held]
    valid[j, :len(held)] = True
  return {n: np.asarray(v) for n, v in metrics.ranking_metrics_from_ranks(
      jnp.asarray(ranks), jnp.asarray(valid), ev.ks).items()}


@pytest.mark.parametrize("exclude_other", [True, False])
def test_one_pass_evaluation_is_bit_identical_to_the_previous_path(exclude_other):
  data = random_data(11)
  evs = {s: metrics.Evaluator(data, s, ks=KS, chunk_size=8, exclude_other=exclude_other,
                              average="all") for s in ("val", "test")}
  joint = metrics.joint_evaluator(tuple(evs.values()))
  assert joint._shares == ((-1, -1) if exclude_other else (-1, 0))
  for special in (False, True):  # True: the chunks with NaN/inf scores take the fallback
    scores = jnp.asarray(tied_scores(12, special=special))
    both = joint.per_user(table_score, scores)
    for split, ev in evs.items():
      want = exact_per_user(ev, np.asarray(scores), exclude_other)
      for name in want:
        np.testing.assert_array_equal(both[split][name], want[name], err_msg=f"{split} {name}")
    means = metrics.evaluate_splits(evs, table_score, scores)  # the same (cached) evaluator
    assert means == {s: ev.means(both[s]) for s, ev in evs.items()}
    if not exclude_other:  # one split alone: its own program, the same numbers
      assert evs["test"](table_score, scores) == means["test"]


@pytest.mark.parametrize("seed", [0])
def test_fast_full_ranks_equal_full_ranks_where_defined(seed):
  rng = np.random.default_rng(seed)
  data = random_data(seed)
  scores = (rng.integers(0, 3, size=(NUM_USERS, NUM_ITEMS)) * 0.5).astype(np.float32)
  scores[:, rng.random(NUM_ITEMS) < 0.2] = -0.0  # -0.0 ties +0.0
  ev = metrics.Evaluator(data, "test", ks=(5,), chunk_size=NUM_USERS)
  users = jnp.asarray(ev.users)
  pos = ranking.chunk_positions(ev.users, len(ev.users), NUM_ITEMS, ev._excluded_np,
                                ev._held_np)[0]
  split = dict(flat=jnp.asarray(pos), held=ev._held, excluded=ev._excluded, share=-1)
  both = jax.jit(lambda s: (metrics.fast_full_ranks(s, users, [split], 5)[0],
                            metrics.full_ranks(s, users, ev._excluded, ev._held, 5)))
  (got, valid), (want, valid2) = both(jnp.asarray(scores)[users])
  got, want, valid = np.asarray(got), np.asarray(want), np.asarray(valid)
  np.testing.assert_array_equal(valid, np.asarray(valid2))
  top = valid & (want <= 5)
  np.testing.assert_array_equal(got[top], want[top])
  assert (got[valid & ~top] > 5).all()
  big = np.where(valid, want, 10**9).min(axis=1)
  np.testing.assert_array_equal(np.where(valid, got, 10**9).min(axis=1), big)  # MRR's rank


def test_fast_full_ranks_count_special_candidates_without_fallback():
  # The held-out item (7, score 0) ranks beyond k = 2, so its row needs no list and the count
  # alone decides: +inf before it, NaN and -inf after, 0.0 / -0.0 ties by id, train excluded.
  nan, inf = np.nan, np.inf
  scores = np.array([[9., 8., inf, nan, -inf, 0.0, -0.0, 0.0, 0.0, -0.0, 1., -1., nan, inf, -5.,
                      0.5]], np.float32)
  data = Interactions.from_rows("sp", 16, [[0, 1, 13]], [[]], [[7]])
  ev = metrics.Evaluator(data, "test", ks=(2,))
  users = jnp.asarray(ev.users)
  pos = ranking.chunk_positions(ev.users, 1, 16, ev._excluded_np, ev._held_np)[0]
  split = dict(flat=jnp.asarray(pos), held=ev._held, excluded=ev._excluded, share=-1)
  (got, _), = jax.jit(lambda s: metrics.fast_full_ranks(s, users, [split], 2))(scores)
  # Before item 7: 2 (inf), 10 (1.), 15 (0.5), 5 and 6 (0.0 / -0.0, lower ids): rank 6.
  assert int(got[0, 0]) == 6
  _, want = reference_full(data, scores, "test", (2,))
  assert math.isclose(1 / 6, want["MRR"][0])
