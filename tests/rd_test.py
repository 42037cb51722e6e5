"""RD (Ranking Distillation): weights and loss against hand values and slow numpy references, the
teacher's top-K lists (stored and over budget), the dynamic samples, gradients and an end-to-end
run."""
from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl.testing import absltest
from scipy import stats

from conftest import KD_CONFIG_FILE, load_config_module
from kdrec_jax import models as kmodels
from kdrec_jax import ranking, sparse, train
from kdrec_jax.data.interactions import Interactions
from kdrec_jax.methods import rd


def _kd_config_module():
  return load_config_module(KD_CONFIG_FILE)


# ---------------------------------------------------------------------------------------------
# Slow numpy references
# ---------------------------------------------------------------------------------------------

def np_position_weights(k: int, temperature: float) -> np.ndarray:
  w = np.array([math.exp(-r / temperature) for r in range(1, k + 1)])
  return w / w.sum()


def np_estimated_ranks(top: np.ndarray, samples: np.ndarray, num_items: int) -> np.ndarray:
  b, k = top.shape
  eps = samples.shape[1]
  out = np.zeros((b, k), np.int64)
  for i in range(b):
    for c in range(k):
      above = sum(1 for j in range(eps) if samples[i, j] > top[i, c])
      out[i, c] = ((num_items - 1) * above) // eps
  return out


def np_rd_weights(top, samples, valid, dynamic, num_items, temperature, mu, renormalize=True):
  w_a = np_position_weights(top.shape[1], temperature)
  w_b = np.ones(top.shape)
  if samples is not None and dynamic:
    ranks = np_estimated_ranks(top, samples, num_items)
    c = np.arange(top.shape[1])
    w_b = np.maximum(np.tanh(mu * (ranks - c)), 0.0)
  w = np.where(valid, w_a * w_b, 0.0)
  if renormalize:
    total = w.sum(1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)
  return w


def np_rd_loss(top, weights, row_weight) -> float:
  return float(np.sum(row_weight[:, None] * weights * np.log1p(np.exp(-top.astype(np.float64)))))


# ---------------------------------------------------------------------------------------------
# Weights and loss (pure functions), jitted and not
# ---------------------------------------------------------------------------------------------

class WeightsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_position_weights_hand_values(self):
    fn = self.variant(rd.position_weights, static_argnums=(0, 1))
    # exp(-1), exp(-2), exp(-3) over their sum = 1 / (1 + e^-1 + e^-2) * (1, e^-1, e^-2).
    np.testing.assert_allclose(fn(3, 1.0), [0.6652409, 0.2447284, 0.0900306], rtol=1e-6)
    np.testing.assert_allclose(fn(2, 2.0), [0.6224593, 0.3775407], rtol=1e-6)
    np.testing.assert_allclose(fn(1, 0.5), [1.0], rtol=1e-6)
    # A tiny temperature puts all weight on the first slot, without 0/0.
    np.testing.assert_allclose(fn(4, 1e-3), [1.0, 0.0, 0.0, 0.0], atol=1e-30)
    np.testing.assert_allclose(fn(10, 1.7), np_position_weights(10, 1.7), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_estimated_ranks_hand_values(self):
    fn = self.variant(rd.estimated_ranks, static_argnums=(2,))
    top = jnp.array([[3.0, 1.0, 0.0, 2.0]])
    samples = jnp.array([[2.0, 2.5, 0.5, -1.0]])
    # #{samples > top} = 0, 2, 3, 1 (strict: the tie at 2.0 does not count).
    np.testing.assert_array_equal(fn(top, samples, 101), [[0, 50, 75, 25]])
    np.testing.assert_array_equal(fn(top, samples, 11), [[0, 5, 7, 2]])  # floor(10 * 3 / 4)
    w = self.variant(rd.dynamic_weights, static_argnums=(1,))(jnp.array([[0, 50, 75, 2]]), 0.1)
    np.testing.assert_allclose(w, [[0.0, math.tanh(4.9), math.tanh(7.3), 0.0]], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_estimated_ranks_match_numpy(self):
    rng = np.random.default_rng(0)
    top = np.round(rng.normal(size=(6, 5)), 1).astype(np.float32)  # rounded: ties occur
    samples = np.round(rng.normal(size=(6, 7)), 1).astype(np.float32)
    fn = self.variant(rd.estimated_ranks, static_argnums=(2,))
    for n in (150, 8, 1_000_003):
      np.testing.assert_array_equal(fn(top, samples, n), np_estimated_ranks(top, samples, n))

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_rd_weights_match_numpy(self):
    rng = np.random.default_rng(1)
    b, k, eps, n = 7, 5, 7, 150
    top = rng.normal(size=(b, k)).astype(np.float32)
    samples = rng.normal(size=(b, eps)).astype(np.float32)
    samples[0] = -10.0  # the student ranks row 0's items first: all w_b 0, the row's weights 0
    top[1] = -10.0      # row 1's items last: large w_b
    valid = np.ones((b, k), bool)
    valid[2, 3:] = False  # a user with only 3 unobserved items
    valid[3] = False      # a user with none
    for dynamic in (True, False):
      for renormalize in (True, False):
        for mu, temperature in ((0.1, 1.0), (2.0, 3.0)):
          fn = self.variant(functools.partial(
              rd.rd_weights, num_items=n, temperature=temperature, mu=mu,
              renormalize=renormalize))
          got = fn(top, samples, valid, jnp.asarray(dynamic))
          want = np_rd_weights(top, samples, valid, dynamic, n, temperature, mu, renormalize)
          np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
          assert np.all(np.asarray(got)[3] == 0)
          if renormalize:
            sums = np.asarray(got).sum(1)
            np.testing.assert_allclose(sums[sums > 0], 1.0, rtol=1e-5)
    got = self.variant(functools.partial(rd.rd_weights, num_items=n, temperature=1.0, mu=0.1,
                                         renormalize=True))(top, samples, valid, jnp.asarray(True))
    assert np.all(np.asarray(got)[0] == 0)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_static_weights_before_the_dynamic_ones(self):
    rng = np.random.default_rng(2)
    top = rng.normal(size=(4, 6)).astype(np.float32)
    samples = rng.normal(size=(4, 9)).astype(np.float32)
    valid = np.ones((4, 6), bool)
    fn = self.variant(functools.partial(rd.rd_weights, num_items=100, temperature=2.0, mu=0.1))
    static = np.broadcast_to(np_position_weights(6, 2.0), (4, 6))
    np.testing.assert_allclose(fn(top, samples, valid, jnp.asarray(False)), static, rtol=1e-6)
    np.testing.assert_allclose(fn(top, None, valid, jnp.asarray(True)), static, rtol=1e-6)
    assert not np.allclose(fn(top, samples, valid, jnp.asarray(True)), static)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rd_loss_matches_numpy(self):
    rng = np.random.default_rng(3)
    top = rng.normal(size=(5, 4)).astype(np.float32) * 3
    top[4] = -40.0  # a padded row: -log sigma(-40) = 40 per slot, but weight 0
    weights = rng.uniform(size=(5, 4)).astype(np.float32)
    row_weight = np.array([1.0, 1.0, 0.5, 2.0, 0.0], np.float32)
    fn = self.variant(rd.rd_loss)
    got = float(fn(top, weights, row_weight))
    np.testing.assert_allclose(got, np_rd_loss(top, weights, row_weight), rtol=1e-5)
    np.testing.assert_allclose(got, float(fn(top[:4], weights[:4], row_weight[:4])), rtol=1e-6)
    # Hand value: one slot, weight 1, score 0: log 2.
    np.testing.assert_allclose(float(fn(jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.ones(1))),
                               math.log(2.0), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_weights_are_constants(self):
    rng = np.random.default_rng(4)
    top = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    samples = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    valid = jnp.ones((3, 4), bool)

    def f(t, s):
      return jnp.sum(rd.rd_weights(t, s, valid, True, num_items=50, temperature=1.0, mu=0.5))

    g_top, g_samples = self.variant(jax.grad(f, argnums=(0, 1)))(top, samples)
    assert np.all(np.asarray(g_top) == 0) and np.all(np.asarray(g_samples) == 0)


# ---------------------------------------------------------------------------------------------
# The method on a tiny dataset
# ---------------------------------------------------------------------------------------------

NUM_ITEMS = 30


def _tiny_data() -> Interactions:
  """8 users x 30 items: ordinary rows, an empty row, one with 27 items (3 unobserved) and one
  with every item."""
  rng = np.random.default_rng(0)
  rows = [np.sort(rng.choice(NUM_ITEMS, n, replace=False)) for n in (4, 9, 1, 6, 12)]
  rows += [np.array([], np.int64), np.sort(rng.choice(NUM_ITEMS, 27, replace=False)),
           np.arange(NUM_ITEMS)]
  empty = [[] for _ in rows]
  return Interactions.from_rows("tiny", NUM_ITEMS, rows, empty, empty)


def _setup(budget_mb: float = 2048, **overrides):
  data = _tiny_data()
  cfg = _kd_config_module().method_config("rd")[0]
  cfg.update(dict(top_k=5, num_dynamic_samples=7, dynamic_start_epoch=2, lists_budget_mb=budget_mb,
                  list_chunk=3))
  cfg.update(overrides)
  models = {m: kmodels.make(ml_collections.ConfigDict(dict(name="bpr_mf", dim=d, init_std=1.0)),
                            data.num_users, NUM_ITEMS)
            for m, d in (("teacher", 8), ("student", 4))}
  method = rd.make(cfg, models, data)
  params = {m: models[m].init(k) for m, k in zip(models, jax.random.split(jax.random.key(0)))}
  return data, cfg, models, method, params


def _prepare(method, teacher_params):
  with ranking.x64():  # as train.Experiment.prepare runs it
    return jax.jit(method.prepare)({"teacher": teacher_params})


def _view(static):
  return {"static": static, "cache": {}, "carry": {}, "hparams": {}, "epoch": jnp.int32(0)}


def _batch(users, weight=None):
  users = jnp.asarray(users, jnp.int32)
  weight = jnp.ones(users.shape, jnp.float32) if weight is None else jnp.asarray(weight)
  return {"user": users, "pos": jnp.zeros_like(users), "weight": weight}


def _train_rows(data):
  indptr, indices = data.split("train")
  return [set(indices[indptr[u]:indptr[u + 1]].tolist()) for u in range(data.num_users)]


@pytest.mark.slow
def test_teacher_top_k_is_unobserved_and_matches_argsort():
  data, cfg, models, method, params = _setup()
  static = _prepare(method, params["teacher"])
  assert set(static) == {"items", "valid"}
  items, valid = np.asarray(static["items"]), np.asarray(static["valid"])
  assert items.shape == valid.shape == (data.num_users, cfg.top_k)
  scores = np.asarray(models["teacher"].score_all(params["teacher"], jnp.arange(data.num_users)))
  for u, positives in enumerate(_train_rows(data)):
    order = [i for i in np.argsort(-scores[u], kind="stable") if i not in positives]
    n = min(cfg.top_k, len(order))
    np.testing.assert_array_equal(valid[u], np.arange(cfg.top_k) < n)
    np.testing.assert_array_equal(items[u, :n], order[:n])
    assert not positives & set(items[u, :n].tolist())
  assert valid[6].sum() == 3 and not valid[7].any()


@pytest.mark.slow
def test_over_budget_rows_equal_table_rows():
  *_, stored, params = _setup()
  *_, computed, _ = _setup(budget_mb=0)
  s_table = _prepare(stored, params["teacher"])
  s_params = _prepare(computed, params["teacher"])
  assert "teacher" in s_params and "items" not in s_params
  users = np.array([0, 3, 6, 7, 5, 1, 1, 2, 4, 0])
  keys = jax.random.split(jax.random.key(5), len(users))
  a = jax.jit(stored.sample)(_view(s_table), _batch(users), keys, jax.random.key(0))
  b = jax.jit(computed.sample)(_view(s_params), _batch(users), keys, jax.random.key(0))
  chex.assert_trees_all_equal(a, b)
  np.testing.assert_array_equal(a["items"], np.asarray(s_table["items"])[users])


@pytest.mark.slow
def test_dynamic_samples_avoid_positives_and_are_uniform():
  data, cfg, _, method, params = _setup(num_dynamic_samples=20)
  static = _prepare(method, params["teacher"])
  per_user = 1500  # rows per user: 30,000 draws over <= 30 items
  users = np.repeat(np.arange(7), per_user)  # user 7 observed everything: nothing to draw
  keys = jax.random.split(jax.random.key(1), len(users))
  draws = np.asarray(jax.jit(method.sample)(_view(static), _batch(users), keys,
                                            jax.random.key(0))["dynamic"])
  assert draws.shape == (len(users), 20)
  for u, positives in enumerate(_train_rows(data)[:7]):
    got = draws[users == u].ravel()
    assert not positives & set(got.tolist()), f"user {u} drew a training positive"
    counts = np.bincount(got, minlength=NUM_ITEMS)
    free = np.array([i not in positives for i in range(NUM_ITEMS)])
    stat = stats.chisquare(counts[free]).statistic
    assert stat < stats.chi2.ppf(0.999, free.sum() - 1), (u, stat)


@pytest.mark.slow
def test_uniform_unobserved_edge_rows():
  rows = [np.array([], np.int64), np.arange(5), np.array([0, 1, 2, 4]), np.array([4])]
  indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
  csr = sparse.DeviceCSR.from_numpy(indptr, np.concatenate(rows))
  users = jnp.asarray(np.repeat(np.arange(4), 200), jnp.int32)
  keys = jax.random.split(jax.random.key(3), len(users))
  got = np.asarray(jax.jit(ranking.uniform_unobserved, static_argnums=(3, 4))(keys, users, csr, 5, 3)
                   ).reshape(4, -1)
  assert set(got[0].tolist()) == set(range(5))
  assert np.all(got[1] == 4)  # nothing unobserved: clamped to N - 1 (weight 0 there)
  assert np.all(got[2] == 3)
  assert set(got[3].tolist()) == {0, 1, 2, 3}


def np_authors_rd_term(cand, dyn, valid, epoch_num, num_items, k, lamda, mu, start, alpha,
                       renormalize=False):
  """Port of graytowne/rank_distill `distill_caser.py::DistilledRecommender.fit` (the weights)
  and `losses.py::weighted_sigmoid_log_loss` (the candidates' term), per batch row summed:
  float32 counts and ranks as torch computes them, the 1-based `epoch_num`, no renormalisation
  unless asked (`_weight_renormalize`). Invalid list slots (a user with fewer than K unobserved
  items, which Caser's lists never have) weigh 0."""
  w_static = np.exp(-np.arange(1, k + 1, dtype=np.float32) / np.float32(lamda))
  w_static = (w_static / w_static.sum())[None, :]
  if epoch_num > start:
    w_dyn = np.zeros(cand.shape, np.float32)
    for col in range(k):
      smaller = np.sum(cand[:, col:col + 1] < dyn, axis=1).astype(np.float32)
      relative = smaller / np.float32(dyn.shape[1])
      predicted = np.floor(np.float32(num_items - 1) * relative)
      w_dyn[:, col] = np.maximum(np.tanh(mu * (predicted - col)), 0.0)
    weight = w_dyn * w_static
    if renormalize:
      weight = weight / np.maximum(np.abs(weight).sum(1, keepdims=True), 1e-12)
  else:
    weight = np.broadcast_to(w_static, cand.shape)
  loss_cand = -np.log(1 / (1 + np.exp(-cand.astype(np.float64)))) * weight * alpha
  return np.sum(np.where(valid, loss_cand, 0.0), axis=1)


def _reference_loss(models, params, users, weight, samples, epoch, cfg):
  """The method's loss recomputed in numpy from the drawn items, by the authors' code path."""
  z = lambda items: np.asarray(models["student"].score(params["student"], users, items))  # noqa
  top = z(samples["items"])
  dyn = z(samples["dynamic"])
  valid = np.asarray(samples["valid"])
  if cfg.renormalize_weights:  # renormalised over the valid slots, as the library did
    w = np_rd_weights(top, dyn, valid, epoch >= cfg.dynamic_start_epoch, NUM_ITEMS,
                      cfg.position_temperature, cfg.mu, renormalize=True)
    return cfg.lambda_kd * np_rd_loss(top, w, np.asarray(weight))
  rows = np_authors_rd_term(top, dyn, valid, epoch + 1, NUM_ITEMS, cfg.top_k,
                            cfg.position_temperature, cfg.mu, cfg.dynamic_start_epoch,
                            cfg.lambda_kd)
  return float(np.dot(np.asarray(weight, np.float64), rows))


def test_authors_defaults():
  cfg = _kd_config_module().method_config("rd")[0]
  assert cfg.lambda_kd == 1.0 and not cfg.renormalize_weights  # teach_alpha 1, no renormalising
  assert (cfg.top_k, cfg.position_temperature, cfg.mu) == (10, 1.0, 0.1)
  assert (cfg.num_dynamic_samples, cfg.dynamic_start_epoch) == (100, 10)
  data = _tiny_data()
  models = {m: kmodels.make(ml_collections.ConfigDict(dict(name="bpr_mf", dim=4)),
                            data.num_users, NUM_ITEMS) for m in ("teacher", "student")}
  old = ml_collections.ConfigDict(dict(cfg, renormalize=True))
  del old["renormalize_weights"]
  with pytest.raises(ValueError, match="renormalize_weights"):
    rd.make(old, models, data)


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [0, 2])
@pytest.mark.parametrize("setting", ["authors", "renormalized"])
def test_method_loss_matches_numpy(epoch, setting):
  overrides = dict(lambda_kd=0.5, renormalize_weights=True) if setting == "renormalized" else {}
  data, cfg, models, method, params = _setup(mu=0.5, **overrides)
  static = _prepare(method, params["teacher"])
  users = jnp.asarray([0, 1, 1, 2, 3, 4, 5, 6, 7, 0], jnp.int32)
  weight = jnp.asarray([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], jnp.float32)  # the last row is padding
  keys = jax.random.split(jax.random.key(7), len(users))
  samples = jax.jit(method.sample)(_view(static), _batch(users, weight), keys, jax.random.key(0))
  hp = {"lambda_kd": jnp.float32(cfg.lambda_kd), "epoch": jnp.int32(epoch)}
  loss = jax.jit(method.loss)
  out, aux = loss(params, _batch(users, weight), samples, hp)
  assert set(out) == {"student"} and method.learners == ("student",)
  want = _reference_loss(models, params, users, weight, samples, epoch, cfg)
  np.testing.assert_allclose(float(out["student"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux["rd"]) * cfg.lambda_kd, want, rtol=1e-5)
  # Static and dynamic epochs differ (the switch is on the traced epoch).
  other = dict(hp, epoch=jnp.int32(2 - epoch))
  switched = float(loss(params, _batch(users, weight), samples, other)[0]["student"])
  assert not np.isclose(switched, float(out["student"]), rtol=1e-4)


@pytest.mark.slow
def test_gradient_reaches_the_student_only():
  _, cfg, _, method, params = _setup()
  static = _prepare(method, params["teacher"])
  users = jnp.arange(8, dtype=jnp.int32)
  keys = jax.random.split(jax.random.key(9), 8)
  samples = jax.jit(method.sample)(_view(static), _batch(users), keys, jax.random.key(0))
  hp = {"lambda_kd": jnp.float32(cfg.lambda_kd), "epoch": jnp.int32(5)}
  grads = jax.jit(jax.grad(lambda p: method.loss(p, _batch(users), samples, hp)[0]["student"])
                  )(params)
  chex.assert_tree_all_finite(grads)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["teacher"]))
  assert np.any(np.asarray(grads["student"]["user"]) != 0)
  assert np.any(np.asarray(grads["student"]["item"]) != 0)


@pytest.mark.slow
def test_all_masked_batch_gives_zero_loss_and_finite_gradients():
  _, cfg, _, method, params = _setup()
  static = _prepare(method, params["teacher"])
  users = jnp.asarray([0, 7, 6, 0], jnp.int32)
  batch = _batch(users, jnp.zeros(4))
  samples = jax.jit(method.sample)(_view(static), batch, jax.random.split(jax.random.key(2), 4),
                                   jax.random.key(0))
  f = jax.jit(jax.value_and_grad(lambda p, hp: method.loss(p, batch, samples, hp)[0]["student"]))
  for epoch in (0, 5):
    loss, grads = f(params, {"lambda_kd": jnp.float32(cfg.lambda_kd), "epoch": jnp.int32(epoch)})
    assert float(loss) == 0.0
    chex.assert_tree_all_finite(grads)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_user_batched_models_are_rejected():
  data = _tiny_data()
  cdae = ml_collections.ConfigDict(dict(name="cdae", dim=4))
  models = {m: kmodels.make(cdae, data.num_users, NUM_ITEMS, data=data)
            for m in ("teacher", "student")}
  with pytest.raises(ValueError, match="'rd' needs models trained on"):
    rd.make(_kd_config_module().method_config("rd")[0], models, data)


@pytest.mark.slow
def test_end_to_end_smoke(make_config, tmp_path):
  cfg = make_config(warmup__epochs=1, distill__epochs=2, control=False)
  cfg.method = _kd_config_module().method_config("rd")[0]
  cfg.method.update(dict(top_k=5, num_dynamic_samples=20, dynamic_start_epoch=1))
  cfg.warmup.models = ("teacher",)
  cfg.teacher.update(dict(name="bpr_mf", dim=8))
  cfg.student.update(dict(name="bpr_mf", dim=4))
  results = train.train_and_evaluate(cfg, str(tmp_path))
  student = results["phases"]["distill"]["student"]
  values = [v for split in ("val", "test") for v in student[split].values()]
  assert values and all(np.isfinite(v) for v in values)
  records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"distill"' in line and '"rd"' in line]
  assert len(records) == 2


if __name__ == "__main__":
  absltest.main()
