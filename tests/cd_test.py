"""CD: the tournament sampler's closed form (against a simulation of "best of two draws until n
distinct"), its vectorised Gumbel form, soft-label BCE and the loss against numpy, and the
teacher-/student-guided pools."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import kd_config
from kdrec_jax import methods, models, train
from kdrec_jax.methods import cd
from losses_test import tiny_data
from ranking_test import assert_frequencies, assert_ordered_pairs


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_tournament_log_probs_closed_form():
  pool, temp = 6, 0.2
  q = np.exp(-np.arange(1, pool + 1) / (pool * temp))
  q /= q.sum()
  # P(min(a, b) = r) by enumerating both draws.
  want = np.zeros(pool)
  for a in range(pool):
    for b in range(pool):
      want[min(a, b)] += q[a] * q[b]
  np.testing.assert_allclose(np.exp(cd.rank_log_probs(pool, temp)), want, rtol=1e-5)
  np.testing.assert_allclose(np.exp(cd.rank_log_probs(pool, temp, "direct")), q, rtol=1e-5)
  # Nearly uniform q (the reference's T = 20): the tournament still favours the top ranks,
  # with density close to 2 q (1 - Q).
  p = np.exp(cd.rank_log_probs(3000, 20.0))
  assert p.sum() == np.float32(1.0) or abs(p.sum() - 1) < 1e-4
  assert p[0] / p[-1] > 1000


def _draw_from_pool(key, users, items, valid, log_probs, n):
  """The pool rows' (items, valid) [C, P] at `cd.draw_positions`, as CD's refresh reads them."""
  pos = cd.draw_positions(key, users, valid, log_probs, n)
  return (jnp.take_along_axis(items, pos, axis=-1), jnp.take_along_axis(valid, pos, axis=-1))


@pytest.mark.slow
def test_best_of_two_until_distinct_equals_gumbel_top_n():
  """Simulates the reference loop (pairs of iid draws, keep the better, until 2 distinct) and
  the vectorised form; both match the exact ordered-pair probabilities."""
  pool, temp, n = 5, 2.0, 2
  q = np.exp(-np.arange(1, pool + 1) / (pool * temp))
  q /= q.sum()
  rng = np.random.default_rng(0)
  reps = 20_000
  sim = np.zeros((reps, n), np.int64)
  for t in range(reps):  # slow, obviously correct reference
    got = []
    while len(got) < n:
      a, b = rng.choice(pool, 2, p=q)
      if min(a, b) not in got:
        got.append(min(a, b))
    sim[t] = got
  p = np.exp(cd.rank_log_probs(pool, temp).astype(np.float64))
  assert_ordered_pairs(sim, p)
  items = jnp.tile(jnp.arange(pool, dtype=jnp.int32), (reps, 1))
  got, valid = jax.jit(_draw_from_pool, static_argnums=5)(
      jax.random.key(1), jnp.arange(reps, dtype=jnp.int32), items, jnp.ones((reps, pool), bool),
      jnp.asarray(cd.rank_log_probs(pool, temp)), n)
  assert np.asarray(valid).all()
  assert_ordered_pairs(np.asarray(got), p)
  assert_frequencies(np.asarray(got)[:, 0], p)  # the first draw alone follows p


def test_draw_from_pool_skips_invalid_slots():
  items = jnp.array([[7, 3, 9, 1], [4, 2, 0, 0]], jnp.int32)
  valid = jnp.array([[True, True, True, True], [True, False, False, False]])
  got, ok = _draw_from_pool(jax.random.key(0), jnp.array([0, 1]), items, valid, jnp.zeros(4), 2)
  got, ok = np.asarray(got), np.asarray(ok)
  assert ok[0].all() and set(got[0]) <= {7, 3, 9, 1} and got[0, 0] != got[0, 1]
  assert ok[1].tolist().count(True) == 1 and got[1][ok[1]].tolist() == [4]


class SoftLabelTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_soft_label_bce_matches_numpy(self):
    zs = np.array([[0.3, -2.0], [4.0, 0.0]], np.float32)
    zt = np.array([[1.0, -1.0], [10.0, -3.0]], np.float32)
    got = self.variant(cd.soft_label_bce)(zs, zt, 2.0, 0.5)
    w = _sigmoid((zt + 0.5) / 2.0)
    want = -(w * np.log(_sigmoid(zs)) + (1 - w) * np.log(1 - _sigmoid(zs)))
    chex.assert_shape(got, (2, 2))
    chex.assert_trees_all_close(got, want.astype(np.float32), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_loss_matches_numpy(self):
    data = tiny_data()
    mods = {m: models.make(ml_collections.ConfigDict(dict(name="bpr_mf", dim=d, init_std=0.7)),
                           data.num_users, data.num_items) for m, d in (("teacher", 4),
                                                                        ("student", 2))}
    cfg = ml_collections.ConfigDict(dict(name="cd", lambda_kd=0.5, guide="teacher",
                                         pool_size=6, rank_temperature=20.0, num_samples=2,
                                         t1=2.0, t2=0.3))
    method = methods.make(cfg, mods, data)
    params = {m: mods[m].init(jax.random.key(i)) for i, m in enumerate(mods)}
    users = jnp.array([0, 2, 2, 4], jnp.int32)  # user 2 twice: counted per training pair
    weight = jnp.array([1.0, 1.0, 1.0, 0.0])
    items = jnp.array([[5, 9], [1, 3], [1, 3], [0, 1]], jnp.int32)
    valid = jnp.array([[True, True], [True, False], [True, False], [True, True]])
    out, aux = self.variant(method.loss)(params, {"user": users, "weight": weight},
                                         (items, valid), method.hparams)
    p = {m: {k: np.asarray(v, np.float64) for k, v in params[m].items()} for m in params}
    u, it = np.asarray(users), np.asarray(items)
    zs = np.einsum("bd,bnd->bn", p["student"]["user"][u], p["student"]["item"][it])
    zt = np.einsum("bd,bnd->bn", p["teacher"]["user"][u], p["teacher"]["item"][it])
    y = _sigmoid((zt + 0.3) / 2.0)
    bce = -(y * np.log(_sigmoid(zs)) + (1 - y) * np.log(1 - _sigmoid(zs)))
    want = np.sum(np.asarray(weight)[:, None] * np.asarray(valid) * bce)
    np.testing.assert_allclose(float(aux["cd"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(out["student"]), 0.5 * want, rtol=1e-5)
    g = jax.grad(lambda prm: method.loss(prm, {"user": users, "weight": weight},
                                         (items, valid), method.hparams)[0]["student"])(params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g["teacher"]))
    assert np.all(np.isfinite(np.asarray(g["student"]["user"])))
    assert np.abs(np.asarray(g["student"]["item"])).sum() > 0


@pytest.mark.slow
def test_teacher_and_student_guided_pools(citeulike_file):
  for guide in ("teacher", "student"):
    cfg = kd_config(citeulike_file, "cd" if guide == "student" else "cd_teacher",
                    num_devices=1, method__pool_size=20, method__num_samples=4)
    exp = train.Experiment(cfg)
    keys = jax.random.split(jax.random.key(0), 2)
    params = {m: exp.models[m].init(k) for m, k in zip(("teacher", "student"), keys)}
    static = exp.prepare({"teacher": params["teacher"]})
    assert bool(static) == (guide == "teacher")  # the teacher's pool is built once
    cache, _ = exp.refresh(static, params, {}, jax.random.key(1), 0)
    items, valid = np.asarray(cache["items"]), np.asarray(cache["valid"])
    chex.assert_shape(items, (exp.data.num_users, 4))
    assert valid.all()
    # Every sampled item is in the guide's top-20 unobserved items, and distinct per user.
    scores = np.asarray(exp.models[guide].score_all(params[guide],
                                                   jnp.arange(exp.data.num_users)))
    indptr, indices = exp.data.split("train")
    for u in range(0, exp.data.num_users, 7):
      s = scores[u].copy()
      s[indices[indptr[u]:indptr[u + 1]]] = -np.inf
      pool = set(np.argsort(-s, kind="stable")[:20].tolist())
      assert set(items[u].tolist()) <= pool and len(set(items[u].tolist())) == 4
    # A new epoch key draws new items.
    again, _ = exp.refresh(static, params, {}, jax.random.key(2), 1)
    assert not np.array_equal(np.asarray(again["items"]), items)
    # Teacher guide: drawn once per phase (refresh_every 0), as KDs and UnKD's CD; student
    # guide: every epoch.
    assert exp.method.refresh_every == (1 if guide == "student" else 0)


def test_redraw_every_epoch_switch(citeulike_file):
  redraw = kd_config(citeulike_file, "cd_teacher", num_devices=1,
                     method__redraw_every_epoch=True)
  assert train.Experiment(redraw).method.refresh_every == 1  # the behaviour before the switch
  bad = kd_config(citeulike_file, "cd", num_devices=1, method__redraw_every_epoch=False)
  with pytest.raises(ValueError, match="student-guided pool"):
    train.Experiment(bad)



def test_cd_ablation_arms_and_config_overrides():
  """configs/kd_citeulike.py: each CD ablation arm is the benchmark's CD with one setting moved;
  `name=value` parts override method settings and the phase's patience / epochs."""
  from conftest import KD_CONFIG_FILE, load_config_module
  module = load_config_module(KD_CONFIG_FILE)
  base = module.get_config("cd").to_dict()
  assert (base["method"]["lambda_kd"], base["method"]["pool_size"],
          base["method"]["rank_temperature"], base["method"]["t1"]) == (0.5, 3000, 20.0, 2.0)
  seen = set()
  for arm in module.CD_ABLATION[1:]:
    cfg = module.get_config(arm).to_dict()
    moved = {k for k in base["method"] if cfg["method"][k] != base["method"][k]}
    key, value = arm.split(",")[1].split("=")
    assert moved == {key} and cfg["method"][key] == float(value), arm
    assert {k: v for k, v in cfg.items() if k != "method"} == {
        k: v for k, v in base.items() if k != "method"}
    seen.add(key)
  assert seen == {"lambda_kd", "pool_size", "rank_temperature", "t1"}
  diag = module.get_config("ftd,patience=100,epochs=300,checkpoint_every=5")
  assert (diag.distill.patience, diag.distill.epochs, diag.checkpoint_every) == (100, 300, 5)
  assert module.get_config("rd,renormalize_weights=true").method.renormalize_weights is True
  with pytest.raises(ValueError, match="neither a setting"):
    module.get_config("cd,temperature=3")
