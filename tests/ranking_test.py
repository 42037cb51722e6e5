"""Tests for kdrec_jax.ranking (ranks, searches, samplers) and the BD sampler built on them.

The statistical tests use fixed PRNG keys, so they are deterministic; their thresholds are the
0.999 quantiles of the chi-square distribution (a correct sampler fails one with probability
1e-3 for a fresh key, and never for these fixed keys once it passed).
"""
from __future__ import annotations

import functools

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdrec_jax import methods, models, ranking, sparse
from kdrec_jax.data.interactions import Interactions
from kdrec_jax.methods import bd

# scipy.stats.chi2.ppf(0.999, dof) for dof = 1..40, rounded to 3 decimals (scipy 1.x).
CHI2_999 = {
    1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
    9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123, 15: 37.697,
    16: 39.252, 17: 40.790, 18: 42.312, 19: 43.820, 20: 45.315, 21: 46.797, 22: 48.268,
    23: 49.728, 24: 51.179, 25: 52.620, 26: 54.052, 27: 55.476, 28: 56.892, 29: 58.301,
    30: 59.703, 31: 61.098, 32: 62.487, 33: 63.870, 34: 65.247, 35: 66.619, 36: 67.985,
    37: 69.346, 38: 70.703, 39: 72.055, 40: 73.402,
}


def assert_frequencies(draws: np.ndarray, weights: np.ndarray) -> None:
  """Draws (item ids) follow weights/sum: zero-weight items never drawn, chi-square below the
  0.999 quantile."""
  weights = np.asarray(weights, np.float64)
  draws = np.asarray(draws).ravel()
  counts = np.bincount(draws, minlength=len(weights))
  assert len(counts) == len(weights), "drew an out-of-range item"
  zero = weights == 0
  assert counts[zero].sum() == 0, f"drew zero-weight items {np.flatnonzero(zero & (counts > 0))}"
  expected = len(draws) * weights[~zero] / weights.sum()
  assert expected.min() >= 5, "test too small for a chi-square approximation"
  stat = float(np.sum((counts[~zero] - expected) ** 2 / expected))
  dof = int((~zero).sum()) - 1
  if dof == 0:
    return
  assert stat < CHI2_999[dof], f"chi-square {stat:.2f} >= {CHI2_999[dof]} (dof {dof})"


def assert_ordered_pairs(draws: np.ndarray, weights: np.ndarray) -> None:
  """Rows of two draws without replacement, successively ∝ weights: each ordered pair (a, b)
  has probability p_a p_b / (1 - p_a); chi-square below the 0.999 quantile."""
  p = np.asarray(weights, np.float64) / np.sum(weights)
  m = len(p)
  draws = np.asarray(draws)
  assert draws.shape[1] == 2 and np.all(draws[:, 0] != draws[:, 1]), "repeated an item"
  counts = np.bincount(draws[:, 0] * m + draws[:, 1], minlength=m * m).reshape(m, m)
  probs = p[:, None] * p[None, :] / (1 - p[:, None])
  np.fill_diagonal(probs, 0.0)
  live = probs > 0
  assert counts[~live].sum() == 0
  expected = len(draws) * probs[live]
  assert expected.min() >= 5, "test too small for a chi-square approximation"
  stat = float(np.sum((counts[live] - expected) ** 2 / expected))
  dof = int(live.sum()) - 1
  assert stat < CHI2_999[dof], f"chi-square {stat:.2f} >= {CHI2_999[dof]} (dof {dof})"


def np_ranks(scores: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
  """Reference: stable argsort of -scores, ranks 1..N, excluded items last and then set to 0."""
  scores = np.asarray(scores, np.float64)
  if exclude is not None:
    scores = np.where(exclude, -np.inf, scores)
  order = np.argsort(-scores, axis=1, kind="stable")
  out = np.zeros(scores.shape, np.int64)
  np.put_along_axis(out, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
  if exclude is not None:
    out[exclude] = 0
  return out


# ---------------------------------------------------------------------------------------------
# ranks and orders
# ---------------------------------------------------------------------------------------------

def tied_scores(rows=9, n=37, seed=0):
  rng = np.random.default_rng(seed)
  scores = rng.integers(-3, 4, size=(rows, n)).astype(np.float32) * 0.5  # many ties
  scores[0] = 1.0  # a row of one value: order is by id
  scores[1, :5] = np.array([1e30, -1e30, 7.25, -7.25, 0.001], np.float32)
  exclude = rng.random((rows, n)) < 0.3
  exclude[2] = True  # everything excluded
  exclude[3] = False
  return scores, exclude


@pytest.mark.slow
@pytest.mark.parametrize("use_x64", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_ranks_match_numpy(use_x64, use_jit):
  scores, exclude = tied_scores()
  fn = jax.jit(ranking.ranks) if use_jit else ranking.ranks
  if use_x64:
    with ranking.x64():
      got = fn(jnp.asarray(scores), jnp.asarray(exclude))
      got_all = fn(jnp.asarray(scores))
  else:
    got = fn(jnp.asarray(scores), jnp.asarray(exclude))
    got_all = fn(jnp.asarray(scores))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np_ranks(scores, exclude))
  np.testing.assert_array_equal(np.asarray(got_all), np_ranks(scores))
  # Excluded items get 0 and the rest ranks 1..N-|excluded|.
  for r, ex in zip(np.asarray(got), exclude):
    assert np.all(r[ex] == 0)
    np.testing.assert_array_equal(np.sort(r[~ex]), np.arange(1, (~ex).sum() + 1))


def test_ranks_identical_with_and_without_x64():
  rng = np.random.default_rng(5)
  scores = rng.normal(size=(16, 200)).astype(np.float32)
  scores[:, ::3] = np.round(scores[:, ::3]) + 0.0  # ties
  scores[:, 7] = -scores[:, 8]  # negative numbers exercise the sign-flip key
  exclude = rng.random(scores.shape) < 0.1
  plain = jax.jit(ranking.ranks)(jnp.asarray(scores), jnp.asarray(exclude))
  with ranking.x64():
    packed = jax.jit(ranking.ranks)(jnp.asarray(scores), jnp.asarray(exclude))
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(packed))
  np.testing.assert_array_equal(np.asarray(plain), np_ranks(scores, exclude))


@pytest.mark.slow
@pytest.mark.parametrize("use_x64", [False, True])
def test_descending_order_matches_stable_argsort(use_x64):
  scores, _ = tied_scores(rows=5, n=23, seed=3)
  expected = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")
  if use_x64:
    with ranking.x64():
      got = jax.jit(ranking.descending_order)(jnp.asarray(scores))
  else:
    got = jax.jit(ranking.descending_order)(jnp.asarray(scores))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), expected)
  # Batched leading dims too.
  got3 = ranking.descending_order(jnp.asarray(scores.reshape(5, 1, 23)))
  np.testing.assert_array_equal(np.asarray(got3).reshape(5, 23), expected)


