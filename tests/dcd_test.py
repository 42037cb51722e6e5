"""DCD, the authors' variant (dudwns511/DCD_CIKM21) against numpy ports of their code path: the
teacher's user and item lists, the re-ranking weights (student ranks within the teacher's
top-M, no floor), the per-step draws (without replacement ∝ the weights, under-estimated ones
in teacher order, torch's zero-weight fill) and the UCD + ICD loss; and the 'kds' variant
reproducing this library's earlier DCD numbers. (The 'kds' samplers and weights are tested in
rrd_test.py.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import kd_config
from kdrec_jax import parallel, train
from kdrec_jax import step as kstep
from kdrec_jax.methods import dcd
from ranking_test import assert_ordered_pairs


def np_authors_rank_diff(list_rows: np.ndarray, scores: np.ndarray, num_cols: int, ep: float):
  """Port of the authors' re-ranking loop (`run_dcd.py::DCD`, every 3 epochs), one side: for each
  row s with teacher list L (item ids, best first) and the student's scores of L,
    s_rank = L[argsort(-score)]; S[s_rank] = 0..M-1; U[L] = 0..M-1
    rank_diff_500[s]     = tanh(max((S - U) * ep, 0))[L]
    rank_diff_500_inv[s] = tanh(max((U - S) * ep, 0))[L]
  (argsort made stable: ties in teacher order; torch leaves them unspecified)."""
  under, over = np.zeros(list_rows.shape), np.zeros(list_rows.shape)
  m = list_rows.shape[1]
  for s in range(list_rows.shape[0]):
    lst = list_rows[s]
    s_rank = lst[np.argsort(-scores[s], kind="stable")]
    big_s, big_u = np.zeros(num_cols), np.zeros(num_cols)
    big_s[s_rank] = np.arange(m)
    big_u[lst] = np.arange(m)
    under[s] = np.tanh(np.maximum((big_s - big_u) * ep, 0.0))[lst]
    over[s] = np.tanh(np.maximum((big_u - big_s) * ep, 0.0))[lst]
  return under, over


def np_authors_relaxed_ranking(s1: np.ndarray, s2: np.ndarray) -> float:
  """Port of `Utils/dcd_loss.py::relaxed_ranking_loss` (float64): -(sum S1 - sum log(flip-cumsum
  of e^S1 + sum e^S2)), summed over rows."""
  s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
  above = s1.sum(1, keepdims=True)
  below1 = np.cumsum(np.exp(s1[:, ::-1]), axis=1)
  below2 = np.exp(s2).sum(1, keepdims=True)
  below = np.log(below1 + below2).sum(1, keepdims=True)
  return float(-(above - below).sum())


@pytest.fixture(scope="module")
def authors(citeulike_file):
  cfg = kd_config(citeulike_file, "dcd", num_devices=1)
  exp = train.Experiment(cfg)
  params = {m: exp.models[m].init(k) for m, k in zip(("teacher", "student"),
                                                      jax.random.split(jax.random.key(3)))}
  static = exp.prepare({"teacher": params["teacher"]})
  cache, _ = exp.refresh(static, {"student": params["student"]}, {}, jax.random.key(4), 0)
  return cfg, exp, params, static, cache


def _scores(exp, params, model):
  return np.asarray(exp.models[model].score_all(params[model], jnp.arange(exp.data.num_users)))


def test_authors_variant_is_the_default(authors):
  cfg, exp, *_ = authors
  assert cfg.method.variant == "authors" and exp.method.refresh_every == 3
  assert exp.method.refresh_reads == ("student",)  # the teacher's lists are built once
  assert set(exp.method.hparams) == {"lambda_kd", "lambda_icd"}


def test_teacher_user_and_item_lists(authors):
  cfg, exp, params, static, _ = authors
  m, data = cfg.method.top_m, exp.data
  scores = _scores(exp, params, "teacher")
  indptr, indices = data.split("train")
  observed = np.zeros((data.num_users, data.num_items), bool)
  for u in range(data.num_users):
    observed[u, indices[indptr[u]:indptr[u + 1]]] = True
  user_items, item_users = np.asarray(static["user_items"]), np.asarray(static["item_users"])
  assert np.asarray(static["user_valid"]).all() and np.asarray(static["item_valid"]).all()
  for u in range(data.num_users):
    s = np.where(observed[u], -np.inf, scores[u])
    np.testing.assert_array_equal(user_items[u], np.argsort(-s, kind="stable")[:m])
  for i in range(data.num_items):  # top users among those without i in training, ties by id
    s = np.where(observed[:, i], -np.inf, scores[:, i])
    np.testing.assert_array_equal(item_users[i], np.argsort(-s, kind="stable")[:m])


def test_refresh_weights_match_the_authors_loop(authors):
  cfg, exp, params, static, cache = authors
  ep = 1.0 / cfg.method.temperature
  data = exp.data
  s_scores = _scores(exp, params, "student")
  user_items = np.asarray(static["user_items"])
  want_u = np_authors_rank_diff(user_items, np.take_along_axis(s_scores, user_items, 1),
                                data.num_items, ep)
  item_users = np.asarray(static["item_users"])
  item_scores = np.take_along_axis(s_scores.T, item_users, 1)
  want_i = np_authors_rank_diff(item_users, item_scores, data.num_users, ep)
  for side, want in (("user", want_u), ("item", want_i)):
    for name, w in zip(("under", "over"), want):
      np.testing.assert_allclose(np.asarray(cache[f"{side}_{name}"]), w, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{side}_{name}")
  # Ranks within the list, no floor: an item the student ranks at or above the teacher has
  # under-estimation weight exactly 0, and each row has both kinds.
  under, over = np.asarray(cache["user_under"]), np.asarray(cache["user_over"])
  assert (under == 0).any(axis=1).all() and (under > 0).any(axis=1).all()
  assert np.all(over[:, 0] == 0) and np.all(under[:, -1] == 0)  # nothing above 0, below M - 1
  assert np.all((under == 0) | (over == 0))


@pytest.mark.slow
def test_draws_follow_the_weights_without_replacement():
  """K = 2 of 5 positions ∝ w (one zero weight): successive sampling without replacement; the
  sorted form is the same draw in teacher order."""
  w = np.array([0.5, 0.0, 2.0, 1.0, 0.25], np.float32)
  n = 40_000
  keys = jax.random.split(jax.random.key(1), n)
  weights = jnp.broadcast_to(jnp.asarray(w), (n, 5))
  valid = jnp.ones((n, 5), bool)
  drawn = np.asarray(jax.jit(dcd.draw_positions, static_argnums=(3, 4))(keys, weights, valid, 2,
                                                                          False))
  assert_ordered_pairs(drawn, w)
  ordered = np.asarray(jax.jit(dcd.draw_positions, static_argnums=(3, 4))(keys, weights, valid,
                                                                            2, True))
  np.testing.assert_array_equal(ordered, np.sort(drawn, axis=1))


def test_zero_weight_fill_as_torch_multinomial():
  """Fewer positive weights than K: every positive slot is drawn, then zero-weight valid slots
  (lowest first), never an invalid slot while a valid one is left."""
  w = jnp.array([[0.0, 0.3, 0.0, 0.0, 0.7, 0.0],
                 [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32)
  valid = jnp.array([[True, True, False, True, True, True],
                     [False, True, True, True, False, False]])
  keys = jax.random.split(jax.random.key(2), 2)
  got = np.asarray(dcd.draw_positions(keys, w, valid, 4, True))
  np.testing.assert_array_equal(got[0], [0, 1, 3, 4])  # positives 1, 4; zero-fill 0, 3
  # An all-zero row with 3 valid slots: those, then an invalid slot (its validity is False).
  assert set(got[1].tolist()) >= {1, 2, 3}
  assert np.asarray(valid)[1, got[1]].sum() == 3


@pytest.mark.slow
def test_loss_is_ucd_plus_icd_over_the_batch_unique_users_and_items(authors):
  """sample + loss inside the step's shard_map against the authors' loss on the drawn items:
  UCD over the batch's distinct users, ICD over its distinct positive items (padding rows
  dropped), under-estimated items in teacher order, everything from the teacher's lists."""
  cfg, exp, params, static, cache = authors
  users = jnp.array([5, 9, 5, 17, 9, 30, 2, 2], jnp.int32)
  pos = jnp.array([11, 40, 11, 7, 3, 99, 40, 60], jnp.int32)
  weight = jnp.array([1, 1, 1, 1, 1, 0, 1, 1], jnp.float32)  # row 5: padding only
  batch = {"user": users, "pos": pos, "weight": weight, "global": parallel.GLOBAL}
  view = {"static": static, "cache": cache, "carry": {}, "hparams": exp.hparams(), "epoch": 0}

  def run(view, batch):
    samples = exp.method.sample(view, batch, None, jax.random.key(0))
    return exp.method.loss(params, batch, samples, dict(view["hparams"], epoch=0)), samples

  mesh = kstep.make_mesh(1)
  (terms, aux), samples = jax.jit(jax.shard_map(
      run, mesh=mesh, in_specs=(jax.P(), jax.P("data")), out_specs=jax.P(),
      check_vma=False))(view, batch)
  samples = jax.device_get(samples)
  want_users, want_items = [2, 5, 9, 17], [3, 7, 11, 40, 60]
  np.testing.assert_array_equal(samples["users"][samples["user_mask"]], want_users)
  np.testing.assert_array_equal(samples["items"][samples["item_mask"]], want_items)
  s_scores = _scores(exp, params, "student")
  k = cfg.method.num_samples
  ucd = icd = 0.0
  for side, ids, lists in (("user", want_users, np.asarray(static["user_items"])),
                           ("item", want_items, np.asarray(static["item_users"]))):
    rows = samples[side + "s"]
    for r, x in enumerate(rows[:len(ids)]):
      under, over = samples[f"{side}_under"][r], samples[f"{side}_over"][r]
      assert len(set(under)) == len(set(over)) == k
      where = [int(np.flatnonzero(lists[x] == v)[0]) for v in under]
      assert where == sorted(where)  # teacher order
      assert np.isin(over, lists[x]).all()
      z = (lambda v: s_scores[x, v]) if side == "user" else (lambda v: s_scores[v, x])
      value = np_authors_relaxed_ranking(z(under)[None], z(over)[None])
      if side == "user":
        ucd += value
      else:
        icd += value
  np.testing.assert_allclose(float(aux["dcd"]), ucd, rtol=1e-5)
  np.testing.assert_allclose(float(aux["dcd_icd"]), icd, rtol=1e-5)
  np.testing.assert_allclose(float(terms["student"]),
                             cfg.method.lambda_kd * ucd + cfg.method.lambda_icd * icd, rtol=1e-5)
  assert float(aux["dcd_users"]) == 4 and float(aux["dcd_items"]) == 5


