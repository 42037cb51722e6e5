"""FTD and HTD (topology distillation): the losses against slow numpy references (padding slots,
an empty group) and hand-computed golden values, gradients (finite when everything is masked and
at the end of the temperature annealing; none for the teacher; the prototypes are constants), the
methods' global-batch sets and terms, the config, and an end-to-end distillation epoch (4 devices
= 1, one trace for all epochs)."""
from __future__ import annotations

import functools
import math
import types

import chex
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO_ROOT, kd_config, load_config_module
from kdrec_jax import methods, parallel, train
from kdrec_jax import models as kmodels
from kdrec_jax.methods import ftd, htd
from kdrec_jax.parallel import AXIS

needs_4_devices = pytest.mark.skipif(len(jax.devices()) < 4,
                                     reason="needs 4 (fake) devices; see conftest.py")

TD_CONFIG_FILE = f"{REPO_ROOT}/configs/td_citeulike.py"
D_T, D_S = 6, 3

# ---------------------------------------------------------------------------------------------
# Slow numpy references (one pair, one group at a time)
# ---------------------------------------------------------------------------------------------


def _f64(x):
  return np.asarray(x, np.float64)


def np_cos(a, b) -> float:
  a, b = _f64(a), _f64(b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_ftd(student, teacher, mask) -> float:
  idx = np.flatnonzero(np.asarray(mask))
  return sum((np_cos(teacher[a], teacher[b]) - np_cos(student[a], student[b])) ** 2
             for a in idx for b in idx)


def np_ftd_f64(student, teacher, mask) -> tuple[float, np.ndarray]:
  """L_FTD and its gradient in the student, in float64 matrix form: S S^T - T T^T over the valid
  rows of the normalised representations; dL/dS_i = (g_i - s_i (s_i . g_i)) / |S_i| with
  g = 4 (S S^T - T T^T) S."""
  keep = np.asarray(mask, np.float64)[:, None]
  raw = _f64(student)
  norm = np.linalg.norm(raw, axis=1, keepdims=True)
  s = raw / norm * keep
  t = _f64(teacher) / np.linalg.norm(_f64(teacher), axis=1, keepdims=True) * keep
  diff = s @ s.T - t @ t.T
  g = 4 * diff @ s
  grad = (g - s * np.sum(s * g, axis=1, keepdims=True)) / norm * keep
  return float(np.sum(diff ** 2)), grad


def unguarded_gram(student, teacher, mask, terms=False):
  """The Gram form without its guard, a - 2b + c in float32 (and a + 2b + c if `terms`)."""
  keep = jnp.asarray(mask)[:, None].astype(jnp.float32)
  s, t = ftd.normalize(jnp.asarray(student)) * keep, ftd.normalize(jnp.asarray(teacher)) * keep
  frob = lambda a, b: jnp.sum(jnp.square(a.T @ b))  # noqa: E731
  a, b, c = frob(s, s), frob(s, t), frob(t, t)
  return (a - 2.0 * b + c, a + 2.0 * b + c) if terms else a - 2.0 * b + c


def np_htd_topology(student, teacher, groups, mask, choice="second") -> tuple[float, float]:
  """(entity, group) with explicit loops; only the groups that have valid members exist."""
  idx = [e for e in range(len(groups)) if mask[e]]
  entity = 0.0
  for a in idx:
    for b in idx:
      t_ab = np_cos(teacher[a], teacher[b])
      if groups[a] == groups[b] and t_ab > 0:
        entity += (np_cos(student[a], student[b]) - t_ab) ** 2
  members = {}
  for e in idx:
    members.setdefault(int(groups[e]), []).append(e)
  p_s = {g: _f64(student)[m].mean(0) for g, m in members.items()}
  p_t = {g: _f64(teacher)[m].mean(0) for g, m in members.items()}
  group = 0.0
  for g in members:
    if choice == "second":
      for e in idx:
        group += (np_cos(p_s[g], student[e]) - np_cos(p_t[g], teacher[e])) ** 2
    else:
      for h in members:
        group += (np_cos(p_s[g], p_s[h]) - np_cos(p_t[g], p_t[h])) ** 2
  return entity, group


def np_softmax(x):
  x = _f64(x)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_ga(params, student, teacher, gumbel, mask, temperature) -> float:
  """sum_e ||t_e - sum_k g_ek f_k(s_e)||^2 over valid e, one expert at a time."""
  p = jax.tree.map(_f64, jax.device_get(params))
  alpha = np_softmax(_f64(teacher) @ p["selection"]["kernel"] + p["selection"]["bias"])
  weights = np_softmax((np.log(alpha + 1e-10) + _f64(gumbel)) / temperature)
  ex = p["experts"]
  pred = 0.0
  for k in range(ex["hidden"]["kernel"].shape[0]):
    h = np.maximum(_f64(student) @ ex["hidden"]["kernel"][k] + ex["hidden"]["bias"][k], 0.0)
    pred = pred + weights[:, k:k + 1] * (h @ ex["out"]["kernel"][k] + ex["out"]["bias"][k])
  sq = np.sum((_f64(teacher) - pred) ** 2, -1)
  return float(sq[np.asarray(mask)].sum())


def _inputs(n=7, seed=1, num_groups=5):
  """Random s [n, D_S], t [n, D_T], groups (group 3 of 5 never used; the padded last slot is in
  group 3 so that unmasked it would fill it) and a mask with the last slot padding."""
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(n, D_S)).astype(np.float32)
  t = rng.normal(size=(n, D_T)).astype(np.float32)
  groups = np.array([0, 1, 0, 4, 1, 0, 3][:n], np.int32)
  assert num_groups == 5
  mask = np.arange(n) < n - 1
  return s, t, groups, mask