@pytest.mark.slow
def test_ranks_special_values_follow_stable_argsort():
  scores = np.array([[0.0, -0.0, 0.0, np.nan, 1.0, -np.inf]], np.float32)
  # numpy: 1.0 first, then the three zeros by id, then -inf, NaN last.
  np.testing.assert_array_equal(np_ranks(scores), [[2, 3, 4, 6, 1, 5]])
  np.testing.assert_array_equal(np.asarray(ranking.ranks(jnp.asarray(scores))),
                                np_ranks(scores))


@pytest.mark.slow
@pytest.mark.parametrize("buckets", [1, 3, 64, 8192])
def test_histogram_ranks_within_their_bound(buckets):
  """Every approximate rank is within its returned bound of the exact rank; the bound is half
  the item's bin occupancy, so a row of distinct, well-spread scores is ranked exactly."""
  scores, exclude = tied_scores(rows=9, n=300, seed=1)
  scores[4] = np.random.default_rng(2).normal(size=300)
  scores[5, :4] = [np.inf, -np.inf, np.nan, 3.0]
  exact = np_ranks(np.where(np.isnan(scores), -np.inf, scores), exclude)
  exact[5] = np.asarray(ranking.ranks(jnp.asarray(scores[5:6]), jnp.asarray(exclude[5:6])))[0]
  got, bound = (np.asarray(x) for x in jax.jit(ranking.histogram_ranks, static_argnums=2)(
      jnp.asarray(scores), jnp.asarray(exclude), buckets))
  assert got.dtype == bound.dtype == np.int32
  assert np.all(np.abs(got - exact) <= bound)
  assert np.all(got[exclude] == 0) and np.all(bound[exclude] == 0)
  assert np.all(got[~exclude] >= 1) and np.all(got[~exclude] <= (~exclude).sum(1)[:, None]
                                                .repeat(300, 1)[~exclude])
  # The bound is half the occupancy: a lone item is exact, the constant row 0 shares one bin.
  np.testing.assert_array_equal(bound[0][~exclude[0]], (~exclude[0]).sum() // 2)
  if buckets == 8192:  # 300 normal scores in 8192 bins: mostly alone
    assert np.mean(bound[4] == 0) > 0.9 and np.all(np.abs(got[4] - exact[4]) <= 1)


@pytest.mark.slow
def test_bd_histogram_ranks_bound_the_weight_error():
  """BD's weights from histogram ranks: the student's differ by at most eps_t times the two
  ranks' bounds, the teacher's by a factor within exp(+-eps_e times them)."""
  rng = np.random.default_rng(3)
  s_t, s_s = (jnp.asarray(rng.normal(size=(16, 2000)), jnp.float32) for _ in range(2))
  exclude = jnp.asarray(rng.random((16, 2000)) < 0.05)
  eps_t, eps_e = 1e-2, 1e-4
  exact = bd.discrepancy_weights(ranking.ranks(s_t, exclude), ranking.ranks(s_s, exclude),
                                 eps_t, eps_e)
  (r_t, b_t), (r_s, b_s) = (ranking.histogram_ranks(s, exclude, 512) for s in (s_t, s_s))
  approx = bd.discrepancy_weights(r_t, r_s, eps_t, eps_e)
  err = np.asarray(b_t + b_s, np.float64)
  assert err.max() >= 1  # a non-trivial test: some bins hold several items
  np.testing.assert_array_less(np.abs(np.asarray(approx[0]) - np.asarray(exact[0])),
                               eps_t * err + 1e-6)
  ratio = np.asarray(approx[1], np.float64) / np.where(exclude, 1.0, np.asarray(exact[1]))
  np.testing.assert_array_less(np.abs(np.log(np.where(exclude, 1.0, ratio))),
                               eps_e * err + 1e-6)


# ---------------------------------------------------------------------------------------------
# top-k: exact against numpy's stable argsort
# ---------------------------------------------------------------------------------------------

TOPK_ROWS, TOPK_N = 6, 48
TOPK_KS = (1, 12, 40, 48)  # 48 = the row length


@functools.lru_cache(maxsize=None)
def _top_k_fn(k, method, x64):
  fn = jax.jit(lambda key: ranking.top_k_keys(key, k, method))
  if not x64:
    return fn

  def with_x64(key):
    with ranking.x64():
      return fn(key)
  return with_x64


def _hyp_scores(data):
  """Rows with many ties (a few integer levels), -inf exclusions and the odd special value."""
  levels = data.draw(st.integers(1, 6))
  ints = data.draw(hnp.arrays(np.int8, (TOPK_ROWS, TOPK_N), elements=st.integers(0, levels)))
  scores = ints.astype(np.float32) * data.draw(st.sampled_from([1.0, -0.5, 1e-30, 3e30]))
  excluded = data.draw(hnp.arrays(np.bool_, (TOPK_ROWS, TOPK_N)))
  if data.draw(st.booleans()):  # special values in some entries
    special = data.draw(hnp.arrays(np.int8, (TOPK_ROWS, TOPK_N), elements=st.integers(0, 9)))
    values = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0], np.float32)
    scores = np.where(special < 5, values[np.minimum(special, 4)], scores)
  return scores, excluded


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(st.data())
def test_top_k_keys_property_matches_stable_argsort(data):
  scores, excluded = _hyp_scores(data)
  masked = np.where(excluded, -np.inf, scores)
  key = ranking.order_key(jnp.asarray(masked))
  order = np.argsort(-masked, axis=1, kind="stable")  # NaN last; -0.0 ties +0.0
  k = data.draw(st.sampled_from(TOPK_KS))
  method = data.draw(st.sampled_from(["lax", "threshold"]))
  got = np.asarray(_top_k_fn(k, method, data.draw(st.booleans()))(key))
  np.testing.assert_array_equal(got, order[:, :k])


