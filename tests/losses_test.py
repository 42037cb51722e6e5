"""Golden values for the BPR loss and the BD distillation terms, against hand/numpy references."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdrec_jax import methods, models, ranking
from kdrec_jax.data.interactions import Interactions
from kdrec_jax.methods import bd
from kdrec_jax.models import bpr_mf


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _bce(logits, target):
  p = _sigmoid(logits)
  return -(target * np.log(p) + (1.0 - target) * np.log(1.0 - p))


# ---------------------------------------------------------------------------------------------
# BPR
# ---------------------------------------------------------------------------------------------

def test_bpr_loss_golden():
  pos = jnp.array([2.0, 0.0, -1.0])
  neg = jnp.array([1.0, 0.0, 1.0])
  weight = jnp.array([1.0, 1.0, 0.5])
  # -[log s(1) + log s(0) + 0.5 log s(-2)] = 0.3132617 + 0.6931472 + 0.5 * 2.1269280
  expected = 0.3132617 + 0.6931472 + 0.5 * 2.1269280
  assert math.isclose(expected, -(math.log(1 / (1 + math.exp(-1))) + math.log(0.5)
                                  + 0.5 * math.log(1 / (1 + math.exp(2)))), rel_tol=1e-6)
  np.testing.assert_allclose(float(bpr_mf.bpr_loss(pos, neg, weight)), expected, rtol=1e-6)
  # Single pairs.
  np.testing.assert_allclose(float(bpr_mf.bpr_loss(pos[:1], neg[:1], weight[:1])), 0.3132617,
                             rtol=1e-6)
  np.testing.assert_allclose(float(bpr_mf.bpr_loss(pos[1:2], neg[1:2], weight[1:2])),
                             math.log(2.0), rtol=1e-6)


@pytest.mark.slow
def test_bpr_loss_zero_weight_drops_term():
  pos = jnp.array([2.0, -30.0, -1.0])
  neg = jnp.array([1.0, 30.0, 1.0])  # the middle term alone would be ~60
  full = bpr_mf.bpr_loss(pos, neg, jnp.array([1.0, 0.0, 1.0]))
  kept = bpr_mf.bpr_loss(pos[jnp.array([0, 2])], neg[jnp.array([0, 2])], jnp.ones(2))
  np.testing.assert_allclose(float(full), float(kept), rtol=1e-6)
  np.testing.assert_allclose(float(full), 0.3132617 + 2.1269280, rtol=1e-6)
  # The zero-weighted pair gets no gradient.
  g = jax.grad(lambda p: bpr_mf.bpr_loss(p, neg, jnp.array([1.0, 0.0, 1.0])))(pos)
  assert float(g[1]) == 0.0
  np.testing.assert_allclose(np.asarray(g)[[0, 2]], -(1 - _sigmoid([1.0, -2.0])), rtol=1e-6)


@pytest.mark.slow
def test_model_cf_loss_matches_numpy():
  cfg = ml_collections.ConfigDict(dict(name="bpr_mf", dim=3, init_std=0.5))
  model = models.make(cfg, num_users=4, num_items=6)
  params = model.init(jax.random.key(0))
  users = jnp.array([0, 1, 3, 3])
  pos = jnp.array([1, 2, 5, 0])
  neg = jnp.array([4, 0, 2, 1])
  weight = jnp.array([1.0, 2.0, 0.0, 1.0])
  p, q = (np.asarray(params[k], np.float64) for k in ("user", "item"))
  zp = np.sum(p[users] * q[pos], -1)
  zn = np.sum(p[users] * q[neg], -1)
  expected = -np.sum(np.asarray(weight) * np.log(_sigmoid(zp - zn)))
  np.testing.assert_allclose(float(model.cf_loss(params, users, pos, neg, weight)), expected,
                             rtol=1e-5)
  # score / score_all agree with the dot products.
  np.testing.assert_allclose(np.asarray(model.score(params, users, pos)), zp, rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(np.asarray(model.score_all(params, users)), p[users] @ q.T,
                             rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# BD: the BCE term
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 5.0])
def test_distill_bce_matches_numpy(tau):
  rng = np.random.default_rng(0)
  learner = rng.normal(0, 3, size=(5, 4)).astype(np.float32)
  guide = rng.normal(0, 3, size=(5, 4)).astype(np.float32)
  got = np.asarray(bd.distill_bce(jnp.asarray(learner), jnp.asarray(guide), tau))
  assert got.shape == (5, 4)
  np.testing.assert_allclose(got, _bce(learner, _sigmoid(guide / tau)), rtol=1e-5, atol=1e-6)


def test_distill_bce_hand_values():
  # learner 0 (p = 1/2): BCE = log 2 whatever the target.
  np.testing.assert_allclose(float(bd.distill_bce(jnp.float32(0.0), jnp.float32(7.0), 5.0)),
                             math.log(2.0), rtol=1e-6)
  # guide 0 (target 1/2), learner 2: -(0.5 log s(2) + 0.5 log s(-2)) = 0.5 * (0.126928 + 2.126928)
  np.testing.assert_allclose(float(bd.distill_bce(jnp.float32(2.0), jnp.float32(0.0), 5.0)),
                             0.5 * (0.1269280 + 2.1269280), rtol=1e-6)


def test_distill_bce_gradient_only_to_learner():
  learner = jnp.array([0.3, -1.0, 2.0])
  guide = jnp.array([1.0, 2.0, -4.0])
  tau = 5.0
  g_guide = jax.grad(lambda g: jnp.sum(bd.distill_bce(learner, g, tau)))(guide)
  np.testing.assert_array_equal(np.asarray(g_guide), np.zeros(3))
  g_learner = jax.grad(lambda l: jnp.sum(bd.distill_bce(l, guide, tau)))(learner)
  # d BCE / d logit = sigma(logit) - target
  np.testing.assert_allclose(np.asarray(g_learner),
                             _sigmoid(learner) - _sigmoid(np.asarray(guide) / tau), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# BD: discrepancy weights
# ---------------------------------------------------------------------------------------------

def _np_weights(rank_t, rank_s, eps_t, eps_e, sign):
  rank_t = np.asarray(rank_t, np.float64)
  rank_s = np.asarray(rank_s, np.float64)
  d = rank_s - rank_t if sign == "paper" else rank_t - rank_s
  keep = (rank_t > 0) & (rank_s > 0)
  w_s = np.where(keep, np.tanh(np.maximum(eps_t * d, 0.0)), 0.0)
  w_t = np.where(keep, np.exp(-eps_e * d), 0.0)
  return w_s, w_t


def test_discrepancy_weights_paper_formulas():
  rng = np.random.default_rng(1)
  n = 40
  rank_t = np.stack([rng.permutation(n) + 1 for _ in range(3)]).astype(np.int32)
  rank_s = np.stack([rng.permutation(n) + 1 for _ in range(3)]).astype(np.int32)
  rank_t[0, :5] = 0  # excluded in the teacher only
  rank_s[1, 3:9] = 0
  eps_t, eps_e = 0.05, 0.03
  w_s, w_t = bd.discrepancy_weights(jnp.asarray(rank_t), jnp.asarray(rank_s), eps_t, eps_e)
  r_t, r_s = rank_t.astype(np.float64), rank_s.astype(np.float64)
  keep = (rank_t > 0) & (rank_s > 0)
  # paper: student w = tanh(max(eps_t (r_s - r_t), 0)), teacher w = exp(eps_e (r_t - r_s))
  np.testing.assert_allclose(np.asarray(w_s),
                             np.where(keep, np.tanh(np.maximum(eps_t * (r_s - r_t), 0)), 0),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(w_t), np.where(keep, np.exp(eps_e * (r_t - r_s)), 0),
                             rtol=1e-5)
  assert np.all(np.asarray(w_s)[~keep] == 0) and np.all(np.asarray(w_t)[~keep] == 0)
  # the student only learns on items the teacher ranks strictly above it
  assert np.all((np.asarray(w_s) > 0) == (keep & (rank_t < rank_s)))


def test_discrepancy_weights_notebook_swaps_sign():
  rng = np.random.default_rng(2)
  rank_t = (rng.permutation(30) + 1)[None].astype(np.int32)
  rank_s = (rng.permutation(30) + 1)[None].astype(np.int32)
  rank_s[0, 0] = 0
  for sign in ("paper", "notebook"):
    w_s, w_t = bd.discrepancy_weights(jnp.asarray(rank_t), jnp.asarray(rank_s), 0.1, 0.02, sign)
    e_s, e_t = _np_weights(rank_t, rank_s, 0.1, 0.02, sign)
    np.testing.assert_allclose(np.asarray(w_s), e_s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(w_t), e_t, rtol=1e-5)
  # notebook(rank_t, rank_s) == paper with the two rankings swapped
  nb = bd.discrepancy_weights(jnp.asarray(rank_t), jnp.asarray(rank_s), 0.1, 0.02, "notebook")
  sw = bd.discrepancy_weights(jnp.asarray(rank_s), jnp.asarray(rank_t), 0.1, 0.02, "paper")
  for a, b in zip(nb, sw):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  with pytest.raises(ValueError, match="rank_sign"):
    bd.discrepancy_weights(jnp.asarray(rank_t), jnp.asarray(rank_s), 0.1, 0.02, "bogus")


@pytest.mark.slow
def test_discrepancy_weights_three_item_example():
  teacher = jnp.array([[5.0, 1.0, 3.0]])
  student = jnp.array([[1.0, 5.0, 3.0]])
  r_t, r_s = ranking.ranks(teacher), ranking.ranks(student)
  np.testing.assert_array_equal(np.asarray(r_t), [[1, 3, 2]])
  np.testing.assert_array_equal(np.asarray(r_s), [[3, 1, 2]])
  eps_t, eps_e = 0.01, 1e-4
  w_s, w_t = (np.asarray(w)[0] for w in bd.discrepancy_weights(r_t, r_s, eps_t, eps_e, "paper"))
  # Paper: the teacher ranks item 0 first and the student third -> the student's only positive
  # weight is item 0, tanh(2 eps_t); the student ranks item 1 first, the teacher third -> the
  # teacher's largest weight is item 1, exp(2 eps_e).
  np.testing.assert_allclose(w_s, [math.tanh(2 * eps_t), 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(w_t, [math.exp(-2 * eps_e), math.exp(2 * eps_e), 1.0], rtol=1e-6)
  assert int(np.argmax(w_t)) == 1
  w_s, w_t = (np.asarray(w)[0]
              for w in bd.discrepancy_weights(r_t, r_s, eps_t, eps_e, "notebook"))
  np.testing.assert_allclose(w_s, [0.0, math.tanh(2 * eps_t), 0.0], rtol=1e-6)
  np.testing.assert_allclose(w_t, [math.exp(2 * eps_e), math.exp(-2 * eps_e), 1.0], rtol=1e-6)
  assert int(np.argmax(w_t)) == 0


# ---------------------------------------------------------------------------------------------
# BD: the method's loss
# ---------------------------------------------------------------------------------------------

def tiny_data() -> Interactions:
  train = [[0, 1, 2], [3, 4], [5, 6, 7, 0], [1, 8], [2, 9, 4], [6]]
  val = [[3], [5], [], [9], [1], [7]]
  test = [[4], [6], [8], [], [3], [2]]
  return Interactions.from_rows("tiny", 10, train, val, test)


def bd_config(**kw):
  c = dict(name="bd", refresh_every=1, tau=5.0, lambda_ts=0.5, lambda_st=0.3, eps_t=1e-2,
           eps_e=1e-4, num_samples=2, rank_sign="paper", mask_positives=True,
           bpr_negative="uniform", table_budget_mb=2048, refresh_chunk=4)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def tiny_models(num_users, num_items):
  return {"teacher": models.make(ml_collections.ConfigDict(dict(name="bpr_mf", dim=4,
                                                                init_std=0.7)),
                                 num_users, num_items),
          "student": models.make(ml_collections.ConfigDict(dict(name="bpr_mf", dim=2,
                                                                init_std=0.7)),
                                 num_users, num_items)}


def check_bd_loss_matches_numpy(wrap):
  data = tiny_data()
  mods = tiny_models(data.num_users, data.num_items)
  cfg = bd_config()
  method = methods.make(cfg, mods, data)
  assert method.name == "bd" and method.cf_negatives is None
  params = {"teacher": mods["teacher"].init(jax.random.key(1)),
            "student": mods["student"].init(jax.random.key(2))}
  users = jnp.array([0, 2, 5, 3, 1], jnp.int32)
  weight = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0])
  samples = {
      "student": (jnp.array([[4, 9], [1, 2], [0, 0], [3, 7], [8, 8]], jnp.int32),
                  jnp.array([True, True, True, False, True])),
      "teacher": (jnp.array([[5, 6], [9, 3], [1, 1], [0, 2], [7, 1]], jnp.int32),
                  jnp.array([True, False, True, True, True])),
  }
  batch = {"user": users, "weight": weight}
  out, aux = wrap(method.loss)(params, batch, samples, method.hparams)

  p = {m: {k: np.asarray(v, np.float64) for k, v in params[m].items()} for m in params}
  u = np.asarray(users)
  for learner, guide, lam in (("student", "teacher", cfg.lambda_ts),
                              ("teacher", "student", cfg.lambda_st)):
    items, valid = (np.asarray(x) for x in samples[learner])
    z_l = np.einsum("bd,bnd->bn", p[learner]["user"][u], p[learner]["item"][items])
    z_g = np.einsum("bd,bnd->bn", p[guide]["user"][u], p[guide]["item"][items])
    w = (np.asarray(weight) * valid)[:, None]
    bce = np.sum(w * _bce(z_l, _sigmoid(z_g / cfg.tau)))
    np.testing.assert_allclose(float(out[learner]), lam * bce, rtol=1e-5)
    np.testing.assert_allclose(float(aux[f"bd_{learner}"]), bce, rtol=1e-5)
    np.testing.assert_allclose(float(aux[f"valid_{learner}"]), np.sum(w), rtol=0)

  # Each direction's loss moves only its learner: the guide is stop-gradient.
  for learner, guide in (("student", "teacher"), ("teacher", "student")):
    g = jax.grad(lambda prm: method.loss(prm, batch, samples,
                                         method.hparams)[0][learner])(params)
    for leaf in jax.tree.leaves(g[guide]):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(g[learner]))


def test_bd_cf_negatives_notebook_switch():
  data = tiny_data()
  mods = tiny_models(data.num_users, data.num_items)
  method = methods.make(bd_config(bpr_negative="bd_sample"), mods, data)
  samples = {"teacher": (jnp.array([[3, 1], [4, 2]]), jnp.array([True, False])),
             "student": (jnp.array([[7, 0], [8, 5]]), jnp.array([False, True]))}
  uniform = {"teacher": jnp.array([11, 12]), "student": jnp.array([13, 14])}
  negs = method.cf_negatives(samples, uniform)
  np.testing.assert_array_equal(np.asarray(negs["teacher"]), [3, 12])
  np.testing.assert_array_equal(np.asarray(negs["student"]), [13, 8])
  with pytest.raises(ValueError, match="bpr_negative"):
    methods.make(bd_config(bpr_negative="nope"), mods, data)


def check_bd_loss_user_batches_matches_numpy(wrap):
  """User-batched models (CDAE): BCE over each user's 0/1 masks of BD items, read from the
  training-mode logits of the whole row."""
  data = tiny_data()
  mcfg = lambda d: ml_collections.ConfigDict(dict(name="cdae", dim=d))  # noqa: E731
  mods = {m: models.make(mcfg(d), data.num_users, data.num_items, data=data)
          for m, d in (("teacher", 4), ("student", 2))}
  cfg = bd_config(tau=2.0)
  method = methods.make(cfg, mods, data)
  rng = np.random.default_rng(3)
  b = 4
  logits = {m: jnp.asarray(rng.normal(0, 2, (b, data.num_items)), jnp.float32) for m in mods}
  weight = jnp.array([1.0, 0.0, 1.0, 2.0])
  samples = {m: (jnp.asarray(rng.random((b, data.num_items)) < 0.3, jnp.float32),
                 jnp.array([True, True, False, True])) for m in mods}
  users = jnp.array([0, 1, 2, 3], jnp.int32)
  batch = {"user": users, "weight": weight}
  out, aux = wrap(method.loss)(logits, batch, samples, method.hparams)
  for learner, guide, lam in (("student", "teacher", cfg.lambda_ts),
                              ("teacher", "student", cfg.lambda_st)):
    mask, valid = (np.asarray(x, np.float64) for x in samples[learner])
    z_l, z_g = (np.asarray(logits[m], np.float64) for m in (learner, guide))
    w = (np.asarray(weight) * valid)[:, None] * mask
    bce = np.sum(w * _bce(z_l, _sigmoid(z_g / cfg.tau)))
    np.testing.assert_allclose(float(out[learner]), lam * bce, rtol=1e-5)
    np.testing.assert_allclose(float(aux[f"bd_{learner}"]), bce, rtol=1e-5)
  g = jax.grad(lambda z: method.loss(z, batch, samples, method.hparams)[0]["student"])(logits)
  np.testing.assert_array_equal(np.asarray(g["teacher"]), 0.0)  # the guide is stop-gradient
  with pytest.raises(ValueError, match="pair-batched"):
    methods.make(bd_config(bpr_negative="bd_sample"), mods, data)


class BDChexTest(chex.TestCase):
  """BD's BCE term, discrepancy weights and losses, jitted and not, against numpy."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_distill_bce(self):
    rng = np.random.default_rng(4)
    learner, guide = (rng.normal(0, 3, size=(3, 4)).astype(np.float32) for _ in range(2))
    got = self.variant(bd.distill_bce)(learner, guide, 5.0)
    chex.assert_shape(got, (3, 4))
    chex.assert_trees_all_close(got, _bce(learner, _sigmoid(guide / 5.0)).astype(np.float32),
                                rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_discrepancy_weights(self):
    rng = np.random.default_rng(5)
    rank_t = np.stack([rng.permutation(20) + 1 for _ in range(2)]).astype(np.int32)
    rank_s = np.stack([rng.permutation(20) + 1 for _ in range(2)]).astype(np.int32)
    rank_s[0, :3] = 0
    got = self.variant(lambda t, s: bd.discrepancy_weights(t, s, 0.1, 0.02))(rank_t, rank_s)
    want = _np_weights(rank_t, rank_s, 0.1, 0.02, "paper")
    chex.assert_trees_all_close(got, tuple(w.astype(np.float32) for w in want), rtol=1e-5,
                                atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_bd_loss_pairs(self):
    check_bd_loss_matches_numpy(self.variant)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_bd_loss_user_batches(self):
    check_bd_loss_user_batches_matches_numpy(self.variant)


def test_batch_l2_matches_numpy():
  """`batch_l2`: c/2 sum_b w_b (|p_u|^2 + |q_i|^2 + |q_j|^2) on top of the BPR loss."""
  cfg = ml_collections.ConfigDict(dict(name="bpr_mf", dim=3, init_std=0.5, batch_l2=0.01))
  model = models.make(cfg, num_users=4, num_items=6)
  plain = models.make(ml_collections.ConfigDict(dict(name="bpr_mf", dim=3, init_std=0.5)), 4, 6)
  params = model.init(jax.random.key(0))
  users, pos, neg = jnp.array([0, 1, 3]), jnp.array([1, 2, 5]), jnp.array([4, 0, 2])
  weight = jnp.array([1.0, 0.0, 2.0])
  p, q = (np.asarray(params[k], np.float64) for k in ("user", "item"))
  reg = np.sum(np.asarray(weight) * (np.sum(p[users] ** 2, -1) + np.sum(q[pos] ** 2, -1)
                                     + np.sum(q[neg] ** 2, -1)))
  want = float(plain.cf_loss(params, users, pos, neg, weight)) + 0.005 * reg
  np.testing.assert_allclose(float(model.cf_loss(params, users, pos, neg, weight)), want,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="batch_l2"):
    models.make(ml_collections.ConfigDict(dict(name="neumf", dim=3, batch_l2=0.1)), 4, 6)


# ---------------------------------------------------------------------------------------------
# kdrec_jax.losses: one convention (scores on the last axis, where=, weights=, reduce_fn=)
# ---------------------------------------------------------------------------------------------

from kdrec_jax import losses  # noqa: E402


def _np_pl(ordered, below):
  """The relaxed ranking loss of one row, by its definition (float64)."""
  s, b = np.asarray(ordered, np.float64), np.asarray(below, np.float64)
  return -sum(s[k] - np.log(np.exp(s[k:]).sum() + np.exp(b).sum()) for k in range(len(s)))


def test_sigmoid_cross_entropy_golden():
  scores, labels = jnp.array([[0.0, 2.0, -1.0]]), jnp.array([[1.0, 0.25, 0.0]])
  want = _bce([0.0, 2.0, -1.0], np.array([1.0, 0.25, 0.0]))
  np.testing.assert_allclose(np.asarray(losses.sigmoid_cross_entropy(scores, labels,
                                                                     reduce_fn=None))[0],
                             want, rtol=1e-6)
  w = jnp.array([[2.0, 1.0, 0.5]])
  np.testing.assert_allclose(float(losses.sigmoid_cross_entropy(scores, labels, weights=w)),
                             float(np.sum(np.array([2.0, 1.0, 0.5]) * want)), rtol=1e-6)
  where = jnp.array([[True, False, True]])
  np.testing.assert_allclose(float(losses.sigmoid_cross_entropy(scores, labels, where=where)),
                             want[0] + want[2], rtol=1e-6)
  # log 2 at score 0 and label 1: hand value.
  assert float(losses.sigmoid_cross_entropy(jnp.zeros(1), jnp.ones(1))) == pytest.approx(
      math.log(2.0), rel=1e-6)


def test_log_sigmoid_loss_golden():
  scores = jnp.array([1.0, 0.0, -2.0])
  want = -np.log(_sigmoid([1.0, 0.0, -2.0]))  # 0.3132617, 0.6931472, 2.1269280
  np.testing.assert_allclose(want, [0.3132617, 0.6931472, 2.1269280], rtol=1e-6)
  np.testing.assert_allclose(float(losses.log_sigmoid_loss(scores)), want.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(losses.log_sigmoid_loss(scores, weights=jnp.array(
      [1.0, 0.0, 0.5]))), want[0] + 0.5 * want[2], rtol=1e-6)


@pytest.mark.slow
def test_relaxed_ranking_loss_golden():
  rng = np.random.default_rng(0)
  s, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  got = np.asarray(losses.relaxed_ranking_loss(jnp.asarray(s), jnp.asarray(b), reduce_fn=None))
  np.testing.assert_allclose(got, [_np_pl(s[i], b[i]) for i in range(3)], rtol=1e-5)
  # Excluded slots are as if absent: row 0 with ordered slot 1 and pooled slots 0, 3 left out.
  where = np.ones((3, 4), bool)
  where[0, 1] = False
  pooled_where = np.ones((3, 5), bool)
  pooled_where[0, [0, 3]] = False
  got = np.asarray(losses.relaxed_ranking_loss(jnp.asarray(s), jnp.asarray(b),
                                               where=jnp.asarray(where),
                                               pooled_where=jnp.asarray(pooled_where),
                                               reduce_fn=None))
  np.testing.assert_allclose(got[0], _np_pl(s[0, [0, 2, 3]], b[0, [1, 2, 4]]), rtol=1e-5)
  # Two items in order, nothing below: -(s1 - log(e^s1 + e^s2)) - 0 = log(1 + e^(s2 - s1)).
  two = losses.relaxed_ranking_loss(jnp.array([2.0, 0.0]), jnp.array([0.0]),
                                    pooled_where=jnp.array([False]))
  assert float(two) == pytest.approx(math.log(1.0 + math.exp(-2.0)), rel=1e-6)


def test_squared_error_golden():
  pred, target = jnp.array([[1.0, 2.0], [0.0, 0.0]]), jnp.array([[1.5, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(np.asarray(losses.squared_error(pred, target, reduce_fn=None)),
                             [4.25, 25.0], rtol=1e-6)
  assert float(losses.squared_error(pred, target, where=jnp.array([True, False]))) == 4.25


_ALL_LOSSES = {
    "sigmoid_cross_entropy": lambda s, where: losses.sigmoid_cross_entropy(
        s, jnp.full(s.shape, 0.3), where=where),
    "log_sigmoid_loss": lambda s, where: losses.log_sigmoid_loss(s, where=where),
    "relaxed_ranking_loss": lambda s, where: losses.relaxed_ranking_loss(
        s, s[..., ::-1], where=where, pooled_where=where[..., ::-1]),
    "squared_error": lambda s, where: losses.squared_error(
        s, jnp.ones(s.shape), where=jnp.all(where, axis=-1)),  # per row
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_ALL_LOSSES))
def test_all_masked_is_zero_with_finite_gradients(name):
  """Every loss: entries excluded by `where` contribute exactly 0 and get zero, finite
  gradients, even with -inf and huge scores; all excluded gives 0."""
  fn = _ALL_LOSSES[name]
  scores = jnp.array([[-jnp.inf, 1e30, 3.0], [0.5, -jnp.inf, jnp.inf]])
  none = jnp.zeros(scores.shape, bool)
  value, grad = jax.value_and_grad(lambda s: fn(s, none))(scores)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  # Finite entries kept, the others excluded: a finite value and finite gradients.
  keep = jnp.isfinite(scores) & (jnp.abs(scores) < 1e6)
  value, grad = jax.value_and_grad(lambda s: fn(s, keep))(scores)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grad)[~np.asarray(keep)] == 0.0)