# Tiny hand case: 3 entities in 2-d (teacher and student the same size), groups (0, 0, 1) of 3
# (group 2 empty), plus a padded fourth slot full of junk in the empty group.
HAND_T = np.array([[1, 0], [1, 1], [0, 1], [-5, 7]], np.float32)
HAND_S = np.array([[1, 0], [0, 1], [1, 0], [9, 9]], np.float32)
HAND_GROUPS = np.array([0, 0, 1, 2], np.int32)
HAND_MASK = np.array([True, True, True, False])
R2, R5, R10 = math.sqrt(2), math.sqrt(5), math.sqrt(10)


class LossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_cosine_sim_and_zero_rows(self):
    fn = self.variant(ftd.cosine_sim)
    a = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    b = jnp.array([[4.0, 3.0], [0.0, -2.0], [0.0, 0.0]])
    np.testing.assert_allclose(fn(a, b), [[24 / 25, -4 / 5, 0.0], [0.0, 0.0, 0.0]], atol=1e-6)
    grad = self.variant(jax.grad(lambda x: jnp.sum(ftd.cosine_sim(x, x))))(a)
    chex.assert_tree_all_finite(grad)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ftd_golden(self):
    # t sims: (0,1) 1/sqrt2, (0,2) 0, (1,2) 1/sqrt2; s sims: (0,1) 0, (0,2) 1, (1,2) 0; both
    # orders: 2 (1/2 + 1 + 1/2) = 4; the diagonal matches; the padded slot counts nothing.
    value = self.variant(ftd.ftd_loss)(HAND_S, HAND_T, HAND_MASK)
    chex.assert_trees_all_close(value, 4.0, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ftd_golden_both_forms(self):
    for form in ("gram", "pairs"):
      value = self.variant(functools.partial(ftd.ftd_loss, form=form))(HAND_S, HAND_T, HAND_MASK)
      chex.assert_trees_all_close(value, 4.0, rtol=1e-6)

  @parameterized.parameters("auto", "gram", "pairs")
  @pytest.mark.slow
  def test_ftd_forms_match_numpy_and_gradients(self, form):
    # A batch-sized case (n = 600 > d_S + d_T, 'auto' = 'gram') with a fifth of it padding.
    rng = np.random.default_rng(3)
    s = rng.normal(size=(600, 8)).astype(np.float32)
    t = (rng.normal(size=(600, 40)) + 0.5).astype(np.float32)
    mask = rng.random(600) < 0.8
    fn = jax.jit(functools.partial(ftd.ftd_loss, form=form))
    chex.assert_trees_all_close(fn(s, t, mask), np_ftd(s, t, mask), rtol=2e-5)
    grads = [jax.grad(functools.partial(ftd.ftd_loss, form=f))(s, t, mask)
             for f in (form, "pairs")]
    chex.assert_trees_all_close(grads[0], grads[1], atol=2e-4, rtol=1e-4)
    assert not np.any(np.asarray(grads[0])[~mask])
    with self.assertRaisesRegex(ValueError, "form must be"):
      ftd.ftd_loss(s, t, mask, form="dense")

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_ftd_matches_numpy(self):
    s, t, _, mask = _inputs()
    fn = self.variant(ftd.ftd_loss)
    want = np_ftd(s, t, mask)
    assert want > 0
    chex.assert_trees_all_close(fn(s, t, mask), want, rtol=1e-5)
    junk_s, junk_t = s.copy(), t.copy()
    junk_s[-1], junk_t[-1] = 100.0, -3.0
    chex.assert_trees_all_close(fn(junk_s, junk_t, mask), want, rtol=1e-5)
    chex.assert_trees_all_close(fn(s, t, np.ones_like(mask)), np_ftd(s, t, np.ones_like(mask)),
                                rtol=1e-5)

  @pytest.mark.slow
  def test_ftd_gram_near_equal_topologies_against_float64(self):
    """Near-equal student and teacher topologies (the student a rotation of the teacher plus
    small noise), where the unguarded a - 2b + c is mostly float32 rounding: the guarded Gram
    form matches a float64 numpy reference, values and gradients."""
    rng = np.random.default_rng(5)
    for n, d, delta, valid_share in ((2000, 32, 1e-4, 1.0), (1500, 24, 3e-4, 0.8),
                                     (900, 16, 1e-3, 0.9)):
      t = rng.normal(size=(n, d))
      s = t @ np.linalg.qr(rng.normal(size=(d, d)))[0] + delta * rng.normal(size=(n, d))
      mask = rng.random(n) < valid_share
      want, want_grad = np_ftd_f64(s, t, mask)
      s32, t32 = s.astype(np.float32), t.astype(np.float32)
      got = float(jax.jit(functools.partial(ftd.ftd_loss, form="gram"))(s32, t32, mask))
      np.testing.assert_allclose(got, want, rtol=1e-3)
      raw = float(unguarded_gram(s32, t32, mask))
      assert abs(raw - want) > 0.1 * want, (raw, want)  # the regime the guard is for
      grad = np.asarray(jax.jit(jax.grad(functools.partial(ftd.ftd_loss, form="gram")))(
          s32, t32, mask))
      np.testing.assert_allclose(grad, want_grad, atol=1e-3 * np.abs(want_grad).max())
      assert not np.any(grad[~mask])

  @pytest.mark.slow
  def test_ftd_gram_guard_bound(self):
    """Over a sweep from unrelated to near-equal topologies: wherever the guard trusts the Gram
    form (value >= GRAM_GUARD (a + 2b + c)) its float32 value is within 1e-4 of float64, and the
    guarded value and gradient are within 1e-3 everywhere; above the guard the value is the
    plain Gram form's, bit for bit."""
    rng = np.random.default_rng(6)
    n, d = 1200, 20
    t = rng.normal(size=(n, d))
    rot = t @ np.linalg.qr(rng.normal(size=(d, d)))[0]
    noise = rng.normal(size=(n, d))
    mask = np.ones(n, bool)
    fn = jax.jit(functools.partial(ftd.ftd_loss, form="gram"))
    grad_fn = jax.jit(jax.grad(functools.partial(ftd.ftd_loss, form="gram")))
    trusted = 0
    for delta in (3.0, 1.0, 0.3, 0.1, 0.03, 1e-2, 3e-3, 1e-3, 1e-4):
      s32, t32 = (rot + delta * noise).astype(np.float32), t.astype(np.float32)
      want, want_grad = np_ftd_f64(s32, t32, mask)
      got = float(fn(s32, t32, mask))
      np.testing.assert_allclose(got, want, rtol=1e-3)
      np.testing.assert_allclose(grad_fn(s32, t32, mask), want_grad,
                                 atol=1e-3 * np.abs(want_grad).max())
      raw, terms = jax.jit(functools.partial(unguarded_gram, terms=True))(s32, t32, mask)
      if float(raw) >= ftd.GRAM_GUARD * float(terms):
        trusted += 1
        np.testing.assert_allclose(float(raw), want, rtol=1e-4)
        assert got == float(raw)  # both jitted: the same program as before the guard
    assert 3 <= trusted <= 7  # the sweep crosses the guard

  @pytest.mark.slow
  def test_ftd_guard_keeps_the_gram_bits_at_the_protocol_shape(self):
    """At the RCE-KD protocol's shape (6,144 entity slots, d 20 + 400) the guarded Gram form's
    value and gradient are bit for bit the unguarded one's (XLA compiles the same arithmetic;
    at tiny shapes its fusion can move the gradient's last bits)."""
    rng = np.random.default_rng(7)
    s = rng.normal(size=(6144, 20)).astype(np.float32)
    t = rng.normal(size=(6144, 400)).astype(np.float32)
    mask = rng.random(6144) < 0.7
    guarded = functools.partial(ftd.ftd_loss, form="gram")
    for f in (lambda fn: fn, jax.grad):
      np.testing.assert_array_equal(jax.jit(f(guarded))(s, t, mask),
                                    jax.jit(f(unguarded_gram))(s, t, mask))

  def test_ftd_guard_under_the_run_axis(self):
    """Several runs as one program (vmap over `parallel.RUN_AXIS`): each run's value and gradient
    are its single run's (the guard's pairs form in the run that needs it, the Gram form in the
    other), through the custom-VJP path that computes the pairs form only when some run needs
    it."""
    rng = np.random.default_rng(8)
    n, d = 400, 8
    t = rng.normal(size=(n, d)).astype(np.float32)
    runs = np.stack([t + 1e-4 * rng.normal(size=(n, d)), rng.normal(size=(n, d))]
                    ).astype(np.float32)  # near-equal topology (guard fires), unrelated
    mask = rng.random(n) < 0.9
    loss = functools.partial(ftd.ftd_loss, form="gram")
    seen = []

    def per_run(s):
      seen.append(parallel.in_runs())
      return jax.value_and_grad(lambda x: 0.5 * loss(x, t, mask))(s)

    value, grad = jax.jit(jax.vmap(per_run, axis_name=parallel.RUN_AXIS))(runs)
    assert seen == [True]
    for r in range(2):
      want, want_grad = jax.jit(per_run)(runs[r])
      np.testing.assert_allclose(float(value[r]), float(want), rtol=1e-4)
      np.testing.assert_allclose(grad[r], want_grad, atol=1e-3 * np.abs(want_grad).max())
    assert seen[-1] is False
    # Run 0's gradient is the pairs form's: within 2e-4 of float64 (the Gram form's is 3.3e-4
    # off here, the pairs form's 1.1e-4).
    _, exact = np_ftd_f64(runs[0], t, mask)
    np.testing.assert_allclose(grad[0], 0.5 * exact, atol=2e-4 * 0.5 * np.abs(exact).max())
    raw, terms = unguarded_gram(runs[0], t, mask, terms=True)
    assert float(raw) < ftd.GRAM_GUARD * float(terms)  # run 0 took the pairs form

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_htd_topology_golden(self):
    fn = self.variant(htd.topology_loss, static_argnums=(4, 5))
    # Entity level: only the pair (0, 1) of group 0 in both orders (t sim 1/sqrt2 > 0, s sim 0);
    # group 1 has one member; the diagonal matches.
    entity = 2 * 0.5
    # Prototypes: P_t = ([1, 1/2], [0, 1]), P_s = ([1/2, 1/2], [1, 0]); group 2 is empty.
    second = ((1 / R2 - 2 / R5) ** 2 + (1 / R2 - 3 / R10) ** 2 + (1 / R2 - 1 / R5) ** 2
              + (1 - 0) ** 2 + (0 - 1 / R2) ** 2 + (1 - 1) ** 2)
    first = 2 * (1 / R2 - 1 / R5) ** 2
    for choice, group in (("second", second), ("first", first)):
      got = fn(HAND_S, HAND_T, HAND_GROUPS, HAND_MASK, 3, choice)
      chex.assert_trees_all_close(got, (entity, group), rtol=1e-5)
      chex.assert_trees_all_close(got, np_htd_topology(HAND_S, HAND_T, HAND_GROUPS, HAND_MASK,
                                                       choice), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_htd_topology_matches_numpy(self):
    fn = self.variant(htd.topology_loss, static_argnums=(4, 5))
    for seed in (1, 2):
      s, t, groups, mask = _inputs(seed=seed)
      for choice in ("second", "first"):
        want = np_htd_topology(s, t, groups, mask, choice)
        assert want[0] > 0 and want[1] > 0
        chex.assert_trees_all_close(fn(s, t, groups, mask, 5, choice), want, rtol=1e-5)
        junk_s = s.copy()
        junk_s[-1] = 50.0  # the padded slot, in the otherwise empty group 3
        chex.assert_trees_all_close(fn(junk_s, t, groups, mask, 5, choice), want, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_prototypes_and_empty_groups(self):
    s, _, groups, mask = _inputs()
    protos, nonempty = self.variant(htd.prototypes, static_argnums=3)(s, groups, mask, 5)
    np.testing.assert_array_equal(nonempty, [True, True, False, False, True])
    for g in (0, 1, 4):
      np.testing.assert_allclose(protos[g], s[(groups == g) & mask].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(protos[2:4], 0.0)  # no 0/0

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_gradients(self):
    s, t, groups, mask = _inputs()

    def total(s, t, m, choice):
      entity, group = htd.topology_loss(s, t, groups, m, 5, choice)
      return entity + group + ftd.ftd_loss(s, t, m)

    for choice in ("second", "first"):
      grad = self.variant(jax.grad(lambda s, t: total(s, t, mask, choice), argnums=(0, 1)))
      g_s, g_t = grad(s, t)
      chex.assert_tree_all_finite((g_s, g_t))
      np.testing.assert_array_equal(g_t, 0.0)  # the teacher is a constant
      np.testing.assert_array_equal(g_s[-1], 0.0)  # the padded slot learns nothing
      assert np.all(np.abs(g_s[:-1]).max(-1) > 0)
      # Everything masked: 0 and zero gradients, no NaN from the empty prototypes.
      none = np.zeros_like(mask)
      value, g_none = self.variant(jax.value_and_grad(lambda s: total(s, t, none, choice)))(s)
      assert float(value) == 0.0
      chex.assert_tree_all_finite(g_none)
      np.testing.assert_array_equal(g_none, 0.0)

  def test_group_level_gradient_only_through_entities(self):
    """'second': the gradient of the group term is that with the prototypes as constants;
    'first': the group term has no gradient at all (prototypes under no_grad, as the reference)."""
    s, t, groups, mask = _inputs()
    p_s, nonempty = htd.prototypes(s, groups, mask, 5)
    p_t, _ = htd.prototypes(t, groups, mask, 5)

    def fixed(s):
      diff = ftd.cosine_sim(p_s, s) - ftd.cosine_sim(p_t, t)
      return jnp.sum(jnp.where(nonempty[:, None] & mask[None, :], diff ** 2, 0.0))

    got = jax.grad(lambda s: htd.topology_loss(s, t, groups, mask, 5, "second")[1])(s)
    chex.assert_trees_all_close(got, jax.grad(fixed)(s), rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(got))) > 0
    first = jax.grad(lambda s: htd.topology_loss(s, t, groups, mask, 5, "first")[1])(s)
    np.testing.assert_array_equal(first, 0.0)

  def test_bad_choice(self):
    s, t, groups, mask = _inputs()
    with pytest.raises(ValueError, match="choice must be one of"):
      htd.topology_loss(s, t, groups, mask, 5, "third")


# ---------------------------------------------------------------------------------------------
# The methods: global-batch sets, the terms, gradients per learner
# ---------------------------------------------------------------------------------------------

NUM_USERS, NUM_ITEMS, K = 7, 9, 3
DATA = types.SimpleNamespace(num_users=NUM_USERS, num_items=NUM_ITEMS)


def _bpr(dim):
  return kmodels.make(ml_collections.ConfigDict(dict(name="bpr_mf", dim=dim, init_std=0.5)),
                      NUM_USERS, NUM_ITEMS)


def _setup(name, **extra):
  models = {"teacher": _bpr(D_T), "student": _bpr(D_S)}
  settings = dict(name=name, lambda_td=0.01)
  if name == "htd":
    settings.update(alpha=0.3, num_experts=K, choice="second", end_temperature=1e-10,
                    anneal_epochs=10)
  settings.update(extra)
  cfg = ml_collections.ConfigDict(settings)
  method = methods.make(cfg, models, DATA)
  # Random params of the right shapes, drawn with numpy (cheaper than the flax init's compile).
  rng = np.random.default_rng(5)
  inits = {m: models[m].init for m in ("teacher", "student")}
  if method.init is not None:
    inits["method"] = method.init
  params = {m: jax.tree.map(lambda x: jnp.asarray(rng.uniform(-0.5, 0.5, x.shape), x.dtype),
                            jax.eval_shape(f, jax.random.key(0))) for m, f in inits.items()}
  # Duplicates within and across the item columns, and a padded row whose ids appear nowhere else.
  batch = {"user": jnp.array([0, 3, 3, 5, 0, 2, 3, 6], jnp.int32),
           "pos": jnp.array([1, 4, 1, 8, 2, 2, 4, 7], jnp.int32),
           "neg": {"student": jnp.array([5, 5, 0, 3, 6, 1, 3, 3], jnp.int32)},
           "weight": jnp.array([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32),
           "global": parallel.GLOBAL}
  hp = dict({k: jnp.float32(v) for k, v in method.hparams.items()}, epoch=jnp.int32(2))
  return cfg, models, method, params, batch, hp


def _on_one_device(fn):
  """Runs `fn(*args)` with the data axis bound (size 1), as inside the step on one device."""
  return lambda *args: jax.tree.map(lambda x: x[0], jax.vmap(
      fn, in_axes=None, axis_size=1, axis_name=AXIS)(*args))


def _np_stacked(params, batch):
  """Unique users then unique items (numpy) and the stacked embeddings of both models."""
  valid = np.asarray(batch["weight"]) > 0
  users = np.unique(np.asarray(batch["user"])[valid])
  items = np.unique(np.concatenate([np.asarray(batch["pos"])[valid],
                                    np.asarray(batch["neg"]["student"])[valid]]))
  p = jax.tree.map(_f64, jax.device_get(params))
  reps = {m: np.concatenate([p[m]["user"][users], p[m]["item"][items]]) for m in
          ("teacher", "student")}
  return users, items, reps


class MethodTest(chex.TestCase):

  @pytest.mark.slow
  def test_entity_sets(self):
    _, _, method, _, batch, _ = _setup("ftd")
    sets = jax.jit(_on_one_device(lambda b: method.sample({}, b, None, jax.random.key(0))))(batch)
    users, items = [0, 2, 3, 5], [0, 1, 2, 3, 4, 5, 6, 8]  # not the padded row's 6 and 7
    for side, want, size in (("user", users, 8), ("item", items, 16)):
      chex.assert_shape((sets[side]["ids"], sets[side]["mask"]), (size,))
      np.testing.assert_array_equal(sets[side]["mask"], np.arange(size) < len(want))
      np.testing.assert_array_equal(sets[side]["ids"][:len(want)], want)
      np.testing.assert_array_equal(sets[side]["ids"][len(want):], 0)

  @chex.variants(with_jit=True)  # the losses' eager variants: LossTest
  @pytest.mark.slow
  def test_ftd_term_matches_numpy(self):
    cfg, _, method, params, batch, hp = _setup("ftd")
    assert method.learners == ("student",) and set(method.hparams) == {"lambda_td"}

    @self.variant
    def run(params, batch):
      samples = method.sample({}, batch, None, jax.random.key(0))
      return method.loss(params, batch, samples, hp)

    terms, aux = _on_one_device(run)(params, batch)
    _, _, reps = _np_stacked(params, batch)
    want = np_ftd(reps["student"], reps["teacher"], np.ones(len(reps["teacher"]), bool))
    chex.assert_trees_all_close(aux, {"ftd": want}, rtol=1e-5)
    chex.assert_trees_all_close(terms, {"student": cfg.lambda_td * want}, rtol=1e-5)
    # A batch of padding only: 0, with zero (finite) gradients.
    empty = dict(batch, weight=jnp.zeros(8))
    value, grads = _on_one_device(self.variant(jax.value_and_grad(
        lambda p, b: run(p, b)[0]["student"])))(params, empty)
    assert float(value) == 0.0
    chex.assert_tree_all_finite(grads)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(grads))

  @chex.variants(with_jit=True)  # the losses' eager variants: LossTest
  @pytest.mark.slow
  def test_htd_term_matches_numpy(self):
    cfg, _, method, params, batch, hp = _setup("htd")
    assert method.learners == ("student", "method")
    assert set(method.hparams) == {"lambda_td", "alpha"}

    @self.variant
    def run(params, batch, key):
      samples = method.sample({}, batch, None, key)
      return samples, method.loss(params, batch, samples, hp)

    samples, (terms, aux) = _on_one_device(run)(params, batch, jax.random.key(9))
    users, items, reps = _np_stacked(params, batch)
    temperature = 1e-10 ** (2 / 10)
    p = jax.tree.map(_f64, jax.device_get(params))
    ga, groups = 0.0, []
    for offset, (side, ids) in enumerate((("user", users), ("item", items))):
      s = jax.device_get(samples[side])
      chex.assert_shape(s["gumbel"], (s["ids"].shape[0], K))
      n = len(ids)
      t_side, s_side = p["teacher"][side][ids], p["student"][side][ids]
      ga += np_ga(params["method"][side], s_side, t_side, s["gumbel"][:n], np.ones(n, bool),
                  temperature)
      sel = p["method"][side]["selection"]
      groups.append(np.argmax(t_side @ sel["kernel"] + sel["bias"], -1) + offset * K)
    groups = np.concatenate(groups)
    entity, group = np_htd_topology(reps["student"], reps["teacher"], groups,
                                    np.ones(len(groups), bool), "second")
    assert entity > 0 and group > 0
    chex.assert_trees_all_close(aux, {"htd_entity": entity, "htd_group": group, "htd_ga": ga},
                                rtol=1e-5)
    total = cfg.lambda_td * (cfg.alpha * (entity + group) + (1 - cfg.alpha) * ga)
    chex.assert_trees_all_close(terms, {"student": total, "method": total}, rtol=1e-5)

  @pytest.mark.slow
  def test_htd_gradients_per_learner(self):
    """The step sums the learners' terms: the teacher gets nothing, the student and the GA
    networks learn, counted once (the sum's gradient is the student term's); with alpha = 1 the
    GA networks get none (the hard groups and the prototypes carry no gradient); finite at the
    end of the annealing (T = 1e-10) and for a batch of padding only (then all zero)."""
    _, _, method, params, batch, hp = _setup("htd")

    @jax.jit
    def grads(p, batch, hp):
      """(gradient of the sum of the terms, of the 'method' entry alone)."""
      def terms(p):
        samples = method.sample({}, batch, None, jax.random.key(1))
        out = method.loss(p, batch, samples, hp)[0]
        return jnp.stack([out["student"], out["method"]])
      jac = _on_one_device(jax.jacrev(terms))(p)  # one backward pass for both entries
      return jax.tree.map(lambda x: x[0] + x[1], jac), jax.tree.map(lambda x: x[1], jac)

    def largest(tree):
      return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))

    got, of_method = grads(params, batch, hp)
    chex.assert_tree_all_finite(got)
    assert largest(of_method) == 0.0  # the method's entry reports the value only
    chex.assert_trees_all_close(got["teacher"], jax.tree.map(jnp.zeros_like, got["teacher"]))
    assert largest(got["student"]) > 0 and largest(got["method"]) > 0
    topo_only, _ = grads(params, batch, dict(hp, alpha=jnp.float32(1.0)))
    assert largest(topo_only["student"]) > 0 and largest(topo_only["method"]) == 0.0
    late, _ = grads(params, batch, dict(hp, epoch=jnp.int32(50)))
    chex.assert_tree_all_finite(late)
    assert largest(late["method"]) > 0
    empty, _ = grads(params, dict(batch, weight=jnp.zeros(8)), dict(hp, epoch=jnp.int32(50)))
    chex.assert_tree_all_finite(empty)
    assert largest(empty) == 0.0

  def test_errors(self):
    models = {"teacher": _bpr(D_T), "student": _bpr(D_S)}
    cdae = dict(models, student=models["student"]._replace(name="cdae", batching=kmodels.USERS))
    for name in ("ftd", "htd"):
      cfg = ml_collections.ConfigDict(dict(name=name, lambda_td=0.01))
      with pytest.raises(ValueError, match=f"'{name}' needs models trained on"):
        methods.make(cfg, cdae, DATA)
      # Users and items of different sizes cannot be stacked into one matrix.
      lopsided = models["student"]._replace(representations=lambda p, u, i: (
          p["user"][u], jnp.concatenate([p["item"][i], p["item"][i]], -1)))
      with pytest.raises(ValueError, match="stacks users and items"):
        methods.make(cfg, dict(models, student=lopsided), DATA)
    with pytest.raises(ValueError, match="choice must be one of"):
      methods.make(ml_collections.ConfigDict(dict(name="htd", lambda_td=0.1, choice="x")),
                   models, DATA)


# ---------------------------------------------------------------------------------------------
# The protocol config
# ---------------------------------------------------------------------------------------------

def test_td_config():
  module = load_config_module(TD_CONFIG_FILE)
  assert module.parse_arg("") == ("none", 20, False)
  assert module.parse_arg("htd,dim=10") == ("htd", 10, False)
  assert module.parse_arg("10,ftd,quick") == ("ftd", 10, True)
  for bad in ("htd,ftd", "dim=x", "cd", "htd,0"):
    with pytest.raises(ValueError, match="config arg"):
      module.parse_arg(bad)
  c = module.get_config("htd,10")
  assert (c.teacher.dim, c.student.dim, c.batch_size) == (200, 10, 1024)
  assert c.method.to_dict() == dict(name="htd", lambda_td=1e-3, alpha=0.5, num_experts=30,
                                    choice="second", end_temperature=1e-10, anneal_epochs=100)
  assert (c.distill.epochs, c.distill.patience, c.control, c.warmup.models) == (
      100, 0, False, ("teacher",))
  assert tuple(c.eval.ks) == (10, 20, 50) and c.data.split == "loo"
  assert module.get_config("ftd").method.to_dict() == dict(name="ftd", lambda_td=1e-3)
  assert module.get_config("teacher").distill.epochs == 0
  quick = module.get_config("htd,quick")
  assert (quick.distill.epochs, quick.method.anneal_epochs, quick.eval_every) == (3, 3, 1)


# ---------------------------------------------------------------------------------------------
# End to end: one distillation epoch of the train step
# ---------------------------------------------------------------------------------------------

_SETUPS = {}


@pytest.fixture(scope="module")
def epoch_setup(citeulike_file):
  """`epoch_setup(name)` -> (cfg, exp, state0, step), built once per method."""
  def get(name):
    if name not in _SETUPS:
      _SETUPS[name] = _epoch_setup(citeulike_file, name)
    return _SETUPS[name]
  yield get
  _SETUPS.clear()


def _epoch_setup(citeulike_file, name):
  cfg = kd_config(citeulike_file, name, num_devices=1)
  cfg.teacher.dim, cfg.student.dim = 6, 3
  if name == "htd":
    cfg.method.anneal_epochs = 4  # T = 1, 1e-2.5, 1e-5 at epochs 0, 1, 2
  exp = train.Experiment(cfg)
  method = exp.method
  if method.init is not None:  # random params of the method's shapes, without the flax init
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.uniform(-0.3, 0.3, x.shape), x.dtype),
                          jax.eval_shape(exp.method.init, jax.random.key(0)))
    method = method._replace(init=lambda key: params)
  program = train.build_phase(exp, "distill", method=method)
  return cfg, exp, program.initial_state(), program


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


