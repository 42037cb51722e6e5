"""RRD and DCD's 'kds' variant: the relaxed ranking loss against a loop-based numpy reference, the
samplers (without-replacement draws, uniform uninteresting items, DCD's capped ranks and
correction weights) against exact probabilities and full rankings, and the unique-user (and, for
the authors' DCD, unique-item) coupling on 4 devices against 1. The authors' DCD: dcd_test.py."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import kd_config
from kdrec_jax import parallel, ranking, sparse, train
from kdrec_jax import step as kstep
from kdrec_jax.methods import dcd, rrd
from ranking_test import CHI2_999, assert_ordered_pairs, np_ranks

needs_4_devices = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (fake) devices")


def np_relaxed_ranking(ordered, ordered_valid, below, below_valid):
  """Loop reference: -sum_k [s_k - log(sum_{l>=k} e^{s_l} + sum_j e^{b_j})] over valid slots."""
  out = []
  for s, sv, b, bv in zip(ordered, ordered_valid, below, below_valid):
    s = np.asarray(s, np.float64)[np.asarray(sv)]
    b = np.asarray(b, np.float64)[np.asarray(bv)]
    pool = np.sum(np.exp(b))
    out.append(-sum(s[k] - np.log(np.sum(np.exp(s[k:])) + pool) for k in range(len(s))))
  return np.array(out)


class RelaxedRankingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_matches_numpy(self):
    rng = np.random.default_rng(0)
    ordered = rng.normal(0, 3, (4, 5)).astype(np.float32)
    below = rng.normal(0, 3, (4, 6)).astype(np.float32)
    ov = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    bv = np.array([[1] * 6, [1, 1, 0, 0, 1, 1], [1] * 6, [0] * 6], bool)
    got = self.variant(rrd.relaxed_ranking_loss)(ordered, ov, below, bv)
    chex.assert_shape(got, (4,))
    chex.assert_trees_all_close(got, np_relaxed_ranking(ordered, ov, below, bv).astype(
        np.float32), rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_value_and_large_logits(self):
    # One ordered item above one pooled item: -[a - log(e^a + e^b)] = log(1 + e^(b - a)).
    got = self.variant(rrd.relaxed_ranking_loss)(
        jnp.array([[2.0], [500.0]]), jnp.ones((2, 1), bool), jnp.array([[1.0], [499.0]]),
        jnp.ones((2, 1), bool))
    chex.assert_trees_all_close(got, jnp.full(2, np.log1p(np.exp(-1.0)), jnp.float32),
                                rtol=1e-5)  # float32 cancellation at logits of 500

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_all_masked_is_zero_with_finite_gradients(self):
    f = lambda s, b: jnp.sum(rrd.relaxed_ranking_loss(  # noqa: E731
        s, jnp.zeros((2, 3), bool), b, jnp.zeros((2, 4), bool)))
    s, b = jnp.ones((2, 3)), jnp.ones((2, 4))
    self.assertEqual(float(self.variant(f)(s, b)), 0.0)
    for g in self.variant(jax.grad(f, argnums=(0, 1)))(s, b):
      chex.assert_tree_all_finite(g)
      chex.assert_trees_all_close(g, jnp.zeros_like(g))


def test_gumbel_top_k_rows_draws_without_replacement():
  w = np.array([4.0, 1.0, 0.0, 2.0, 3.0])
  n = 40_000
  draws = ranking.gumbel_top_k_rows(jax.random.split(jax.random.key(0), n),
                                    jnp.log(jnp.asarray(w)), 2)
  assert_ordered_pairs(np.asarray(draws), w)


@pytest.mark.slow
def test_uniform_distinct_is_uniform_over_allowed_items():
  n, num_items, k = 20_000, 12, 4
  banned = np.array([0, 3, 4, 11])
  keys = jax.random.split(jax.random.key(3), n)
  items, valid = jax.jit(lambda kk: ranking.uniform_distinct(
      kk, k, num_items, lambda c: jnp.isin(c, jnp.asarray(banned)), draws=16))(keys)
  items, valid = np.asarray(items), np.asarray(valid)
  assert valid.mean() > 0.99  # 16 draws almost always hold 4 distinct allowed items
  full = valid.all(axis=1)
  rows = items[full]
  assert not np.isin(rows, banned).any()
  assert np.all(np.sort(rows, axis=1)[:, 1:] != np.sort(rows, axis=1)[:, :-1])  # distinct
  counts = np.bincount(rows.ravel(), minlength=num_items)[np.setdiff1d(np.arange(12), banned)]
  expected = rows.size / 8
  assert np.sum((counts - expected) ** 2 / expected) < CHI2_999[7]
  # Without replacement: every 4-set of the 8 allowed items is equally likely (70 sets).
  codes = np.sum(1 << np.sort(rows, axis=1), axis=1)
  _, set_counts = np.unique(codes, return_counts=True)
  assert len(set_counts) == 70
  expected = len(rows) / 70
  assert np.sum((set_counts - expected) ** 2 / expected) < 110.0  # chi2(69) 0.999 ≈ 111.1


@pytest.mark.slow
def test_rrd_refresh_sets(citeulike_file):
  cfg = kd_config(citeulike_file, "rrd", num_devices=1)
  exp = train.Experiment(cfg)
  teacher = exp.models["teacher"].init(jax.random.key(4))
  static = exp.prepare({"teacher": teacher})
  cache, _ = exp.refresh(static, {"teacher": teacher}, {}, jax.random.key(5), 0)
  m, k, n_un = cfg.method.top_m, cfg.method.num_interesting, cfg.method.num_uninteresting
  users = jnp.arange(exp.data.num_users)
  scores = np.asarray(exp.models["teacher"].score_all(teacher, users))
  pos = np.asarray(sparse.row_mask(exp.train_csr, users, exp.data.num_items))
  top = np.argsort(-np.where(pos, -np.inf, scores), axis=1, kind="stable")[:, :m]
  np.testing.assert_array_equal(np.asarray(static["items"]), top)
  inter, unint = np.asarray(cache["interesting"]), np.asarray(cache["uninteresting"])
  chex.assert_shape((inter, unint), ((exp.data.num_users, k), (exp.data.num_users, n_un)))
  assert np.asarray(cache["interesting_valid"]).all()
  assert np.asarray(cache["uninteresting_valid"]).all()
  for u in range(exp.data.num_users):
    where = [int(np.flatnonzero(top[u] == i)[0]) for i in inter[u]]
    assert where == sorted(where) and len(set(where)) == k  # distinct, in teacher order
    assert not pos[u, unint[u]].any() and not np.isin(unint[u], top[u]).any()
    assert len(set(unint[u].tolist())) == n_un
  # Over the memory budget the lists are recomputed from the teacher: the same sets.
  cfg0 = kd_config(citeulike_file, "rrd", num_devices=1, method__lists_budget_mb=0)
  exp0 = train.Experiment(cfg0)
  assert exp0.prepare({"teacher": teacher}) == {}
  cache0, _ = exp0.refresh({}, {"teacher": teacher}, {}, jax.random.key(5), 0)
  chex.assert_trees_all_equal(jax.device_get(cache0), jax.device_get(cache))


def test_rrd_interesting_positions_follow_exp_rank():
  """K = 2 of M = 4 positions, p(r) ∝ exp(-r / T): exact ordered-pair probabilities, then
  sorted into teacher order."""
  m, temp, n = 4, 1.5, 40_000
  logp = -jnp.arange(1, m + 1, dtype=jnp.float32) / temp
  pos = ranking.gumbel_top_k_rows(jax.random.split(jax.random.key(6), n), logp, 2)
  assert_ordered_pairs(np.asarray(pos), np.exp(np.asarray(logp, np.float64)))


@pytest.mark.slow
def test_dcd_capped_ranks_and_weights_equal_the_full_ranking():
  rng = np.random.default_rng(1)
  c, n, m, temp = 6, 300, 40, 2.0
  scores = np.round(rng.normal(size=(c, n)), 1).astype(np.float32)  # many ties
  items = np.stack([rng.choice(n, m, replace=False) for _ in range(c)]).astype(np.int32)
  cap = m + 10 * int(np.ceil(temp))
  got = np.asarray(dcd.capped_ranks(jnp.asarray(scores), jnp.asarray(items), cap))
  full = np.take_along_axis(np_ranks(scores) - 1, items, axis=1)  # 0-based, ties by id
  np.testing.assert_array_equal(got, np.minimum(full, cap))
  rank_t = jnp.arange(m)
  for a, b in zip(dcd.correction_weights(jnp.asarray(got), rank_t, temp),
                  dcd.correction_weights(jnp.asarray(full), rank_t, temp)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # capping changes nothing


class CorrectionWeightsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_values(self):
    under, over = self.variant(dcd.correction_weights)(jnp.array([0, 5, 30, 2]),
                                                        jnp.array([0, 0, 10, 12]), 10.0)
    chex.assert_trees_all_close(under, jnp.array([1e-5, np.tanh(0.5), np.tanh(2.0), 1e-5]),
                                rtol=1e-6)
    chex.assert_trees_all_close(over, jnp.array([1e-5, 1e-5, 1e-5, np.tanh(1.0)]), rtol=1e-6)


@pytest.mark.slow
def test_dcd_refresh_draws_from_the_teacher_list(citeulike_file):
  cfg = kd_config(citeulike_file, "dcd_kds", num_devices=1)
  exp = train.Experiment(cfg)
  params = {m: exp.models[m].init(k) for m, k in zip(("teacher", "student"),
                                                      jax.random.split(jax.random.key(7)))}
  static = exp.prepare({"teacher": params["teacher"]})
  cache, _ = exp.refresh(static, params, {}, jax.random.key(8), 0)
  top = np.asarray(static["items"])
  for name in ("under", "over"):
    got = np.asarray(cache[name])
    chex.assert_shape(got, (exp.data.num_users, cfg.method.num_samples))
    assert np.asarray(cache[name + "_valid"]).all()
    for u in range(exp.data.num_users):
      assert np.isin(got[u], top[u]).all() and len(set(got[u].tolist())) == got.shape[1]


@pytest.mark.slow
@needs_4_devices
@pytest.mark.parametrize("method", ["rrd", "dcd", "dcd_kds"])
def test_unique_user_losses_4_devices_match_1(citeulike_file, method):
  """The batch's unique users (and items) are gathered across devices: 4 devices give 1
  device's epoch."""
  cfg = kd_config(citeulike_file, method, num_devices=1)
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  state, _ = program.refresh(program.initial_state(), jax.random.key(1), 0)
  out = {n: jax.device_get(train.build_phase(exp, "distill", num_devices=n).run_epoch(
      jax.tree.map(jnp.copy, state), jax.random.key(2), 0)) for n in (4, 1)}
  (s4, m4), (s1, m1) = out[4], out[1]
  chex.assert_trees_all_close(s4.params["student"], s1.params["student"], rtol=1e-5,
                              atol=1e-6)
  name = cfg.method.name
  assert set(m4) == set(m1) and float(m1[name]) > 0
  for k in m1:
    np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, err_msg=k)
  # Each unique user of each batch counted once: at most one per (user, batch), at least one
  # per user per epoch.
  assert exp.data.num_users <= float(m1[f"{name}_users"]) <= exp.num_examples
  if method == "dcd":  # the item side: the batches' distinct positive items
    assert float(m1["dcd_icd"]) > 0
    assert exp.data.num_items <= float(m1["dcd_items"]) <= exp.num_examples


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rrd", "dcd_kds"])
def test_loss_sums_over_the_batch_unique_users(citeulike_file, method):
  """sample + loss inside the step's shard_map: each distinct user of the batch once (padding
  rows dropped), λ times the numpy relaxed ranking loss of its cached lists."""
  cfg = kd_config(citeulike_file, method, num_devices=1)
  exp = train.Experiment(cfg)
  params = {m: exp.models[m].init(k) for m, k in zip(("teacher", "student"),
                                                      jax.random.split(jax.random.key(3)))}
  static = exp.prepare({"teacher": params["teacher"]})
  cache, _ = exp.refresh(static, params, {}, jax.random.key(4), 0)
  users = jnp.array([5, 9, 5, 17, 9, 30, 2, 2], jnp.int32)
  weight = jnp.array([1, 1, 1, 1, 1, 0, 1, 1], jnp.float32)  # user 30: padding only
  batch = {"user": users, "weight": weight, "global": parallel.GLOBAL}
  view = {"static": static, "cache": cache, "carry": {}, "hparams": exp.hparams(), "epoch": 0}

  def run(view, batch):
    samples = exp.method.sample(view, batch, None, jax.random.key(0))
    return exp.method.loss(params, batch, samples, dict(view["hparams"], epoch=0))

  mesh = kstep.make_mesh(1)
  (terms, aux) = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(jax.P(), jax.P("data")),
                                       out_specs=jax.P(), check_vma=False))(view, batch)
  first, second = ("interesting", "uninteresting") if method == "rrd" else ("under", "over")
  want = 0.0
  for u in (2, 5, 9, 17):
    z = {k: np.asarray(exp.models["student"].score(params["student"], jnp.array([u]),
                                                   cache[k][u][None]))
         for k in (first, second)}
    want += np_relaxed_ranking(z[first], np.asarray(cache[first + "_valid"][u][None]),
                               z[second], np.asarray(cache[second + "_valid"][u][None]))[0]
  lam = cfg.method.lambda_rrd if method == "rrd" else cfg.method.lambda_kd
  name = cfg.method.name
  np.testing.assert_allclose(float(aux[name]), want, rtol=1e-5)
  np.testing.assert_allclose(float(terms["student"]), lam * want, rtol=1e-5)
  assert float(aux[f"{name}_users"]) == 4
