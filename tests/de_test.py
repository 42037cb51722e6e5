"""DE (Distillation Experts): the experts' forward and loss against a slow numpy reference, the
Gumbel-softmax selection, the temperature schedule, gradients, the method's global-batch sets and
an end-to-end distillation epoch (4 devices = 1, one trace for all epochs)."""
from __future__ import annotations

import math
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import KD_CONFIG_FILE, load_config_module, quick_config
from kdrec_jax import methods, parallel, train
from kdrec_jax import models as kmodels
from kdrec_jax.methods import de
from kdrec_jax.parallel import AXIS

needs_4_devices = pytest.mark.skipif(len(jax.devices()) < 4,
                                     reason="needs 4 (fake) devices; see conftest.py")

D_T, D_S, M = 6, 3, 4
HIDDEN = (D_T + D_S) // 2


def _kd_config_module():
  return load_config_module(KD_CONFIG_FILE)


# ---------------------------------------------------------------------------------------------
# Slow numpy references
# ---------------------------------------------------------------------------------------------

def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def np_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_de_forward(params, student, teacher, gumbel, temperature):
  """(prediction [n, d_T], weights [n, M]) from the flax params, one expert at a time."""
  p = _np(params)
  alpha = np_softmax(np.asarray(teacher, np.float64) @ p["selection"]["kernel"]
                     + p["selection"]["bias"])
  weights = np_softmax((np.log(alpha + 1e-10) + np.asarray(gumbel, np.float64)) / temperature)
  ex = p["experts"]
  pred = np.zeros((len(student), ex["out"]["kernel"].shape[-1]))
  for m in range(ex["hidden"]["kernel"].shape[0]):
    h = np.maximum(np.asarray(student, np.float64) @ ex["hidden"]["kernel"][m]
                   + ex["hidden"]["bias"][m], 0.0)
    pred += weights[:, m:m + 1] * (h @ ex["out"]["kernel"][m] + ex["out"]["bias"][m])
  return pred, weights


def np_de_loss(params, student, teacher, gumbel, mask, temperature) -> float:
  pred, _ = np_de_forward(params, student, teacher, gumbel, temperature)
  sq = np.sum((np.asarray(teacher, np.float64) - pred) ** 2, axis=-1)
  return float(np.sum(sq[np.asarray(mask)]))