@pytest.mark.slow
@needs_4_devices
@pytest.mark.parametrize("name", ["ftd", "htd"])
def test_distill_epoch_4_devices_matches_1(epoch_setup, name):
  cfg, exp, state0, program = epoch_setup(name)
  learners = exp.method.learners
  key = jax.random.key(11)
  out = {n: jax.device_get(train.build_phase(exp, "distill", num_devices=n,
                                             method=program.method).run_epoch(
                                                 _copy(state0), key, 0)) for n in (4, 1)}
  (s4, m4), (s1, m1) = out[4], out[1]
  for learner in learners:
    chex.assert_trees_all_close(s4.params[learner], s1.params[learner], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5)
  if name == "ftd":
    kd = cfg.method.lambda_td * m1["ftd"]
  else:
    a = cfg.method.alpha
    kd = cfg.method.lambda_td * (a * (m1["htd_entity"] + m1["htd_group"])
                                 + (1 - a) * m1["htd_ga"])
    np.testing.assert_allclose(m1["loss_method"], kd, rtol=1e-5)
  np.testing.assert_allclose(m1["loss_student"], m1["cf_student"] + kd, rtol=1e-5)
  # The teacher is frozen; the learners move.
  chex.assert_trees_all_equal(s1.params["teacher"], jax.device_get(state0.params["teacher"]))
  for learner in learners:
    moved = jax.tree.map(lambda a, b: np.abs(a - np.asarray(b)).max(), s1.params[learner],
                         jax.device_get(state0.params[learner]))
    assert min(jax.tree.leaves(moved)) > 0, learner


@pytest.mark.slow
def test_htd_epochs_trace_once_and_anneal(epoch_setup):
  cfg, exp, state0, program = epoch_setup("htd")
  chex.clear_trace_counter()
  traced = train.build_phase(exp, "distill", num_devices=1, method=program.method,
                             wrap_step=lambda step: chex.assert_max_traces(step, n=1))
  key = jax.random.key(3)
  metrics = [jax.device_get(traced.run_epoch(_copy(state0), key, e))[1] for e in (0, 1, 2)]
  for m in metrics:
    assert all(np.isfinite(float(v)) for v in m.values())
  # Same start and key: only the temperature differs, which changes the GA term.
  for a, b in ((0, 1), (1, 2)):
    assert abs(float(metrics[a]["htd_ga"]) - float(metrics[b]["htd_ga"])) > 1e-4 * abs(
        float(metrics[a]["htd_ga"]))