def test_top_k_threshold_fast_path_and_fallback_are_exact():
  rng = np.random.default_rng(3)
  n, k, cap = 1024, 150, 320  # cap: top_k_keys' for this k
  scores = rng.normal(size=(16, n)).astype(np.float32)
  scores[1] = np.round(scores[1], 1)  # ties at the k-th value, within the cap
  scores[2, :] = 1.0  # all tied: no threshold isolates k..cap items, so the chunk falls back
  excluded = rng.random((16, n)) < 0.2
  masked = np.where(excluded, -np.inf, scores)
  want = np.argsort(-masked, axis=1, kind="stable")[:, :k]
  key = ranking.order_key(jnp.asarray(masked))
  fn = jax.jit(lambda key: ranking.top_k_keys(key, k, "threshold"))
  np.testing.assert_array_equal(np.asarray(fn(key)), want)  # with the fallback (row 2)
  np.testing.assert_array_equal(np.asarray(fn(key[3:])), want[3:])  # the fast path alone
  t, done = jax.jit(lambda key: ranking._threshold_keys(key, k, cap, 24))(key[3:])
  assert np.asarray(done).all()
  counts = np.sum(np.asarray(key[3:]) >= np.asarray(t)[:, None], axis=1)
  assert ((counts >= k) & (counts <= cap)).all()
  # Under vmap (N runs as one program) each run takes its own path, exactly: run 0 holds the
  # chunk that needs the fallback, run 1 one that does not.
  both = jnp.stack([key[:8], key[8:]])
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(fn))(both)).reshape(16, k), want)