def _module_and_params(key=0, d_t=D_T, d_s=D_S, m=M):
  module = de.DistillationExperts(m, (d_t + d_s) // 2, d_t)
  params = module.init(jax.random.key(key), jnp.zeros((1, d_s)), jnp.zeros((1, d_t)),
                       jnp.zeros((1, m)), 1.0)["params"]
  return module, params


def _inputs(n=5, seed=1):
  rng = np.random.default_rng(seed)
  s = jnp.asarray(rng.normal(size=(n, D_S)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(n, D_T)), jnp.float32)
  g = jnp.asarray(rng.gumbel(size=(n, M)), jnp.float32)
  mask = jnp.asarray([True] * (n - 1) + [False])  # the last slot is padding
  return s, t, g, mask


# ---------------------------------------------------------------------------------------------
# The DE module, its loss and the schedule
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_init_shapes_and_pytorch_bounds():
  _, params = _module_and_params()
  ex = params["experts"]
  chex.assert_shape(params["selection"]["kernel"], (D_T, M))
  chex.assert_shape(params["selection"]["bias"], (M,))
  chex.assert_shape(ex["hidden"]["kernel"], (M, D_S, HIDDEN))
  chex.assert_shape(ex["hidden"]["bias"], (M, HIDDEN))
  chex.assert_shape(ex["out"]["kernel"], (M, HIDDEN, D_T))
  chex.assert_shape(ex["out"]["bias"], (M, D_T))
  for leaf, fan_in in ((params["selection"]["kernel"], D_T), (params["selection"]["bias"], D_T),
                       (ex["hidden"]["kernel"], D_S), (ex["hidden"]["bias"], D_S),
                       (ex["out"]["kernel"], HIDDEN), (ex["out"]["bias"], HIDDEN)):
    bound = 1.0 / math.sqrt(fan_in)
    assert float(jnp.max(jnp.abs(leaf))) <= bound
    assert float(jnp.max(jnp.abs(leaf))) > 0.3 * bound  # uniform over the range, not tiny
  # Every expert gets its own initial weights.
  k = np.asarray(ex["hidden"]["kernel"])
  assert all(np.abs(k[a] - k[b]).max() > 1e-3 for a in range(M) for b in range(a + 1, M))


class DETest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_forward_and_loss_match_numpy(self):
    module, params = _module_and_params()
    s, t, g, mask = _inputs()
    temperature = 0.7

    @self.variant
    def forward(params, s, t, g, temperature):
      return module.apply({"params": params}, s, t, g, temperature)

    @self.variant
    def loss(params, s, t, g, mask, temperature):
      return de.de_loss(module, params, s, t, g, mask, temperature)

    pred, weights = forward(params, s, t, g, jnp.float32(temperature))
    chex.assert_shape(pred, (5, D_T))
    chex.assert_shape(weights, (5, M))
    want_pred, want_w = np_de_forward(params, s, t, g, temperature)
    chex.assert_trees_all_close((pred, weights), (want_pred, want_w), rtol=1e-5, atol=1e-6)
    value = loss(params, s, t, g, mask, jnp.float32(temperature))
    chex.assert_shape(value, ())
    expected = np_de_loss(params, s, t, g, mask, temperature)
    assert expected > 0
    chex.assert_trees_all_close(value, expected, rtol=1e-5)
    # The padded slot contributes nothing, whatever its inputs.
    s2, t2 = s.at[-1].set(100.0), t.at[-1].set(-100.0)
    chex.assert_trees_all_close(loss(params, s2, t2, g, mask, jnp.float32(temperature)),
                                expected, rtol=1e-5)
    # ... and counts once unmasked.
    full = np_de_loss(params, s, t, g, np.ones(5, bool), temperature)
    chex.assert_trees_all_close(loss(params, s, t, g, jnp.ones(5, bool),
                                     jnp.float32(temperature)), full, rtol=1e-5)
    assert full > expected

  @chex.variants(with_jit=True, without_jit=True)
  def test_gumbel_softmax_sums_to_one_and_hardens(self):
    rng = np.random.default_rng(3)
    alpha = jnp.asarray(np_softmax(rng.normal(size=(7, M))), jnp.float32)
    gumbel = jnp.asarray(rng.gumbel(size=(7, M)), jnp.float32)
    fn = self.variant(de.gumbel_softmax)
    for temperature in (1.0, 0.3):
      w = fn(alpha, gumbel, jnp.float32(temperature))
      chex.assert_shape(w, (7, M))
      chex.assert_trees_all_close(jnp.sum(w, -1), jnp.ones(7), rtol=1e-6)
      want = np_softmax((np.log(np.asarray(alpha, np.float64) + 1e-10) + np.asarray(gumbel))
                        / temperature)
      chex.assert_trees_all_close(w, want, rtol=1e-5, atol=1e-7)
    hard = fn(alpha, gumbel, jnp.float32(1e-10))
    chex.assert_tree_all_finite(hard)
    winner = np.argmax(np.log(np.asarray(alpha) + 1e-10) + np.asarray(gumbel), -1)
    np.testing.assert_array_equal(np.asarray(hard), np.eye(M)[winner])

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_gradients(self):
    module, params = _module_and_params()
    s, t, g, mask = _inputs()
    grad = self.variant(jax.grad(
        lambda p, s, t: de.de_loss(module, p, s, t, g, mask, jnp.float32(0.5)), argnums=(0, 1, 2)))
    g_params, g_s, g_t = grad(params, s, t)
    chex.assert_tree_all_finite((g_params, g_s, g_t))
    # Every DE parameter and every valid student row learns; the padded row and the teacher never.
    for path, leaf in jax.tree_util.tree_leaves_with_path(g_params):
      assert float(jnp.max(jnp.abs(leaf))) > 0, jax.tree_util.keystr(path)
    assert np.all(np.abs(np.asarray(g_s[:-1])).max(-1) > 0)
    np.testing.assert_array_equal(np.asarray(g_s[-1]), 0.0)
    np.testing.assert_array_equal(np.asarray(g_t), 0.0)
    # Also finite at the schedule's end temperature (a hard selection).
    hard = self.variant(jax.grad(
        lambda p, s: de.de_loss(module, p, s, t, g, mask, jnp.float32(1e-10)), argnums=(0, 1)))
    chex.assert_tree_all_finite(hard(params, s))

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_all_slots_masked(self):
    module, params = _module_and_params()
    s, t, g, _ = _inputs()
    none = jnp.zeros(5, bool)
    fn = self.variant(jax.value_and_grad(
        lambda p, s: de.de_loss(module, p, s, t, g, none, jnp.float32(1.0)), argnums=(0, 1)))
    value, grads = fn(params, s)
    assert float(value) == 0.0
    chex.assert_tree_all_finite(grads)
    chex.assert_trees_all_close(grads, jax.tree.map(jnp.zeros_like, grads))

  @chex.variants(with_jit=True, without_jit=True)
  def test_temperature_schedule(self):
    fn = self.variant(lambda e: de.temperature_at(e, 1e-10, 1000.0))
    got = [float(fn(jnp.int32(e))) for e in (0, 100, 500, 1000, 3000)]
    np.testing.assert_allclose(got, [1.0, 0.1, 1e-5, 1e-10, 1e-10], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The method: global-batch sets, the L_DE combination, gradients per learner
# ---------------------------------------------------------------------------------------------

NUM_USERS, NUM_ITEMS = 7, 9


def _method_setup(num_experts=3, lambda_de=0.05):
  def bpr(dim):
    return kmodels.make(ml_collections.ConfigDict(dict(name="bpr_mf", dim=dim, init_std=0.5)),
                        NUM_USERS, NUM_ITEMS)
  models = {"teacher": bpr(D_T), "student": bpr(D_S)}
  cfg = ml_collections.ConfigDict(dict(name="de", lambda_de=lambda_de, num_experts=num_experts,
                                       end_temperature=1e-10, anneal_epochs=10))
  method = methods.make(cfg, models, types.SimpleNamespace(num_users=NUM_USERS,
                                                           num_items=NUM_ITEMS))
  k_t, k_s, k_m = jax.random.split(jax.random.key(5), 3)
  params = {"teacher": models["teacher"].init(k_t), "student": models["student"].init(k_s),
            "method": method.init(k_m)}
  # Duplicates within each column, and a padded row whose ids appear nowhere else.
  batch = {"user": jnp.array([0, 3, 3, 5, 0, 2, 3, 6], jnp.int32),
           "pos": jnp.array([1, 4, 1, 8, 2, 2, 4, 7], jnp.int32),
           "neg": {"student": jnp.array([5, 5, 0, 3, 6, 0, 3, 3], jnp.int32)},
           "weight": jnp.array([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32),
           "global": parallel.GLOBAL}
  return cfg, models, method, params, batch


def _on_one_device(fn):
  """Runs `fn(*args)` with the data axis bound (size 1), as inside the step on one device."""
  return lambda *args: jax.tree.map(lambda x: x[0], jax.vmap(
      fn, in_axes=None, axis_size=1, axis_name=AXIS)(*args))


class MethodTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_method_loss_matches_numpy(self):
    cfg, models, method, params, batch = _method_setup()
    assert method.learners == ("student", "method") and method.teacher_to_student
    assert set(method.hparams) == {"lambda_de"}
    epoch = 3
    hp = {"lambda_de": jnp.float32(cfg.lambda_de), "epoch": jnp.int32(epoch)}

    @self.variant
    def run(params, batch, key):
      samples = method.sample({}, batch, None, key)
      return samples, method.loss(params, batch, samples, hp)

    samples, (terms, aux) = _on_one_device(run)(params, batch, jax.random.key(9))
    assert set(terms) == {"student", "method"}
    valid = np.asarray(batch["weight"]) > 0
    temperature = 1e-10 ** (epoch / 10)
    p = _np(params)
    expected = {}
    for name, ids, table, side in (("user", batch["user"], "user", "user"),
                                   ("pos", batch["pos"], "item", "item"),
                                   ("neg", batch["neg"]["student"], "item", "item")):
      want = np.unique(np.asarray(ids)[valid])
      s = _np(samples[name])
      k = len(want)
      chex.assert_shape(s["gumbel"], (8, 3))
      np.testing.assert_array_equal(s["mask"], np.arange(8) < k)
      np.testing.assert_array_equal(s["ids"][:k], want)
      expected[name] = np_de_loss(params["method"][side], p["student"][table][want],
                                  p["teacher"][table][want], s["gumbel"][:k], np.ones(k, bool),
                                  temperature)
    # The padded row's user (6) and positive (7) are left out.
    for name, padded in (("user", 6), ("pos", 7)):
      assert padded not in np.asarray(samples[name]["ids"])[np.asarray(samples[name]["mask"])]
    de_item = 0.5 * (expected["pos"] + expected["neg"])
    chex.assert_trees_all_close(aux, {"de_user": expected["user"], "de_item": de_item},
                                rtol=1e-5)
    total = cfg.lambda_de * (expected["user"] + de_item)
    chex.assert_trees_all_close(terms, {"student": total, "method": total}, rtol=1e-5)

  @pytest.mark.slow
  def test_gradients_per_learner_counted_once(self):
    """The step sums the learners' terms: the total's gradient is lambda_de grad L_DE for the
    student and the experts (once each), and zero for the teacher."""
    cfg, models, method, params, batch = _method_setup()
    hp = {"lambda_de": jnp.float32(cfg.lambda_de), "epoch": jnp.int32(2)}
    samples = _on_one_device(lambda b, k: method.sample({}, b, None, k))(batch,
                                                                         jax.random.key(1))
    temperature = de.temperature_at(2, 1e-10, 10.0)
    modules = {"user": de.DistillationExperts(3, (D_T + D_S) // 2, D_T),
               "item": de.DistillationExperts(3, (D_T + D_S) // 2, D_T)}

    def direct(p):  # lambda_de L_DE written out with `de_loss`
      out = 0.0
      for name, side, w in (("user", "user", 1.0), ("pos", "item", 0.5), ("neg", "item", 0.5)):
        s = samples[name]
        out += w * de.de_loss(modules[side], p["method"][side], p["student"][side][s["ids"]],
                              p["teacher"][side][s["ids"]], s["gumbel"], s["mask"], temperature)
      return cfg.lambda_de * out

    def stepwise(p):
      terms, _ = _on_one_device(lambda p: method.loss(p, batch, samples, hp))(p)
      return sum(terms.values())

    got, want = jax.jit(jax.grad(stepwise))(params), jax.jit(jax.grad(direct))(params)
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_close(got["teacher"], jax.tree.map(jnp.zeros_like, got["teacher"]))
    for m in ("student", "method"):
      assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(got[m])) > 0, m

  @pytest.mark.slow
  def test_sample_all_padding(self):
    cfg, _, method, params, batch = _method_setup()
    batch = dict(batch, weight=jnp.zeros(8))
    hp = {"lambda_de": jnp.float32(cfg.lambda_de), "epoch": jnp.int32(0)}

    def total(p):
      samples = method.sample({}, batch, None, jax.random.key(0))
      terms, _ = method.loss(p, batch, samples, hp)
      return terms["student"]

    value, grads = jax.jit(_on_one_device(jax.value_and_grad(total)))(params)
    assert float(value) == 0.0
    chex.assert_tree_all_finite(grads)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(grads))

  def test_user_batched_models_rejected(self):
    _, models, _, _, _ = _method_setup()
    users_batched = dict(models, student=models["student"]._replace(name="cdae",
                                                                    batching=kmodels.USERS))
    cfg = ml_collections.ConfigDict(dict(name="de", lambda_de=0.05, num_experts=3,
                                         end_temperature=1e-10))
    with pytest.raises(ValueError, match="'de' needs models trained on"):
      methods.make(cfg, users_batched, types.SimpleNamespace(num_users=NUM_USERS,
                                                             num_items=NUM_ITEMS))


@pytest.mark.slow
def test_expert_sizes_follow_representations():
  """NeuMF's representations are [GMF; MLP]: d + m per side."""
  def neumf(dim):
    return kmodels.make(ml_collections.ConfigDict(dict(name="neumf", dim=dim, mlp_dim=2 * dim)),
                        NUM_USERS, NUM_ITEMS)
  models = {"teacher": neumf(4), "student": neumf(2)}
  cfg = ml_collections.ConfigDict(dict(name="de", lambda_de=0.05, num_experts=2,
                                       end_temperature=1e-10))
  method = methods.make(cfg, models, types.SimpleNamespace(num_users=NUM_USERS,
                                                           num_items=NUM_ITEMS))
  params = method.init(jax.random.key(0))
  d_t, d_s = 12, 6
  for side in ("user", "item"):
    chex.assert_shape(params[side]["experts"]["hidden"]["kernel"], (2, d_s, (d_t + d_s) // 2))
    chex.assert_shape(params[side]["experts"]["out"]["kernel"], (2, (d_t + d_s) // 2, d_t))
    chex.assert_shape(params[side]["selection"]["kernel"], (d_t, 2))
  assert not np.allclose(params["user"]["selection"]["kernel"],
                         params["item"]["selection"]["kernel"])


# ---------------------------------------------------------------------------------------------
# End to end: one distillation epoch of the train step
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def de_setup(citeulike_file):
  cfg = quick_config(citeulike_file, num_devices=1)
  cfg.method = _kd_config_module().method_config("de")[0]
  cfg.method.num_experts = 3
  cfg.method.anneal_epochs = 4  # T = 1, 1e-2.5, 1e-5 at epochs 0, 1, 2
  cfg.teacher = ml_collections.ConfigDict(dict(name="bpr_mf", dim=8, init_std=0.1))
  cfg.student = ml_collections.ConfigDict(dict(name="bpr_mf", dim=4, init_std=0.1))
  cfg.warmup.models = ("teacher",)
  cfg.distill.method = ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=0.0))
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  return cfg, exp, program.initial_state(), program


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


@pytest.mark.slow
@needs_4_devices
def test_distill_epoch_4_devices_matches_1(de_setup):
  cfg, exp, state0, _ = de_setup
  assert "teacher" not in state0.opt and "method" in state0.opt
  key = jax.random.key(11)
  out = {n: jax.device_get(train.build_phase(exp, "distill", num_devices=n).run_epoch(
      _copy(state0), key)) for n in (4, 1)}
  (s4, m4), (s1, m1) = out[4], out[1]
  for learner in ("student", "method"):
    chex.assert_trees_all_close(s4.params[learner], s1.params[learner], rtol=1e-5, atol=1e-6)
  assert set(m4) == set(m1) >= {"de_user", "de_item", "loss_student", "loss_method"}
  chex.assert_trees_all_close(m4, m1, rtol=1e-5)
  # loss_method = lambda_de L_DE; the student adds it to its own BPR loss.
  kd = cfg.method.lambda_de * (m1["de_user"] + m1["de_item"])
  np.testing.assert_allclose(m1["loss_method"], kd, rtol=1e-5)
  np.testing.assert_allclose(m1["loss_student"], m1["cf_student"] + kd, rtol=1e-5)
  # The teacher is frozen; the student and the experts move.
  chex.assert_trees_all_equal(s1.params["teacher"], jax.device_get(state0.params["teacher"]))
  for learner in ("student", "method"):
    moved = jax.tree.map(lambda a, b: np.abs(a - np.asarray(b)).max(), s1.params[learner],
                         jax.device_get(state0.params[learner]))
    assert min(jax.tree.leaves(moved)) > 0, learner


@pytest.mark.slow
def test_epochs_trace_once_and_anneal(de_setup):
  cfg, exp, state0, _ = de_setup
  chex.clear_trace_counter()
  traced = train.build_phase(exp, "distill", num_devices=1,
                             wrap_step=lambda step: chex.assert_max_traces(step, n=1))
  key = jax.random.key(3)
  metrics = [jax.device_get(traced.run_epoch(_copy(state0), key, e))[1] for e in (0, 1, 2)]
  # Same start and key: only the temperature differs between the epochs.
  np.testing.assert_allclose(metrics[0]["cf_student"], metrics[1]["cf_student"], rtol=0.05)
  for a, b in ((0, 1), (1, 2)):
    assert abs(float(metrics[a]["de_item"]) - float(metrics[b]["de_item"])) > 1e-4 * abs(
        float(metrics[a]["de_item"]))