@pytest.mark.slow
def test_draws_change_every_step_and_follow_the_cached_weights(authors):
  """Per-batch draws (the authors draw in every batch from weights fixed for 3 epochs): two step
  keys give different draws; over many keys one user's under-estimated items follow its cached
  weights (the first of K = 1 draws, chi-square via successive-sampling pairs on K = 2)."""
  cfg, exp, params, static, cache = authors
  batch = {"user": jnp.array([5], jnp.int32), "pos": jnp.array([3], jnp.int32),
           "weight": jnp.ones(1), "global": parallel.GLOBAL}
  view = {"static": static, "cache": cache}
  mesh = kstep.make_mesh(1)
  sample = jax.jit(jax.shard_map(lambda v, b, key: exp.method.sample(v, b, None, key),
                                 mesh=mesh, in_specs=(jax.P(), jax.P("data"), jax.P()),
                                 out_specs=jax.P(), check_vma=False))
  a = jax.device_get(sample(view, batch, jax.random.key(0)))
  b = jax.device_get(sample(view, batch, jax.random.key(1)))
  assert not np.array_equal(a["user_under"][0], b["user_under"][0])
  w = np.asarray(cache["user_under"][5])
  n = 20_000
  pos = np.asarray(jax.jit(dcd.draw_positions, static_argnums=(3, 4))(
      jax.random.split(jax.random.key(5), n), jnp.broadcast_to(w, (n, len(w))),
      jnp.ones((n, len(w)), bool), 1, False))[:, 0]
  counts = np.bincount(pos, minlength=len(w))
  assert counts[w == 0].sum() == 0
  top = np.argmax(w)
  assert abs(counts[top] / n - w[top] / w.sum()) < 5 * np.sqrt(w[top] / w.sum() / n)