@functools.lru_cache(maxsize=None)
def _at_ranks_fn(width, x64):
  fn = jax.jit(lambda key, ranks: ranking.keys_at_ranks(key, ranks, width))
  if not x64:
    return fn

  def with_x64(key, ranks):
    with ranking.x64():
      return fn(key, ranks)
  return with_x64


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(st.data())
def test_keys_at_ranks_property_matches_stable_argsort(data):
  """Rows it answers (`done`) hold exactly the stable argsort's items at the ranks, ties, -inf,
  NaN and ranks up to the row length included; a row whose ranked items score finite values,
  each tied with at most width / 2 keys, is always answered (a band needs a finite threshold
  on both sides)."""
  scores, excluded = _hyp_scores(data)
  masked = np.where(excluded, -np.inf, scores)
  key = ranking.order_key(jnp.asarray(masked))
  order = np.argsort(-masked, axis=1, kind="stable")
  ranks = data.draw(hnp.arrays(np.int32, (TOPK_ROWS, 3), elements=st.integers(0, TOPK_N - 1)))
  width = data.draw(st.sampled_from([4, 16, 64]))
  ids, done = _at_ranks_fn(width, data.draw(st.booleans()))(key, jnp.asarray(ranks))
  ids, done = np.asarray(ids), np.asarray(done)
  want = np.take_along_axis(order, ranks, axis=1)
  np.testing.assert_array_equal(ids[done], want[done])
  # The band around a rank holds at most `width` keys unless that many tie there.
  k = np.asarray(key).astype(np.int64)
  at = np.take_along_axis(k, want, axis=1)
  ties = np.array([[np.sum(k[r] == at[r, j]) for j in range(3)] for r in range(TOPK_ROWS)])
  finite = np.isfinite(np.take_along_axis(masked, want, axis=1))
  assert done[((ties <= width // 2) & finite).all(axis=1)].all()


def test_keys_at_ranks_on_long_rows_and_its_counts():
  rng = np.random.default_rng(4)
  n = 5000
  scores = rng.normal(size=(32, n)).astype(np.float32)
  scores[:4] = np.round(scores[:4], 2)  # ties (fewer than the width) around most ranks
  scores[4:8] = rng.exponential(size=(4, n)) * 1e-20  # tiny, skewed scores
  masked = np.where(rng.random((32, n)) < 0.1, -np.inf, scores)
  key = ranking.order_key(jnp.asarray(masked))
  ranks = np.concatenate([rng.integers(0, 30, (32, 1)), rng.integers(0, 3000, (32, 1)),
                          rng.integers(0, 4000, (32, 1))], axis=1).astype(np.int32)
  ids, done = jax.jit(lambda k, r: ranking.keys_at_ranks(k, r, 64, bound=4000))(
      key, jnp.asarray(ranks))
  assert np.asarray(done).all()
  want = np.take_along_axis(np.argsort(-masked, axis=1, kind="stable"), ranks, axis=1)
  np.testing.assert_array_equal(np.asarray(ids), want)
  t = jnp.asarray(np.asarray(key)[:, [7, 100, 2500]])
  got = jax.jit(ranking._counts_at)(key, t)
  want = (np.asarray(key)[:, None, :] >= np.asarray(t)[:, :, None]).sum(-1)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_only_if_runs_its_branch_per_run_under_vmap():
  """`only_if` = `fn(*args) if pred else otherwise`, run by run under vmap and unbatched. (That
  it skips `fn` when no run needs it is a speed property: benchmarks/REPORT.md.)"""
  fn = jax.vmap(lambda p, x: ranking.only_if(p, lambda y: y * 10, x + 1, x))
  got = fn(jnp.array([True, False, True]), jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_array_equal(np.asarray(got), [10.0, 3.0, 30.0])
  one = jax.jit(lambda p, x: ranking.only_if(p, lambda y: y * 10, x + 1, x))
  assert float(one(True, 2.0)) == 20.0 and float(one(False, 2.0)) == 3.0


def test_key_floats_order_every_key_like_the_ints():
  keys = np.array([ranking.EXCLUDED_KEY, ranking.EXCLUDED_KEY + 1, -2139095042, -2139095041,
                   -5, -1, 0, 1, 7, 2139095040, 2139095041, 2**31 - 1], np.int32)
  rng = np.random.default_rng(0)
  row = rng.permutation(np.concatenate([keys, keys[::2]]))[None, :]
  _, idx = jax.lax.top_k(ranking.key_floats(jnp.asarray(row)), row.shape[1])
  np.testing.assert_array_equal(np.asarray(idx)[0], np.argsort(-row[0].astype(np.int64),
                                                               kind="stable"))


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
@hypothesis.given(hnp.arrays(np.bool_, (5, 70)), st.sampled_from([1, 16, 40, 70]))
def test_compact_rows_matches_flatnonzero(mask, cap):
  ids, count = jax.jit(ranking.compact_rows, static_argnums=1)(jnp.asarray(mask), cap)
  for r in range(5):
    want = np.flatnonzero(mask[r])[:cap]
    np.testing.assert_array_equal(np.asarray(ids)[r, :len(want)], want)
    assert (np.asarray(ids)[r, len(want):] == 70).all() and int(count[r]) == mask[r].sum()


def test_chunk_positions_and_top_lists_match_numpy():
  rng = np.random.default_rng(5)
  u, n, m = 11, 40, 9
  rows = [rng.choice(n, rng.integers(0, 35), replace=False) for _ in range(u)]
  rows[3] = np.arange(n - 4)  # fewer unobserved items than m: invalid slots
  data = Interactions.from_rows("t", n, rows, [[]] * u, [[]] * u)
  indptr, indices = data.split("train")
  pos = ranking.chunk_positions(np.arange(12) % u, 4, n, (indptr, indices))
  for c in range(3):
    got = set(pos[c][pos[c] < 4 * n].tolist())
    want = {r * n + i for r in range(4) for i in rows[(4 * c + r) % u]}
    assert got == want
  scores = np.round(rng.normal(size=(u, n)), 1).astype(np.float32)
  train = sparse.DeviceCSR.from_numpy(indptr, indices)
  params = jnp.asarray(scores)
  lists = ranking.TopLists(lambda p, users: p[users], train, u, n, m, chunk=4)
  table = jax.jit(lists.build)(params)
  excl = np.zeros((u, n), bool)
  for r in range(u):
    excl[r, rows[r]] = True
  masked = np.where(excl, -np.inf, scores)
  want = np.argsort(-masked, axis=1, kind="stable")[:, :m]
  np.testing.assert_array_equal(np.asarray(table["items"]), want)
  np.testing.assert_array_equal(np.asarray(table["valid"]), ~np.take_along_axis(excl, want, 1))
  assert not np.asarray(table["valid"])[3, 4:].any()
  items, valid = jax.jit(lambda p: lists.all_rows({}, p, lambda us, it, va: (it, va)))(params)
  np.testing.assert_array_equal(np.asarray(items), want)
  it2, va2 = lists.compute(params, jnp.arange(u))  # the row_mask path, for any users
  np.testing.assert_array_equal(np.asarray(it2), want)
  np.testing.assert_array_equal(np.asarray(va2), np.asarray(valid))


def test_top_lists_at_positions_select_equals_pool():
  """Draws by position from the pools (`method='pool'`) and by selection (`'select'`, chunks
  falling back where a row's valid slots are no prefix or a rank's ties exceed the band) are the
  same items, and the items of `build`'s rows at those positions."""
  rng = np.random.default_rng(6)
  u, n, m = 150, 2000, 300
  rows = [rng.choice(n, rng.integers(0, 40), replace=False) for _ in range(u)]
  rows[3] = np.arange(n - 100)  # fewer unobserved items than m: a prefix of valid slots
  data = Interactions.from_rows("t", n, rows, [[]] * u, [[]] * u)
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  scores = rng.normal(size=(u, n)).astype(np.float32)
  # Chunks of 64 users: chunk 0 selects (row 3 included); chunks 1 and 2 fall back.
  scores[70, :5] = -np.inf  # a -inf item that is not excluded: valid slots may be no prefix
  scores[71, :5] = np.nan
  scores[130] = 1.0  # more ties than a band holds
  lists = ranking.TopLists(lambda p, users: p[users], train, u, n, m, chunk=128)
  log_probs = jnp.asarray(np.log(np.linspace(1.0, 0.5, m)), jnp.float32)

  def choose(key):
    return lambda users, valid: ranking.gumbel_top_k_rows(
        ranking.per_user_keys(key, users), jnp.where(valid, log_probs, -jnp.inf), 2)

  table = jax.jit(lists.build)(jnp.asarray(scores))
  for seed in range(3):
    key = jax.random.key(seed)
    runs = {method: jax.jit(lambda p, method=method: lists.at_positions(
        {}, p, choose(key), method))(jnp.asarray(scores)) for method in ("pool", "select")}
    for got in runs.values():
      for a, b in zip(got, runs["pool"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stored = lists.at_positions(table, None, choose(key))  # from the table
    for a, b in zip(stored, runs["pool"]):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Two runs as one program (the second with the tied rows): each run's own result.
  both = jnp.stack([jnp.asarray(scores), jnp.asarray(scores[::-1])])
  vmapped = jax.jit(jax.vmap(lambda p: lists.at_positions({}, p, choose(key), "select")))(both)
  for r in range(2):
    single = jax.jit(lambda p: lists.at_positions({}, p, choose(key), "pool"))(both[r])
    for a, b in zip(vmapped, single):
      np.testing.assert_array_equal(np.asarray(a)[r], np.asarray(b))


# ---------------------------------------------------------------------------------------------
# searchsorted_rows
# ---------------------------------------------------------------------------------------------

def _cdf_queries(n, seed):
  """A cdf [4, n] with repeated values (zero weights, trailing zeros) and queries below each
  row's total, exact cdf values included."""
  rng = np.random.default_rng(seed)
  w = rng.integers(0, 3, size=(4, n)).astype(np.float32)
  w[:, -1] = np.where(rng.random(4) < 0.5, 0.0, w[:, -1])
  w[:, 0] = 1.0  # every row has a positive total
  cdf = np.cumsum(w, axis=1)
  rows, values = [], []
  for r in range(4):
    total = cdf[r, -1]
    qs = [0.0, *cdf[r][cdf[r] < total], *(rng.random(20) * total)]
    rows += [r] * len(qs)
    values += qs
  return cdf, np.asarray(rows, np.int32), np.asarray(values, np.float32)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 33])
def test_searchsorted_rows_matches_numpy(n):
  cdf, rows, values = _cdf_queries(n, seed=n)
  got = jax.jit(ranking.searchsorted_rows)(jnp.asarray(cdf), jnp.asarray(rows),
                                           jnp.asarray(values))
  expected = np.array([np.searchsorted(cdf[r], v, side="right") for r, v in zip(rows, values)])
  assert expected.max() <= n - 1
  np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 9, 32, 33])
def test_searchsorted_rows_at_total_clamps(n):
  """value >= the row total returns N-1, as documented (N = 1 and non-powers of two included)."""
  cdf = np.cumsum(np.ones((3, n), np.float32), axis=1)
  values = jnp.asarray(cdf[:, -1] + np.array([0.0, 0.5, 100.0], np.float32))
  got = ranking.searchsorted_rows(jnp.asarray(cdf), jnp.arange(3), values)
  np.testing.assert_array_equal(np.asarray(got), [n - 1] * 3)


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------

WEIGHTS = np.array([[0.0, 3.0, 1.0, 0.0, 0.5, 2.0, 0.0, 1.5, 1.0, 0.0],
                    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0],
                    [0.0] * 10], np.float32)


@pytest.mark.slow
def test_sample_from_cdf_frequencies():
  cdf = jnp.asarray(np.cumsum(WEIGHTS, axis=1))
  rows = jnp.array([0, 2, 0, 1, 2, 0, 1, 0], jnp.int32)
  keys = jax.random.split(jax.random.key(0), len(rows))
  items, valid = jax.jit(ranking.sample_from_cdf, static_argnums=3)(keys, cdf, rows, 50_000)
  items, valid = np.asarray(items), np.asarray(valid)
  assert items.shape == (8, 50_000) and items.dtype == np.int32
  np.testing.assert_array_equal(valid, [True, False, True, True, False, True, True, True])
  assert np.all(items[~valid] == 0)
  rows = np.asarray(rows)
  assert_frequencies(items[rows == 0], WEIGHTS[0])
  assert_frequencies(items[rows == 1], WEIGHTS[1])


def test_weights_cdf_is_monotone_and_gives_zero_weights_no_interval():
  """At CiteULike's catalogue size, with 40% zero weights (BD's masked positives and eps-clipped
  items): the table is non-decreasing, flat across every zero-weight item, and the cumulative sum
  up to float32 error. (A plain float32 jnp.cumsum on CPU is not monotone at this size.)"""
  rng = np.random.default_rng(5)
  w = rng.exponential(size=(8, 16_980)).astype(np.float32) * (rng.random((8, 16_980)) > 0.4)
  cdf = np.asarray(jax.jit(ranking.weights_cdf)(jnp.asarray(w)))
  step = np.diff(cdf, axis=1, prepend=0)
  assert np.all(step >= 0)
  assert np.all(step[w == 0] == 0)
  np.testing.assert_allclose(cdf, np.cumsum(w.astype(np.float64), axis=1), rtol=1e-4)


@pytest.mark.slow
def test_sample_from_cdf_never_draws_zero_weight_items():
  """Draws at the top of the range (u * total rounds up to total) and everywhere else never
  land on a zero-weight item, interior or trailing."""
  w = np.zeros((2, 64), np.float32)
  w[0, [3, 10, 11]] = [1.0, 2.0 ** -20, 5.0]
  w[1, 0] = 3.0
  cdf = jax.jit(ranking.weights_cdf)(jnp.asarray(w))
  rows = jnp.array([0, 1], jnp.int32)
  items, valid = jax.jit(ranking.sample_from_cdf, static_argnums=3)(
      jax.random.split(jax.random.key(4), 2), cdf, rows, 200_000)
  items = np.asarray(items)
  assert np.asarray(valid).all()
  assert set(np.unique(items[0])) <= {3, 10, 11} and set(np.unique(items[1])) == {0}
  np.testing.assert_allclose(np.mean(items[0] == 11), 5 / 6, atol=0.005)


@pytest.mark.slow
def test_sample_from_weights_frequencies():
  weights = jnp.asarray(WEIGHTS[[0, 2, 1, 0]])
  keys = jax.random.split(jax.random.key(1), 4)
  items, valid = jax.jit(ranking.sample_from_weights, static_argnums=2)(keys, weights, 100_000)
  items, valid = np.asarray(items), np.asarray(valid)
  assert items.shape == (4, 100_000) and items.dtype == np.int32
  np.testing.assert_array_equal(valid, [True, False, True, True])
  assert np.all(items[1] == 0)
  assert_frequencies(items[[0, 3]], WEIGHTS[0])
  assert_frequencies(items[2], WEIGHTS[1])
  # Different keys for the two rows of the same weights give different draws.
  assert np.any(items[0] != items[3])


def test_sparse_contains_matches_python_sets():
  """The membership test behind uniform_negatives, on rows of many lengths (0, 1, powers of two
  and their neighbours), with queries inside, between, below and above each row's items."""
  rng = np.random.default_rng(8)
  num_items = 50
  rows = [np.sort(rng.choice(num_items, k, replace=False))
          for k in (0, 1, 2, 3, 4, 7, 8, 9, 16, 17, 33, 50)]
  indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
  csr = sparse.DeviceCSR.from_numpy(indptr, np.concatenate(rows))
  users = np.repeat(np.arange(len(rows)), num_items + 2).astype(np.int32)
  items = np.tile(np.arange(-1, num_items + 1), len(rows)).astype(np.int32)
  got = np.asarray(jax.jit(sparse.contains)(csr, jnp.asarray(users), jnp.asarray(items)))
  expected = np.array([i in set(rows[u].tolist()) for u, i in zip(users, items)])
  np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_uniform_negatives_avoid_positives_and_are_uniform():
  num_items = 40
  # the third user has 62% of the items: rejection sampling with a few tries returned one of
  # them ~2% of the time; the sampler is exact, so positives never appear
  rows = [np.array([3, 17]), np.array([], np.int64),
          np.sort(np.random.default_rng(1).choice(num_items, 25, replace=False))]
  indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
  csr = sparse.DeviceCSR.from_numpy(indptr, np.concatenate(rows))
  n = 60_000
  users = jnp.asarray(np.repeat(np.arange(3), n).astype(np.int32))
  keys = jax.random.split(jax.random.key(2), 3 * n)
  fn = jax.jit(ranking.uniform_negatives, static_argnums=(3,))
  neg = np.asarray(fn(keys, users, csr, num_items)).reshape(3, n)
  for u, pos in enumerate(rows):
    weights = np.ones(num_items)
    weights[pos] = 0.0
    assert_frequencies(neg[u], weights)


def test_gumbel_top_k_distinct_and_first_draw_categorical():
  w = np.array([0.0, 1.0, 4.0, 2.0, 0.0, 3.0, 0.5], np.float32)
  log_w = np.where(w > 0, np.log(np.where(w > 0, w, 1)), -np.inf).astype(np.float32)
  rows = 100_000
  got = np.asarray(jax.jit(ranking.gumbel_top_k, static_argnums=2)(
      jax.random.key(3), jnp.asarray(np.broadcast_to(log_w, (rows, 7))), 4))
  assert got.shape == (rows, 4)
  s = np.sort(got, axis=1)
  assert np.all(s[:, 1:] != s[:, :-1]), "items repeated within a row"
  assert not np.isin(got, [0, 4]).any(), "drew a zero-weight item while k <= #positive"
  assert_frequencies(got[:, 0], w)  # the first pick is a categorical draw (Gumbel-max)


# ---------------------------------------------------------------------------------------------
# the BD sampler, end to end
# ---------------------------------------------------------------------------------------------

def bd_setup(model="bpr_mf", **overrides):
  """BD on 6 users x 12 items with a `model` teacher (size 4) and student (size 3)."""
  train = [[0, 1, 2], [3, 4], [5, 6, 7, 0], [1, 8], [2, 9, 4, 11], [6]]
  val = [[3], [5], [], [9], [1], [7]]
  test = [[4], [6], [8], [], [3], [2]]
  data = Interactions.from_rows("tiny", 12, train, val, test)
  cfg = dict(name="bd", refresh_every=1, tau=5.0, lambda_ts=0.5, lambda_st=0.5, eps_t=0.3,
             eps_e=0.2, num_samples=2, rank_sign="paper", mask_positives=True,
             bpr_negative="uniform", table_budget_mb=2048, refresh_chunk=4)
  cfg.update(overrides)
  cfg = ml_collections.ConfigDict(cfg)
  fields = dict(init_std=1.0) if model == "bpr_mf" else dict(dropout=0.5)
  mods = {m: models.make(ml_collections.ConfigDict(dict(name=model, dim=d, **fields)),
                         data.num_users, data.num_items, data=data)
          for m, d in (("teacher", 4), ("student", 3))}
  method = methods.make(cfg, mods, data)
  snapshot = {"teacher": mods["teacher"].init(jax.random.key(10)),
              "student": mods["student"].init(jax.random.key(11))}
  return data, mods, method, snapshot, cfg


def refresh_cache(method, snapshot):
  """The method's cache after one refresh from `snapshot` (no static lists, no carry)."""
  return jax.jit(method.refresh)({}, snapshot, {}, jax.random.key(0), 0)[0]


def sample_batch(method, cache, users, keys):
  return jax.jit(lambda c, u, k: method.sample({"cache": c}, {"user": u}, k, None))(
      cache, users, keys)


def np_bd_weights(mods, data, snapshot, cfg, user):
  """BD's weights for one user from the models' scores, ranked in numpy."""
  indptr, indices = data.split("train")
  positives = np.zeros(data.num_items, bool)
  positives[indices[indptr[user]:indptr[user + 1]]] = True
  exclude = positives[None] if cfg.mask_positives else None
  def scores(m):
    s = np.asarray(mods[m].score_all(snapshot[m], jnp.array([user])))
    if cfg.get("positive_scores", "rank") == "zero":  # the notebooks' score x (1 - train mask)
      s = np.where(positives[None], 0.0, 1 / (1 + np.exp(-s)) if mods[m].name == "cdae" else s)
    return s

  ranks = {m: np_ranks(scores(m), exclude)[0].astype(np.float64) for m in ("teacher", "student")}
  d = ranks["student"] - ranks["teacher"]
  if cfg.rank_sign == "notebook":
    d = -d
  keep = (ranks["teacher"] > 0) & (ranks["student"] > 0)
  w_student = np.where(keep, np.tanh(np.maximum(cfg.eps_t * d, 0)), 0.0)
  w_teacher = np.where(keep, np.exp(-cfg.eps_e * d), 0.0)
  return w_student, w_teacher, positives


@pytest.mark.parametrize("mode", [
    dict(),                                      # tables (default budget)
    dict(table_budget_mb=0),                     # snapshot: ranks per batch
    dict(mask_positives=False, rank_sign="notebook"),
    dict(mask_positives=False, rank_sign="notebook", positive_scores="zero"),  # the notebooks
])
@pytest.mark.slow
def test_bd_sampler_frequencies(mode):
  data, mods, method, snapshot, cfg = bd_setup(**mode)
  with ranking.x64():
    state = refresh_cache(method, snapshot)
  if cfg.table_budget_mb == 0:
    assert set(state) == {"snapshot"}
  else:
    assert set(state) == {"table_student", "table_teacher"}
    assert state["table_student"].shape == (data.num_users, data.num_items)
  test_users = (0, 4)
  n = 30_000
  users = jnp.asarray(np.repeat(test_users, n).astype(np.int32))
  keys = jax.random.split(jax.random.key(4), len(users))
  samples = sample_batch(method, state, users, keys)
  for i, u in enumerate(test_users):
    w_student, w_teacher, positives = np_bd_weights(mods, data, snapshot, cfg, u)
    assert w_student.sum() > 0 and np.count_nonzero(w_student) >= 2  # a non-trivial test
    for learner, w in (("student", w_student), ("teacher", w_teacher)):
      items, valid = (np.asarray(x)[i * n:(i + 1) * n] for x in samples[learner])
      assert items.shape == (n, cfg.num_samples)
      assert valid.all()
      if cfg.mask_positives:
        assert not positives[items].any(), "sampled a training positive"
      assert_frequencies(items, w)


@pytest.mark.slow
def test_bd_draws_follow_the_weights():
  """'draws': the refresh pre-draws each training pair's BD items for every epoch of the period,
  i.i.d. from its user's weights; a step reads its pairs' row for its epoch."""
  data, mods, method, snapshot, cfg = bd_setup(sampling_state="draws", refresh_every=5)
  indptr, _ = data.split("train")
  keys = jax.random.split(jax.random.key(7), 1500)
  with ranking.x64():
    refresh = jax.jit(jax.vmap(lambda k: method.refresh({}, snapshot, {}, k, 10)[0]))
    caches = refresh(keys)
  assert set(caches) == {"draws_student", "draws_teacher", "draws_epoch"}
  assert caches["draws_student"].shape == (1500, data.num_train, 5, cfg.num_samples)
  for u in (0, 4):
    w_student, w_teacher, positives = np_bd_weights(mods, data, snapshot, cfg, u)
    for learner, w in (("student", w_student), ("teacher", w_teacher)):
      items = np.asarray(caches[f"draws_{learner}"])[:, indptr[u]:indptr[u + 1]]
      assert not positives[items].any(), "sampled a training positive"
      assert_frequencies(items, w)
  # A step at epoch 12 (period from 10) reads each pair's column 2.
  cache = jax.tree.map(lambda x: x[0], caches)
  examples = jnp.array([0, 5, 15], jnp.int32)
  view = {"cache": cache, "epoch": jnp.int32(12)}
  got = jax.jit(method.sample)(view, {"user": jnp.asarray(np.searchsorted(
      indptr, examples, side="right") - 1, jnp.int32), "example": examples},
      jax.random.split(jax.random.key(0), 3), None)
  for learner in ("student", "teacher"):
    np.testing.assert_array_equal(got[learner][0], cache[f"draws_{learner}"][examples, 2])
    assert np.all(np.asarray(got[learner][1]))


def test_bd_sampling_state_choice():
  """'auto': tables if they fit the budget and half the free memory, else pre-drawn items
  (pair batches with periodic refreshes), else the snapshot."""
  cfg = lambda **kw: ml_collections.ConfigDict(dict(  # noqa: E731
      dict(table_budget_mb=100, refresh_every=10, num_samples=1), **kw))
  choose = bd.choose_sampling_state
  # tables: 2 x 4 bytes x 1000 x 5000 = 38 MiB
  assert choose(cfg(), 1000, 5000, 20_000, False, free_mb=1e6) == "tables"
  assert choose(cfg(), 1000, 5000, 20_000, False, free_mb=60) == "draws"  # 30 MiB usable
  assert choose(cfg(table_budget_mb=10), 1000, 5000, 20_000, False, free_mb=1e6) == "draws"
  assert choose(cfg(table_budget_mb=10), 1000, 5000, 20_000, True, free_mb=1e6) == "snapshot"
  assert choose(cfg(table_budget_mb=10, refresh_every=0), 1000, 5000, 20_000, False,
                free_mb=1e6) == "snapshot"
  assert choose(cfg(table_budget_mb=1), 1000, 5000, 20_000, False, free_mb=1e6) == "snapshot"
  assert choose(cfg(sampling_state="snapshot"), 10, 10, 10, False) == "snapshot"
  with pytest.raises(ValueError, match="needs pair-batched models"):
    choose(cfg(sampling_state="draws"), 10, 10, 10, True)
  with pytest.raises(ValueError, match="sampling_state must be one of"):
    choose(cfg(sampling_state="table"), 10, 10, 10, False)
  assert bd.available_mb() > 0


def test_bd_positive_scores_needs_unmasked_positives():
  with pytest.raises(ValueError, match="needs mask_positives=False"):
    bd_setup(positive_scores="zero")
  with pytest.raises(ValueError, match="positive_scores must be one of"):
    bd_setup(mask_positives=False, positive_scores="zeros")


def test_bd_refresh_tables_hold_cumulative_weights():
  """The refresh's tables, row by row, are the cumulative numpy weights for every user."""
  data, mods, method, snapshot, cfg = bd_setup()
  with ranking.x64():
    tables = refresh_cache(method, snapshot)
  for u in range(data.num_users):
    w_student, w_teacher, _ = np_bd_weights(mods, data, snapshot, cfg, u)
    np.testing.assert_allclose(np.diff(np.asarray(tables["table_student"][u]), prepend=0),
                               w_student, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diff(np.asarray(tables["table_teacher"][u]), prepend=0),
                               w_teacher, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# dense per-item masks (user-batched models)
# ---------------------------------------------------------------------------------------------

def assert_inclusion(mask: np.ndarray, q: np.ndarray) -> None:
  """Rows of a 0/1 `mask` [n, N] include item i independently with probability q[i]: items with
  q = 0 never, q = 1 always, the rest within 4.5 binomial standard errors."""
  n = mask.shape[0]
  freq = mask.mean(axis=0)
  assert np.all(freq[q == 0] == 0) and np.all(freq[q == 1] == 1)
  mid = (q > 0) & (q < 1)
  z = (freq[mid] - q[mid]) / np.sqrt(q[mid] * (1 - q[mid]) / n)
  assert np.abs(z).max() < 4.5, (freq[mid], q[mid])


@pytest.mark.slow
def test_uniform_rows_are_uniform_and_keyed():
  keys = jax.random.split(jax.random.key(0), 64)
  u = np.asarray(ranking.uniform_rows(keys, 5000), np.float64)
  assert u.shape == (64, 5000) and u.min() >= 0 and u.max() < 1
  np.testing.assert_array_equal(u, np.asarray(ranking.uniform_rows(keys, 5000)))  # keyed
  assert not np.array_equal(u[0], u[1])
  counts = np.bincount((u * 20).astype(int).ravel(), minlength=20)
  expected = u.size / 20
  assert np.sum((counts - expected) ** 2 / expected) < CHI2_999[19]
  # No linear dependence between neighbouring columns or rows (|r| < 5 standard errors).
  se = 1 / np.sqrt(u.size)
  assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 5 * se
  assert abs(np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]) < 5 * se
  # Pairs of neighbouring columns fill a 5 x 5 grid evenly (a joint test of two coordinates).
  cells = (u[:, :-1:2] * 5).astype(int) * 5 + (u[:, 1::2] * 5).astype(int)
  counts = np.bincount(cells.ravel(), minlength=25)
  expected = cells.size / 25
  assert np.sum((counts - expected) ** 2 / expected) < CHI2_999[24]


def test_draws_mask_inclusion_frequencies():
  w = np.array([0.0, 1.0, 2.0, 3.0, 0.5, 10.0, 0.0, 4.0])
  n = 40_000
  weights = jnp.asarray(np.tile(w, (n, 1)), jnp.float32)
  keys = jax.random.split(jax.random.key(5), n)
  for k in (1, 3, 12):
    mask, valid = jax.jit(ranking.draws_mask)(keys, weights, jnp.full(n, k))
    assert np.all(np.asarray(valid))
    # The set of items hit by k draws with replacement: each item is in it w.p. 1 - (1-p)^k.
    assert_inclusion(np.asarray(mask), 1 - (1 - w / w.sum()) ** k)
    # The expected set size (what collapsing duplicates of k draws gives).
    p = w / w.sum()
    assert np.asarray(mask).sum(1).mean() == pytest.approx(np.sum(1 - (1 - p) ** k), rel=0.01)


@pytest.mark.slow
def test_draws_mask_edge_rows():
  weights = jnp.asarray([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
  draws = jnp.asarray([4, 1, 0, 5])
  mask, valid = ranking.draws_mask(jax.random.split(jax.random.key(1), 4), weights, draws)
  mask = np.asarray(mask)
  np.testing.assert_array_equal(np.asarray(valid), [False, True, True, True])
  np.testing.assert_array_equal(mask[0], [0, 0, 0])  # nothing to draw from
  np.testing.assert_array_equal(mask[1], [0, 1, 0])  # p = 1: always drawn
  np.testing.assert_array_equal(mask[2], [0, 0, 0])  # zero draws
  assert np.isfinite(mask).all()


@pytest.mark.slow
@pytest.mark.parametrize("budget", [2048, 0])
def test_bd_sampler_user_batches(budget):
  """User-batched models: each user's mask holds num_samples * |I+_u| draws per direction."""
  data, mods, method, snapshot, cfg = bd_setup("cdae", num_samples=3, eps_t=0.2,
                                                table_budget_mb=budget)
  with ranking.x64():
    state = refresh_cache(method, snapshot)
  test_users = (1, 3)
  if budget:
    for u in test_users:  # the tables hold the weights themselves
      w_student, w_teacher, _ = np_bd_weights(mods, data, snapshot, cfg, u)
      np.testing.assert_allclose(np.asarray(state["table_student"][u]), w_student, rtol=1e-6)
      np.testing.assert_allclose(np.asarray(state["table_teacher"][u]), w_teacher, rtol=1e-6)
  n = 20_000
  users = jnp.asarray(np.repeat(test_users, n).astype(np.int32))
  samples = sample_batch(method, state, users,
                         jax.random.split(jax.random.key(4), len(users)))
  indptr = data.split("train")[0]
  for i, u in enumerate(test_users):
    w_student, w_teacher, positives = np_bd_weights(mods, data, snapshot, cfg, u)
    k = cfg.num_samples * (indptr[u + 1] - indptr[u])
    assert np.count_nonzero(w_student) >= 2
    for learner, w in (("student", w_student), ("teacher", w_teacher)):
      mask, valid = (np.asarray(x)[i * n:(i + 1) * n] for x in samples[learner])
      assert mask.shape == (n, data.num_items) and valid.all()
      assert not mask[:, positives].any(), "sampled a training positive"
      assert_inclusion(mask, 1 - (1 - w / w.sum()) ** k)
