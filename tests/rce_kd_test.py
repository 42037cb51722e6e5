"""RCE-KD: the closure sampling weights and the cross-entropies against loop-based numpy
references, the closure sampler's draws against exact without-replacement probabilities, the
per-epoch sets against numpy set operations on full rankings, the batch loss against explicit
sets, and a short end-to-end run (the frozen teacher never moves)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_only_student_moved, kd_config
from kdrec_jax import ranking, sparse, train
from kdrec_jax.methods import rce_kd
from ranking_test import assert_ordered_pairs


def np_closure_log_weights(hits, valid, temperature, cap):
  out = np.full(hits.shape, -np.inf)
  for r in range(hits.shape[0]):
    for j in range(hits.shape[1]):
      if valid[r, j]:
        c = sum(bool(hits[r, i] and valid[r, i]) for i in range(j, hits.shape[1]))
        out[r, j] = (min(c, cap) + 1) / temperature
  return out


def np_soft_ce(t, s):
  t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
  if len(t) == 0:
    return 0.0
  p = np.exp(t - t.max()) / np.sum(np.exp(t - t.max()))
  log_q = s - np.log(np.sum(np.exp(s)))
  return float(-np.sum(p * log_q))


def np_rce_row(zt, zs, s_items, t_items, i_items, tau, beta, k):
  """One row from explicit sets: zt, zs map item -> logit."""
  c_items = list(i_items) + [t for t in t_items if t not in i_items and t not in s_items]
  loss_s = np_soft_ce([zt[i] / tau for i in s_items], [zs[i] / tau for i in s_items])
  loss_t = np_soft_ce([zt[i] / tau for i in c_items], [zs[i] / tau for i in c_items])
  w = np.exp(-beta * len(set(t_items) & set(i_items)) / k)
  return (1 - w) * loss_s + w * loss_t


class ClosureWeightsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    rng = np.random.default_rng(0)
    hits = rng.random((5, 12)) < 0.4
    valid = rng.random((5, 12)) < 0.9
    valid[0] = True
    for cap in (50, 2):
      got = self.variant(rce_kd.closure_log_weights, static_argnums=(2, 3))(
          jnp.asarray(hits), jnp.asarray(valid), 0.7, cap)
      np.testing.assert_allclose(np.asarray(got), np_closure_log_weights(hits, valid, 0.7, cap),
                                 rtol=1e-6)

  def test_hand_values(self):
    # hits at positions 1 and 3: counts from each position on are 2, 2, 1, 1, 0.
    got = rce_kd.closure_log_weights(jnp.array([[False, True, False, True, False]]),
                                     jnp.ones((1, 5), bool), 10.0, 50)
    np.testing.assert_allclose(np.asarray(got)[0], [0.3, 0.3, 0.2, 0.2, 0.1], rtol=1e-6)


@pytest.mark.slow
def test_closure_sample_draws_without_replacement_by_weight():
  """Two positions of four, successively ∝ exp((min(c, cap) + 1) / T): exact ordered pairs."""
  hits = jnp.array([[False, True, False, True]])
  logw = rce_kd.closure_log_weights(hits, jnp.ones((1, 4), bool), 0.8, 50)
  n = 40_000
  keys = ranking.per_user_keys(jax.random.key(3), jnp.arange(n))
  draws = ranking.gumbel_top_k_rows(keys, jnp.broadcast_to(logw, (n, 4)), 2)
  assert_ordered_pairs(np.asarray(draws), np.exp(np.asarray(logw[0], np.float64)))


class CrossEntropyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_soft_cross_entropy_matches_numpy(self):
    rng = np.random.default_rng(1)
    t = rng.normal(0, 3, (4, 7)).astype(np.float32)
    s = rng.normal(0, 3, (4, 7)).astype(np.float32)
    valid = rng.random((4, 7)) < 0.7
    valid[3] = False  # nothing valid: 0
    got = self.variant(rce_kd.soft_cross_entropy)(t, s, valid)
    want = [np_soft_ce(t[r][valid[r]], s[r][valid[r]]) for r in range(4)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

  @pytest.mark.slow
  def test_gradient_reaches_the_student_only(self):
    t, s = jnp.array([[1.0, 2.0, 0.5]]), jnp.array([[0.2, -0.1, 0.3]])
    valid = jnp.ones((1, 3), bool)
    gt, gs = jax.grad(lambda a, b: jnp.sum(rce_kd.soft_cross_entropy(a, b, valid)),
                      argnums=(0, 1))(t, s)
    np.testing.assert_array_equal(np.asarray(gt), 0.0)
    # d/ds of -sum p log softmax(s) = softmax(s) - p
    p = jax.nn.softmax(t)
    np.testing.assert_allclose(np.asarray(gs), np.asarray(jax.nn.softmax(s) - p), rtol=1e-5)

  @pytest.mark.slow
  def test_rce_loss_mixes_by_overlap(self):
    rng = np.random.default_rng(2)
    zt_s, zs_s = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    zt_c, zs_c = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    sv, cv = np.ones((3, 4), bool), rng.random((3, 6)) < 0.8
    overlap = np.array([0.0, 2.0, 4.0])
    got = rce_kd.rce_loss(zt_s, zs_s, sv, zt_c, zs_c, cv, overlap, 3.0, 4.0)
    for r in range(3):
      w = np.exp(-3.0 * overlap[r] / 4)
      want = ((1 - w) * np_soft_ce(zt_s[r], zs_s[r])
              + w * np_soft_ce(zt_c[r][cv[r]], zs_c[r][cv[r]]))
      np.testing.assert_allclose(float(got[r]), want, rtol=1e-5)


def _setup(citeulike_file, **overrides):
  cfg = kd_config(citeulike_file, "rce_kd", num_devices=1, **overrides)
  exp = train.Experiment(cfg)
  params = {m: exp.models[m].init(k) for m, k in zip(("teacher", "student"),
                                                      jax.random.split(jax.random.key(5)))}
  static = exp.prepare({"teacher": params["teacher"]})
  cache, _ = exp.refresh(static, params, {}, jax.random.key(6), 0)
  return cfg, exp, params, static, cache


@pytest.mark.slow
@pytest.mark.parametrize("mask_positives", [False, True])
def test_refresh_sets_match_numpy(citeulike_file, mask_positives):
  cfg, exp, params, static, cache = _setup(citeulike_file, method__mask_positives=mask_positives)
  k, m, n_int = cfg.method.top_k, cfg.method.top_m, cfg.method.num_interesting
  users = jnp.arange(exp.data.num_users)
  pos = np.asarray(sparse.row_mask(exp.train_csr, users, exp.data.num_items))
  excl = pos if mask_positives else np.zeros_like(pos)

  def top(model, n):
    scores = np.asarray(exp.models[model].score_all(params[model], users))
    return np.argsort(-np.where(excl, -np.inf, scores), axis=1, kind="stable")[:, :n]

  t_top, s_full = top("teacher", k), top("student", m)
  np.testing.assert_array_equal(np.asarray(static["items"]), t_top)
  np.testing.assert_array_equal(np.asarray(cache["student_top"]), s_full[:, :k])
  if not mask_positives:  # the teacher's list keeps training items, as the authors' code
    assert pos[np.arange(len(t_top))[:, None], t_top].any()
  inter = np.asarray(cache["interesting"])
  assert np.asarray(cache["interesting_valid"]).all()
  for u in range(exp.data.num_users):
    assert len(set(inter[u].tolist())) == n_int and np.isin(inter[u], s_full[u]).all()
    keep = [t not in inter[u] and t not in s_full[u, :k] for t in t_top[u]]
    np.testing.assert_array_equal(np.asarray(cache["teacher_keep"][u]), keep)
    assert float(cache["overlap"][u]) == len(set(t_top[u]) & set(inter[u]))


@pytest.mark.slow
def test_loss_sums_rows_over_explicit_sets(citeulike_file):
  """sample + loss: every (user, positive) row counts (duplicates too, padding not), λ times the
  numpy loss from the cached sets."""
  cfg, exp, params, static, cache = _setup(citeulike_file)
  users = jnp.array([5, 9, 5, 17, 30, 2], jnp.int32)
  weight = jnp.array([1, 1, 1, 1, 0, 1], jnp.float32)
  batch = {"user": users, "weight": weight}
  view = {"static": static, "cache": cache, "carry": {}, "hparams": exp.hparams(), "epoch": 0}
  samples = exp.method.sample(view, batch, None, jax.random.key(0))
  terms, aux = exp.method.loss(params, batch, samples, dict(view["hparams"], epoch=0))
  hp = cfg.method
  want = 0.0
  for u, w in zip(np.asarray(users), np.asarray(weight)):
    if not w:
      continue
    items = jnp.arange(exp.data.num_items)
    zt = dict(enumerate(np.asarray(exp.models["teacher"].score(params["teacher"],
                                                               jnp.full_like(items, u), items))))
    zs = dict(enumerate(np.asarray(exp.models["student"].score(params["student"],
                                                               jnp.full_like(items, u), items))))
    want += np_rce_row(zt, zs, np.asarray(cache["student_top"][u]).tolist(),
                       np.asarray(static["items"][u]).tolist(),
                       np.asarray(cache["interesting"][u]).tolist(), hp.tau, hp.beta, hp.top_k)
  np.testing.assert_allclose(float(aux["rce"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(terms["student"]), hp.lambda_kd * want, rtol=1e-5)


@pytest.mark.slow
def test_end_to_end_teacher_frozen(citeulike_file, tmp_path):
  """A teacher warm-up then two distillation epochs through `train_and_evaluate`; the frozen
  teacher's evaluation is the same before and after, and one epoch leaves its params bitwise."""
  cfg = kd_config(citeulike_file, "rce_kd", num_devices=1)
  results = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  warm, dist = results["phases"]["warmup"], results["phases"]["distill"]
  assert dist["epochs"] == 2
  assert dist["teacher"]["test"] == warm["teacher"]["test"]
  assert np.isfinite(dist["student"]["test"]["NDCG@10"])
  # One epoch of the step: finite losses, the student moves, the teacher does not.
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  state, _ = program.refresh(program.initial_state(), jax.random.key(1), 0)
  before = jax.device_get(state)
  after, metrics = jax.device_get(program.run_epoch(state, jax.random.key(2), 0))
  assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["rce"]) > 0
  assert_only_student_moved(before, after)