@pytest.mark.slow
def test_kds_variant_reproduces_the_earlier_dcd(citeulike_file):
  """`variant='kds'` (configs `dcd_kds`): the refresh draws and a fixed batch's loss equal those
  of this library's DCD before the variants (recorded from that code, same keys)."""
  cfg = kd_config(citeulike_file, "dcd_kds", num_devices=1)
  exp = train.Experiment(cfg)
  assert exp.method.refresh_every == 1 and set(exp.method.hparams) == {"lambda_kd"}
  params = {m: exp.models[m].init(k) for m, k in zip(("teacher", "student"),
                                                      jax.random.split(jax.random.key(7)))}
  static = exp.prepare({"teacher": params["teacher"]})
  cache, _ = exp.refresh(static, params, {}, jax.random.key(8), 0)
  np.testing.assert_array_equal(np.asarray(cache["under"])[:3],
                                [[143, 6, 71], [99, 54, 147], [45, 76, 83]])
  np.testing.assert_array_equal(np.asarray(cache["over"])[:3],
                                [[139, 50, 143], [101, 111, 122], [40, 32, 29]])
  users = jnp.array([5, 9, 5, 17, 9, 30, 2, 2], jnp.int32)
  batch = {"user": users, "pos": jnp.arange(1, 9, dtype=jnp.int32),
           "weight": jnp.array([1, 1, 1, 1, 1, 0, 1, 1], jnp.float32),
           "global": parallel.GLOBAL}
  view = {"static": static, "cache": cache, "carry": {}, "hparams": exp.hparams(), "epoch": 0}

  def run(view, batch):
    samples = exp.method.sample(view, batch, None, jax.random.key(0))
    return exp.method.loss(params, batch, samples, dict(view["hparams"], epoch=0))

  terms, aux = jax.jit(jax.shard_map(run, mesh=kstep.make_mesh(1),
                                     in_specs=(jax.P(), jax.P("data")), out_specs=jax.P(),
                                     check_vma=False))(view, batch)
  assert float(aux["dcd"]) == 19.151687622070312
  assert float(terms["student"]) == 0.19151687622070312


def test_bad_variant(citeulike_file):
  with pytest.raises(ValueError, match="variant"):
    train.Experiment(kd_config(citeulike_file, "dcd", num_devices=1, method__variant="paper"))
