"""HetComp: the DKC distance, switching rule and final flag, the ensemble knowledge and both
losses against loop-based numpy references written in the reimplementation's form (linear sums,
clamps, its flipped cumulative sums); the stage lists of two teachers of different kinds and their
trajectories; the refresh schedule epoch by epoch; the batch loss. HetComp draws nothing at
random, so it has no sampler to test statistically. The functions are tested directly (the train
loop's several-teacher support is not on this branch)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import assert_only_student_moved, kd_config
from kdrec_jax import data as kdata
from kdrec_jax import methods, models, sparse, train
from kdrec_jax.methods import hetcomp


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------

def np_distance(student_list, teacher_list):
  """1 - NDCG of the student's list against the teacher's list as a set, rounded to 4 decimals."""
  k = len(student_list)
  gains = 2 ** np.exp(-np.arange(k) / 10) - 1
  denom = np.log2(np.arange(2, k + 2))
  dcg = np.sum(np.isin(student_list, teacher_list) * gains / denom)
  return 1 - round(dcg / np.sum(gains / denom), 4)


def np_dkc(stage, last, dists, first, threshold):
  stage, last = stage.copy(), last.copy()
  s = dists.shape[1]
  for u in range(len(stage)):
    if first:
      last[u] = dists[u, min(s - 1, stage[u] + 1)]
      continue
    if stage[u] == s - 1:
      continue
    nxt, after = min(s - 1, stage[u] + 1), min(s - 1, stage[u] + 2)
    ratio = last[u] / dists[u, nxt]
    if ratio > threshold or ratio < 1:
      stage[u] += 1
      last[u] = dists[u, after]
  return stage, last


def np_ensemble(lists, k, temperature):
  """Per row: items by summed exp(-position / T) over the lists (-1 = empty slot), then id."""
  out = []
  for rows in zip(*lists):
    score = {}
    for row in rows:
      for r, item in enumerate(row):
        if item >= 0:
          score[item] = score.get(item, 0.0) + np.exp(-r / temperature)
    out.append(sorted(score, key=lambda i: (-score[i], i))[:k])
  return np.array(out)


def np_overall(z, observed, pos, top):
  e = np.exp(z)
  els = e[~observed].sum() - e[top].sum()
  items = np.concatenate([pos, top])
  return -np.sum(z[items] - np.log(np.maximum(e[items] + els, 1e-5)))


def np_pl(s, pool):
  """Their form: sum of s minus sum of logs of the flipped cumulative sums plus the pool."""
  cum = np.cumsum(np.exp(s[::-1]))
  return -(np.sum(s) - np.sum(np.log(np.maximum(cum + pool, 1e-5))))


def np_rank(z, observed, pos, top):
  e = np.exp(z)
  h, t = len(top) // 2, len(top) // 10
  unobserved = e[~observed].sum()
  below_h, below_t = unobserved - e[top[:h]].sum(), unobserved - e[top[:t]].sum()
  return np_pl(z[pos], below_h) + (np_pl(z[top[:h]], below_h) + np_pl(z[top[:t]], below_t)) / 2


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------

def test_ndcg_gains_by_hand():
  np.testing.assert_allclose(hetcomp.ndcg_gains(3),
                             [1.0, (2 ** np.exp(-0.1) - 1) / np.log2(3),
                              (2 ** np.exp(-0.2) - 1) / 2], rtol=1e-6)


class DistanceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_matches_numpy(self):
    rng = np.random.default_rng(0)
    student = np.stack([rng.choice(30, 10, replace=False) for _ in range(50)]).astype(np.int32)
    teacher = np.stack([rng.choice(30, 10, replace=False) for _ in range(50)]).astype(np.int32)
    teacher[0], teacher[1] = student[0], student[1][::-1]  # same set: distance 0
    teacher[2] = np.arange(30, 40)  # disjoint: distance 1
    ok = np.ones((50, 10), bool)
    got = np.asarray(self.variant(hetcomp.list_distance)(student, ok, teacher, ok))
    want = [np_distance(s, t) for s, t in zip(student, teacher)]
    np.testing.assert_allclose(got, want, atol=1.01e-4)
    np.testing.assert_allclose(got[:3], [0.0, 0.0, 1.0], atol=1e-6)


class DkcTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    rng = np.random.default_rng(1)
    n, s = 400, 4
    stage = rng.integers(0, s, n).astype(np.int32)
    last = rng.uniform(0.3, 1.0, n).astype(np.float32)
    dists = rng.uniform(0.3, 1.0, (n, s)).astype(np.float32)
    fn = self.variant(hetcomp.dkc_update)
    for first, threshold in ((True, 1.05), (False, 1.05), (False, 1.01), (False, 0.99)):
      got = fn(stage, last, dists, first, np.float32(threshold))
      want = np_dkc(stage, last, dists, first, threshold)
      np.testing.assert_array_equal(np.asarray(got[0]), want[0])
      np.testing.assert_allclose(np.asarray(got[1]), want[1], rtol=1e-6)

  def test_rule_by_hand(self):
    # users: at the last stage; closer by 10% (> 1.05: move); closer by 2% (stay); farther (move)
    stage = jnp.array([2, 0, 0, 1])
    last = jnp.array([0.5, 0.55, 0.51, 0.4])
    dists = jnp.array([[0.9, 0.9, 0.9], [0.9, 0.5, 0.3], [0.9, 0.5, 0.3], [0.9, 0.9, 0.5]])
    new_stage, new_last = hetcomp.dkc_update(stage, last, dists, False, 1.05)
    np.testing.assert_array_equal(np.asarray(new_stage), [2, 1, 0, 2])
    np.testing.assert_allclose(np.asarray(new_last), [0.5, 0.3, 0.51, 0.5])
    # The threshold decays below 1 after 10 periods: then every user below the end moves.
    th = 1.05 * 0.995 ** 10
    assert th < 1
    np.testing.assert_array_equal(
        np.asarray(hetcomp.dkc_update(stage, last, dists, False, th)[0]), [2, 1, 1, 2])


def test_final_when_rounded_mean_stage_is_last():
  stage = np.full(1000, 2, np.int32)
  stage[:4] = 1  # mean 1.996 -> 2.00: final (the reimplementation rounds to 2 decimals)
  assert bool(hetcomp.is_final({"teacher": jnp.asarray(stage)}, {"teacher": 3}))
  stage[:6] = 1  # mean 1.994 -> 1.99
  assert not bool(hetcomp.is_final({"teacher": jnp.asarray(stage)}, {"teacher": 3}))
  both = {"teacher": jnp.full(10, 2), "lgcn": jnp.full(10, 0)}
  assert not bool(hetcomp.is_final(both, {"teacher": 3, "lgcn": 2}))
  both["lgcn"] = jnp.ones(10, jnp.int32)
  assert bool(hetcomp.is_final(both, {"teacher": 3, "lgcn": 2}))


class EnsembleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    rng = np.random.default_rng(2)
    a = np.stack([rng.choice(15, 6, replace=False) for _ in range(40)]).astype(np.int32)
    b = np.stack([rng.choice(15, 4, replace=False) for _ in range(40)]).astype(np.int32)
    b[0] = a[0, :4]  # identical heads
    va, vb = np.ones(a.shape, bool), rng.random(b.shape) < 0.8
    got, ok = self.variant(hetcomp.ensemble, static_argnums=(2,))([a, b], [va, vb], 5, 2.0)
    want = np_ensemble([a, np.where(vb, b, -1)], 5, 2.0)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.asarray(ok).all()

  @pytest.mark.slow
  def test_one_teacher_is_its_own_list_and_ties_go_to_the_lower_id(self):
    lists = jnp.array([[7, 3, 9, 1]])
    got, _ = hetcomp.ensemble([lists], [jnp.ones((1, 4), bool)], 4, 10.0)
    np.testing.assert_array_equal(np.asarray(got), [[7, 3, 9, 1]])
    # Item 5 first in one list, item 2 first in the other: equal importance, 2 first.
    got, _ = hetcomp.ensemble([jnp.array([[5, 8]]), jnp.array([[2, 6]])],
                              [jnp.ones((1, 2), bool)] * 2, 3, 1.0)
    np.testing.assert_array_equal(np.asarray(got), [[2, 5, 6]])


def _loss_data(seed=3, b=3, n=14, k=10):
  rng = np.random.default_rng(seed)
  z = rng.uniform(-3, 3, (b, n)).astype(np.float32)
  observed = np.zeros((b, n), bool)
  pos, top = [], []
  for r in range(b):
    obs = np.sort(rng.choice(n, 3, replace=False))
    observed[r, obs] = True
    pos.append(obs[:2])
    top.append(rng.permutation(np.setdiff1d(np.arange(n), obs))[:k])
  return z, observed, np.array(pos, np.int32), np.array(top, np.int32)


class LossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_overall_and_rank_match_numpy(self):
    z, observed, pos, top = _loss_data()
    ok_p, ok_t = np.ones(pos.shape, bool), np.ones(top.shape, bool)
    for fn, ref in ((hetcomp.overall_loss, np_overall), (hetcomp.rank_loss, np_rank)):
      got = np.asarray(self.variant(fn)(z, observed, pos, ok_p, top, ok_t))
      want = [ref(z[r].astype(np.float64), observed[r], pos[r], top[r]) for r in range(3)]
      np.testing.assert_allclose(got, want, rtol=1e-5)

  @pytest.mark.slow
  def test_gradients_are_finite_and_reach_only_listed_and_pooled_items(self):
    z, observed, pos, top = _loss_data(k=10)
    ok_p, ok_t = np.ones(pos.shape, bool), np.ones(top.shape, bool)
    for fn in (hetcomp.overall_loss, hetcomp.rank_loss):
      g = np.asarray(jax.jit(jax.grad(
          lambda x, f=fn: jnp.sum(f(x, observed, pos, ok_p, top, ok_t))))(z))
      assert np.isfinite(g).all()
      # observed items outside P get no gradient
      other_obs = observed.copy()
      other_obs[np.arange(3)[:, None], pos] = False
      np.testing.assert_array_equal(g[other_obs], 0.0)


# ---------------------------------------------------------------------------------------------
# the method: two teachers of different kinds with trajectories
# ---------------------------------------------------------------------------------------------

def _method(citeulike_file, **method_overrides):
  cfg = kd_config(citeulike_file, "hetcomp", num_devices=1)
  cfg.method.update(dict(top_k=10, period=2, **method_overrides))
  data = kdata.load(cfg.data)
  mcfg = {"teacher": cfg.teacher, "student": cfg.student,
          "lgcn": ml_collections.ConfigDict(dict(name="lightgcn", dim=6, num_layers=1))}
  ms = {n: models.make(c, data.num_users, data.num_items, data=data) for n, c in mcfg.items()}
  return cfg, data, ms, methods.make(cfg.method, ms, data)


def _top_unobserved(model, params, data, k):
  users = jnp.arange(data.num_users)
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  pos = np.asarray(sparse.row_mask(train, users, data.num_items))
  scores = np.asarray(model.score_all(params, users))
  return np.argsort(-np.where(pos, -np.inf, scores), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def het(citeulike_file):
  cfg, data, ms, method = _method(citeulike_file)
  keys = iter(jax.random.split(jax.random.key(0), 16))
  names = ("teacher", "teacher@10", "teacher@5", "teacher@20", "lgcn", "lgcn@3")
  frozen = {n: ms[n.split("@")[0]].init(next(keys)) for n in names}
  static = jax.jit(method.prepare)(frozen)
  students = [ms["student"].init(next(keys)) for _ in range(4)]
  return cfg, data, ms, method, frozen, static, students


@pytest.mark.slow
def test_stage_lists_of_two_teachers_of_different_kinds(het):
  cfg, data, ms, method, frozen, static, _ = het
  assert method.refresh_every == cfg.method.period and method.refresh_reads == ("student",)
  lists = static["lists"]
  assert set(lists) == {"teacher", "lgcn"}
  # first num_stages = 3 of [checkpoints in epoch order, final]: teacher 5, 10, 20; lgcn 3, final
  for name, keys in (("teacher", ("teacher@5", "teacher@10", "teacher@20")),
                     ("lgcn", ("lgcn@3", "lgcn"))):
    model = ms[name]
    assert lists[name]["items"].shape == (len(keys), data.num_users, 10)
    assert np.asarray(lists[name]["valid"]).all()
    for s, key in enumerate(keys):
      np.testing.assert_array_equal(np.asarray(lists[name]["items"][s]),
                                    _top_unobserved(model, frozen[key], data, 10))
  # observed items: the first n_P training items, n_P the smallest training row
  indptr, indices = data.split("train")
  n_p = int(np.diff(indptr).min())
  want = np.stack([indices[indptr[u]:indptr[u] + n_p] for u in range(data.num_users)])
  np.testing.assert_array_equal(np.asarray(static["pos"]), want)


@pytest.mark.slow
def test_refresh_schedule_matches_numpy(het):
  """Period 2: epoch 0 keeps stage 0; epoch 2 records the distances; epoch 4 applies the rule;
  the knowledge is the ensemble of the lists at the users' stages."""
  cfg, data, ms, method, _, static, students = het
  refresh = jax.jit(method.refresh)
  lists = {x: np.asarray(static["lists"][x]["items"]) for x in ("teacher", "lgcn")}
  rows = np.arange(data.num_users)
  carry = method.init_carry()
  np_stage = {x: np.zeros(data.num_users, np.int32) for x in lists}
  np_last = {x: np.ones(data.num_users, np.float32) for x in lists}
  for epoch, student in zip((0, 2, 4, 6), students):
    cache, carry = refresh(static, {"student": student}, carry, jax.random.key(9),
                           jnp.int32(epoch))
    if epoch >= 2:
      s_list = _top_unobserved(ms["student"], student, data, 10)
      th = 1.05 * 0.995 ** (epoch // 2)
      for x in lists:
        ok = np.ones(s_list.shape, bool)  # distances: hetcomp.list_distance (tested above)
        dists = np.stack([np.asarray(hetcomp.list_distance(s_list, ok, lists[x][s], ok))
                          for s in range(len(lists[x]))], -1)
        np_stage[x], np_last[x] = np_dkc(np_stage[x], np_last[x], dists, epoch == 2, th)
    for x in lists:
      np.testing.assert_array_equal(np.asarray(carry["stage"][x]), np_stage[x])
      np.testing.assert_allclose(np.asarray(carry["dist"][x]), np_last[x], rtol=1e-6)
    want = np_ensemble([lists[x][np_stage[x], rows] for x in ("teacher", "lgcn")], 10,
                       cfg.method.ensemble_temperature)
    np.testing.assert_array_equal(np.asarray(cache["top"]), want)
    assert not bool(cache["final"])
  assert any(np_stage[x].any() for x in lists), "no user moved: the test checks too little"
  # At the last stages: final, and DKC no longer runs (the carry stays as it is).
  last = {"teacher": jnp.full(data.num_users, 2), "lgcn": jnp.ones(data.num_users, jnp.int32)}
  done = {"stage": last, "dist": carry["dist"]}
  cache, after = refresh(static, {"student": students[0]}, done, jax.random.key(9), jnp.int32(8))
  assert bool(cache["final"])
  chex.assert_trees_all_equal(after, done)


@pytest.mark.slow
def test_batch_loss_switches_at_final(het):
  """Every (user, positive) row counts, padding does not: λ 2 Σ overall before the final stage,
  λ Σ rank after it."""
  cfg, data, ms, method, _, static, students = het
  cache, _ = jax.jit(method.refresh)(static, {"student": students[0]}, method.init_carry(),
                                     jax.random.key(1), jnp.int32(0))
  users = jnp.array([5, 9, 5, 17, 30], jnp.int32)
  weight = jnp.array([1, 1, 1, 1, 0], jnp.float32)
  batch = {"user": users, "weight": weight}
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  observed = np.asarray(sparse.row_mask(train, users, data.num_items))
  z = np.clip(np.asarray(ms["student"].score_all(students[1], users), np.float64), -40, 40)
  lam = cfg.method.lambda_kd
  for final, ref, scale in ((False, np_overall, 2.0), (True, np_rank, 1.0)):
    view = {"static": static, "cache": dict(cache, final=jnp.asarray(final)), "carry": {},
            "hparams": {"lambda_kd": jnp.float32(lam)}, "epoch": 0}
    samples = method.sample(view, batch, None, jax.random.key(0))
    terms, aux = jax.jit(method.loss)({"student": students[1]}, batch, samples,
                                      dict(view["hparams"], epoch=0))
    want = sum(scale * ref(z[r], observed[r], np.asarray(static["pos"][u]),
                           np.asarray(cache["top"][u]))
               for r, u in enumerate(np.asarray(users)) if weight[r])
    np.testing.assert_allclose(float(aux["hetcomp"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(terms["student"]), lam * want, rtol=1e-5)
    assert float(aux["hetcomp_final_rows"]) == (4.0 if final else 0.0)


@pytest.mark.slow
def test_one_epoch_through_the_train_step(citeulike_file):
  """The method inside today's step (one teacher, its trajectory passed by hand): both loss forms
  train the student, finite, and the frozen teacher does not move."""
  cfg = kd_config(citeulike_file, "hetcomp", num_devices=1)
  cfg.method.update(dict(top_k=10, period=2))
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  early = exp.models["teacher"].init(jax.random.key(11))
  state = program.initial_state(frozen={"teacher@5": early})
  state, _ = program.refresh(state, jax.random.key(1), 0)
  for final in (False, True):
    state = state.replace(cache=dict(state.cache, final=jnp.asarray(final)))
    before = jax.device_get(state)
    state, metrics = program.run_epoch(state, jax.random.key(2), 0)
    after = jax.device_get(state)
    assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["hetcomp"]) > 0
    assert float(metrics["hetcomp_final_rows"]) == (exp.num_examples if final else 0)
    assert_only_student_moved(before, after)
