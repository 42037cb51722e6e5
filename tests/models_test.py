"""Tests for kdrec_jax.models: shapes, hand-checked forwards (NeuMF, LightGCN, CDAE), gradients of
cf_loss against finite differences, score_all vs score (both NeuMF paths), `prepare` (LightGCN
propagates once per train step), a short training run on a real CiteULike sample against
popularity, and the BD launcher end to end with each new model."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import REPO_ROOT, load_config_module
from kdrec_jax import data as kdata
from kdrec_jax import metrics, models, ranking, sparse, train
from kdrec_jax import step as kstep
from kdrec_jax.data import Interactions
from kdrec_jax.models import cdae, lightgcn, neumf

PAIR_NAMES = ("bpr_mf", "neumf", "lightgcn")  # trained on (user, positive) pairs
NAMES = PAIR_NAMES + ("cdae",)                # cdae: on users
TINY_CFGS = {
    "bpr_mf": dict(dim=4, init_std=0.3),
    "neumf": dict(dim=3, mlp_dim=2, mlp_layers=(4, 3), init_std=0.3, item_chunk=3),
    "lightgcn": dict(dim=4, num_layers=2, init_std=0.3),
    "cdae": dict(dim=3, dropout=0.5, num_negatives=2, init_std=0.5),
}


def _cfg(name, **fields):
  return ml_collections.ConfigDict(dict(name=name, **fields))


@pytest.fixture(scope="module")
def tiny():
  """6 users x 8 items (item 7 never seen in training)."""
  train = [[0, 1, 2], [1, 3], [2, 4, 5], [0, 5, 6], [3], [1, 2, 4, 6]]
  val = [[3], [], [6], [1], [0], [5]]
  test = [[4], [0], [], [2], [7], [0]]
  return Interactions.from_rows("tiny", 8, train, val, test)


def _tiny_model(name, data, **overrides):
  return models.make(_cfg(name, **dict(TINY_CFGS[name], **overrides)), data.num_users,
                     data.num_items, data=data)


# ---------------------------------------------------------------------------------------------
# interface
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_shapes(name, tiny):
  model = _tiny_model(name, tiny)
  assert model.name == name
  params = jax.jit(model.init)(jax.random.key(0))
  users = jnp.array([0, 2, 5], jnp.int32)
  items = jnp.array([1, 7, 3], jnp.int32)

  @jax.jit
  def outputs(params):
    if model.batching.kind == "users":
      logits = model.forward(params, users, jax.random.split(jax.random.key(1), 3))
      assert logits.shape == (3, tiny.num_items)
      mask = jax.nn.one_hot(items, tiny.num_items)
      loss = model.cf_loss(logits, mask, mask[::-1], jnp.ones(3))
    else:
      loss = model.cf_loss(params, users, items, items[::-1], jnp.ones(3))
    return (model.score(params, users, items), model.score(params, users, jnp.tile(items, (3, 2))),
            model.score_all(params, users), model.representations(params, users, items), loss)

  pairs, lists, every, (u, i), loss = outputs(params)
  assert pairs.shape == (3,) and lists.shape == (3, 6) and every.shape == (3, tiny.num_items)
  assert u.shape[0] == i.shape[0] == 3 and u.shape[-1] == i.shape[-1]
  assert loss.shape == () and np.isfinite(float(loss))


def test_make_errors(tiny):
  with pytest.raises(ValueError, match="bpr_mf, neumf, lightgcn, cdae"):
    models.make(_cfg("nope", dim=2), 3, 4)
  for name in ("lightgcn", "cdae"):
    with pytest.raises(ValueError, match="needs the training data"):
      models.make(_cfg(name, dim=2), tiny.num_users, tiny.num_items)
    with pytest.raises(ValueError, match="expected 7 x 8"):
      models.make(_cfg(name, dim=2), 7, tiny.num_items, data=tiny)


def test_optional_fields_have_defaults(tiny):
  m = models.make(_cfg("neumf", dim=4), tiny.num_users, tiny.num_items)
  params = jax.eval_shape(m.init, jax.random.key(0))
  assert params["mlp_user"].shape == (tiny.num_users, 4)
  assert [layer["w"].shape for layer in params["mlp"]] == [(8, 8), (8, 4)]
  assert params["out"]["w"].shape == (8,)
  m = models.make(_cfg("lightgcn", dim=4), tiny.num_users, tiny.num_items, data=tiny)
  scores = jax.eval_shape(lambda k: m.score_all(m.init(k), jnp.arange(2)), jax.random.key(0))
  assert scores.shape == (2, tiny.num_items)


# ---------------------------------------------------------------------------------------------
# hand-checked forwards
# ---------------------------------------------------------------------------------------------

def _neumf_numpy(p, u, i):
  """NeuMF with the explicit [a_u; b_i] concatenation."""
  x = np.concatenate([p["mlp_user"][u], p["mlp_item"][i]])
  for layer in p["mlp"]:
    x = np.maximum(x @ layer["w"] + layer["b"], 0.0)
  return np.concatenate([p["gmf_user"][u] * p["gmf_item"][i], x]) @ p["out"]["w"] + p["out"]["b"]


def test_neumf_forward_by_hand():
  # d = m = 1, layers (2, 1): user 0 / item 0 worked out on paper.
  p = {"gmf_user": np.array([[2.0]]), "gmf_item": np.array([[3.0]]),
       "mlp_user": np.array([[1.0]]), "mlp_item": np.array([[-1.0]]),
       "mlp": [{"w": np.array([[1.0, 2.0], [3.0, -1.0]]), "b": np.array([0.5, 0.0])},
               {"w": np.array([[1.0], [-2.0]]), "b": np.array([0.25])}],
       "out": {"w": np.array([0.5, 2.0]), "b": np.array(0.1)}}
  # layer 1: [1, -1] @ W = [-2, 3] + [0.5, 0] -> relu [0, 3]; layer 2: -6 + 0.25 -> relu 0
  # logit: 0.5 * (2 * 3) + 2 * 0 + 0.1 = 3.1
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
  z = neumf.score(params, jnp.array([0]), jnp.array([0]))
  np.testing.assert_allclose(np.asarray(z), [3.1], rtol=1e-6)
  assert _neumf_numpy(p, 0, 0) == pytest.approx(3.1)
  p["mlp"][1]["b"] = np.array([7.0])  # layer 2: relu(1) = 1 -> logit 3 + 2 + 0.1
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
  np.testing.assert_allclose(np.asarray(neumf.score(params, jnp.array([0]), jnp.array([0]))),
                             [5.1], rtol=1e-6)


def test_neumf_matches_numpy(tiny):
  model = _tiny_model("neumf", tiny)
  params = jax.jit(model.init)(jax.random.key(1))
  rng = np.random.default_rng(0)  # non-zero biases so every term is exercised
  params["mlp"] = [dict(layer, b=jnp.asarray(rng.normal(0, 0.3, layer["b"].shape), jnp.float32))
                   for layer in params["mlp"]]
  params["out"]["b"] = jnp.float32(0.7)
  p = jax.tree.map(np.asarray, params)
  users = np.array([0, 1, 3, 5, 5])
  items = np.array([7, 2, 0, 4, 6])
  want = [_neumf_numpy(p, u, i) for u, i in zip(users, items)]
  got, (user_repr, item_repr) = jax.jit(
      lambda p, u, i: (model.score(p, u, i), model.representations(p, u, i)))(
          params, jnp.asarray(users), jnp.asarray(items))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(user_repr)[:, :3], p["gmf_user"][users])
  np.testing.assert_array_equal(np.asarray(item_repr)[:, 3:], p["mlp_item"][items])


def _dense_lightgcn(eu, ei, train_rows, num_layers):
  """LightGCN with the dense (U+I) x (U+I) normalised adjacency."""
  nu, ni = len(eu), len(ei)
  a = np.zeros((nu + ni, nu + ni))
  for u, row in enumerate(train_rows):
    for i in row:
      a[u, nu + i] = a[nu + i, u] = 1.0
  deg = a.sum(1)
  inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0)
  a_hat = inv[:, None] * a * inv[None, :]
  e = np.concatenate([eu, ei])
  layers = [e]
  for _ in range(num_layers):
    layers.append(a_hat @ layers[-1])
  out = np.mean(layers, axis=0)
  return out[:nu], out[nu:]


def test_lightgcn_two_users_three_items():
  # user 0 - items {0, 1}, user 1 - items {1, 2}: deg_u = (2, 2), deg_i = (1, 2, 1).
  train = [[0, 1], [1, 2]]
  data = Interactions.from_rows("g", 3, train, [[], []], [[], []])
  graph = lightgcn.build_graph(*data.split("train"), num_items=3)
  np.testing.assert_array_equal(np.asarray(graph["users"]), [0, 0, 1, 1])
  np.testing.assert_array_equal(np.asarray(graph["items"]), [0, 1, 1, 2])
  r = 1 / np.sqrt(2)
  np.testing.assert_allclose(np.asarray(graph["weights"]), [r, 0.5, 0.5, r], rtol=1e-6)
  eu = np.array([[1.0, 0.0], [0.0, 2.0]])
  ei = np.array([[1.0, 1.0], [-1.0, 0.0], [0.0, 4.0]])
  # One layer by hand: u0 = r*i0 + .5*i1 = (r - .5, r); i1 = .5*u0 + .5*u1 = (.5, 1).
  params = {"user": jnp.asarray(eu, jnp.float32), "item": jnp.asarray(ei, jnp.float32)}
  pu, pi = lightgcn.propagate(params, graph, num_layers=1)
  np.testing.assert_allclose(np.asarray(pu)[0], (eu[0] + [r - 0.5, r]) / 2, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(pi)[1], (ei[1] + [0.5, 1.0]) / 2, rtol=1e-6)
  for num_layers in (0, 1, 3):
    model = models.make(_cfg("lightgcn", dim=2, num_layers=num_layers), 2, 3, data=data)
    want_u, want_i = _dense_lightgcn(eu, ei, train, num_layers)
    got_u, got_i = model.representations(params, jnp.arange(2), jnp.arange(3))
    np.testing.assert_allclose(np.asarray(got_u), want_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_i), want_i, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.score_all(params, jnp.arange(2))),
                               want_u @ want_i.T, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lightgcn_matches_dense_on_tiny(tiny):
  model = _tiny_model("lightgcn", tiny)  # users/items of degree 0 included (item 7)
  params = model.init(jax.random.key(2))
  indptr, indices = tiny.split("train")
  rows = [indices[indptr[u]:indptr[u + 1]] for u in range(tiny.num_users)]
  want_u, want_i = _dense_lightgcn(np.asarray(params["user"], np.float64),
                                   np.asarray(params["item"], np.float64), rows, 2)
  got = model.score_all(params, jnp.arange(tiny.num_users))
  np.testing.assert_allclose(np.asarray(got), want_u @ want_i.T, rtol=1e-4, atol=1e-6)


def _cdae_numpy(p, rows, users):
  """CDAE logits [B, I] from dense (possibly dropped and rescaled) input rows, in float64."""
  pre = rows @ p["enc"]["w"] + p["enc"]["b"] + p["user"][users]
  return (1 / (1 + np.exp(-pre))) @ p["dec"]["w"] + p["dec"]["b"]


@pytest.mark.slow
def test_cdae_forward_by_hand():
  # 1 user x 2 items, d = 1, the user's row is {item 1}:
  # pre = w_enc[1] + b_enc + v_u = 2 + 0.5 - 1 = 1.5, h = sigmoid(1.5); z = (3h + 0.1, -h + 0.2).
  data = Interactions.from_rows("one", 2, [[1]], [[0]], [[]])
  model = models.make(_cfg("cdae", dim=1, dropout=0.0), 1, 2, data=data)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  params = {"enc": {"w": f32([[1.0], [2.0]]), "b": f32([0.5])}, "user": f32([[-1.0]]),
            "dec": {"w": f32([[3.0, -1.0]]), "b": f32([0.1, 0.2])}}
  h = 1 / (1 + np.exp(-1.5))
  want = [3 * h + 0.1, -h + 0.2]
  np.testing.assert_allclose(np.asarray(model.score_all(params, jnp.array([0])))[0], want,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(model.score(params, jnp.array([0, 0]), jnp.array([0, 1]))),
                             want, rtol=1e-6)
  np.testing.assert_allclose(  # no dropout: the training forward is the model itself
      np.asarray(model.forward(params, jnp.array([0]), jax.random.split(jax.random.key(0), 1))),
      [want], rtol=1e-6)
  # BCE on positive item 1 and negative item 0: softplus(-z_1) + softplus(z_0).
  loss = cdae.cf_loss(f32([want]), f32([[0, 1]]), f32([[1, 0]]), f32([2.0]))
  assert float(loss) == pytest.approx(2 * (np.log1p(np.exp(-want[1])) + np.log1p(np.exp(want[0]))),
                                      rel=1e-6)


@pytest.mark.slow
def test_cdae_dropout_matches_numpy(tiny):
  model = _tiny_model("cdae", tiny)
  params = model.init(jax.random.key(5))
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  users = jnp.array([0, 3, 5, 5], jnp.int32)
  keys = jax.random.split(jax.random.key(6), 4)
  rows = np.asarray(sparse.row_mask(sparse.DeviceCSR.from_numpy(*tiny.split("train")), users,
                                    tiny.num_items), np.float64)
  np.testing.assert_allclose(np.asarray(model.score_all(params, users)),
                             _cdae_numpy(p, rows, np.asarray(users)), rtol=1e-5, atol=1e-6)
  keep = np.asarray(ranking.uniform_rows(keys, tiny.num_items)) >= 0.5
  want = _cdae_numpy(p, rows * keep / 0.5, np.asarray(users))
  got = np.asarray(jax.jit(model.forward)(params, users, keys))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The two rows of user 5 drop different inputs (one key per row).
  assert not np.array_equal(got[2], got[3])
  # Over many rows, each input survives with probability 1 - dropout.
  many = np.asarray(ranking.uniform_rows(jax.random.split(jax.random.key(7), 4000), 8)) >= 0.5
  assert many.mean() == pytest.approx(0.5, abs=0.01)


# ---------------------------------------------------------------------------------------------
# gradients and score_all
# ---------------------------------------------------------------------------------------------

def _assert_gradient_matches_finite_differences(loss, params, rng):
  grads = jax.jit(jax.grad(loss))(params)
  leaves, treedef = jax.tree.flatten(params)
  eps = 1e-6
  for _ in range(4):  # directional derivatives along random directions
    v = treedef.unflatten([rng.normal(size=x.shape) for x in leaves])
    shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, v)  # noqa: E731
    fd = (float(loss(shift(eps))) - float(loss(shift(-eps)))) / (2 * eps)
    an = sum(np.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
    assert fd == pytest.approx(an, rel=1e-5, abs=1e-8)
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_cdae_loss_gradient_matches_finite_differences(tiny):
  """Through the training forward (dropout with fixed keys) and the masked BCE."""
  model = _tiny_model("cdae", tiny)
  users = jnp.array([0, 2, 3, 5], jnp.int32)
  keys = jax.random.split(jax.random.key(8), 4)
  rng = np.random.default_rng(1)
  pos = np.asarray(sparse.row_mask(sparse.DeviceCSR.from_numpy(*tiny.split("train")), users,
                                   tiny.num_items), np.float64)
  neg = (rng.random(pos.shape) < 0.4) * (1 - pos)
  weight = np.array([1.0, 0.5, 2.0, 0.0])
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), model.init(jax.random.key(3)))
    loss = jax.jit(lambda p: model.cf_loss(model.forward(p, users, keys), pos, neg, weight))
    _assert_gradient_matches_finite_differences(loss, params, rng)


@pytest.mark.slow
@pytest.mark.parametrize("name", PAIR_NAMES)
def test_cf_loss_gradient_matches_finite_differences(name, tiny):
  model = _tiny_model(name, tiny)
  users = jnp.array([0, 1, 2, 3, 5, 5], jnp.int32)
  pos = jnp.array([1, 3, 4, 6, 2, 6], jnp.int32)
  neg = jnp.array([7, 0, 1, 2, 3, 0], jnp.int32)
  weight = jnp.array([1.0, 0.5, 1.0, 2.0, 1.0, 0.0])
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), model.init(jax.random.key(3)))
    # Jitter every leaf (NeuMF's zero biases would put ReLU inputs exactly on the kink).
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape), params)
    loss = jax.jit(lambda p: model.cf_loss(p, users, pos, neg, weight.astype(jnp.float64)))
    _assert_gradient_matches_finite_differences(loss, params, rng)


@pytest.mark.parametrize("name,overrides", [("bpr_mf", {}), ("lightgcn", {}), ("cdae", {}),
                                            ("neumf", {"item_chunk": 3}),
                                            ("neumf", {"item_chunk": 8}),
                                            ("neumf", {"item_chunk": 100})])
@pytest.mark.slow
def test_score_all_matches_score(name, overrides, tiny):
  model = _tiny_model(name, tiny, **overrides)
  params = model.init(jax.random.key(4))
  users = jnp.array([5, 0, 3, 3], jnp.int32)
  all_items = jnp.broadcast_to(jnp.arange(tiny.num_items, dtype=jnp.int32),
                               (len(users), tiny.num_items))
  np.testing.assert_allclose(np.asarray(jax.jit(model.score_all)(params, users)),
                             np.asarray(model.score(params, users, all_items)), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("max_macs", [0, 10**9])  # NeuMF's matmul and elementwise MLP paths
def test_neumf_score_all_paths_match_score(max_macs, tiny, monkeypatch):
  monkeypatch.setattr(neumf, "ELEMENTWISE_MAX_MACS", max_macs)
  monkeypatch.setattr(neumf, "USER_BLOCK", 3)  # 4 users: a padded last block
  params = _tiny_model("neumf", tiny).init(jax.random.key(4))
  rng = np.random.default_rng(1)  # non-zero biases so every term is exercised
  params["mlp"] = [dict(layer, b=jnp.asarray(rng.normal(0, 0.3, layer["b"].shape), jnp.float32))
                   for layer in params["mlp"]]
  params["out"]["b"] = jnp.float32(-0.4)
  users = jnp.array([5, 0, 3, 3], jnp.int32)
  all_items = jnp.broadcast_to(jnp.arange(tiny.num_items, dtype=jnp.int32),
                               (len(users), tiny.num_items))
  want = np.asarray(neumf.score(params, users, all_items))
  for chunk in (3, 8, 100):
    got = jax.jit(functools.partial(neumf.score_all, item_chunk=chunk))(params, users)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6, err_msg=str(chunk))


# ---------------------------------------------------------------------------------------------
# prepare: one LightGCN propagation per train step
# ---------------------------------------------------------------------------------------------

def test_prepare_is_identity_except_lightgcn(tiny):
  for name in ("bpr_mf", "neumf", "cdae"):
    model = _tiny_model(name, tiny)
    params = model.init(jax.random.key(0))
    assert model.prepare(params) is params, name


@pytest.mark.slow
@pytest.mark.parametrize("batch_l2", [0.0, 0.3])
def test_lightgcn_prepared_params_give_the_same_results_and_gradients(batch_l2, tiny):
  model = _tiny_model("lightgcn", tiny, batch_l2=batch_l2)
  params = model.init(jax.random.key(6))
  prepared = jax.jit(model.prepare)(params)
  assert set(prepared) == {"user", "item", "prop_user", "prop_item"}
  for k in ("user", "item"):  # layer 0 kept (what batch_l2 reads)
    np.testing.assert_array_equal(np.asarray(prepared[k]), np.asarray(params[k]))
  users = jnp.array([0, 2, 5, 5], jnp.int32)
  pos = jnp.array([1, 4, 2, 6], jnp.int32)
  neg = jnp.array([7, 0, 3, 0], jnp.int32)
  weight = jnp.array([1.0, 0.5, 2.0, 0.0])

  def calls(p):
    return (model.score(p, users, pos), model.score(p, users, jnp.stack([pos, neg], -1)),
            model.score_all(p, users), model.representations(p, users, neg),
            model.cf_loss(p, users, pos, neg, weight))

  want, got = jax.jit(calls)(params), jax.jit(calls)(prepared)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  loss = lambda p: model.cf_loss(p, users, pos, neg, weight)  # noqa: E731
  g_plain = jax.jit(jax.grad(loss))(params)
  g_prepared = jax.jit(jax.grad(lambda p: loss(model.prepare(p))))(params)
  assert set(g_prepared) == {"user", "item"}
  for k in ("user", "item"):
    assert np.abs(np.asarray(g_plain[k])).max() > 0
    np.testing.assert_allclose(np.asarray(g_prepared[k]), np.asarray(g_plain[k]), rtol=1e-5,
                               atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_lightgcn_bd_step_propagates_once_per_model(citeulike_file, monkeypatch):
  """Tracing one BD train step with LightGCN teacher and student: two propagations (one per
  model) with `prepare`, more without it (each model's own loss and BD's scoring of both);
  one step gives the same losses and params either way."""
  cfg = load_config_module(os.path.join(REPO_ROOT, "configs", "bd_lightgcn_citeulike.py")
                           ).get_config("quick")
  cfg.data.path, cfg.num_devices, cfg.batch_size = citeulike_file, 1, 32
  cfg.teacher.dim, cfg.student.dim = 8, 3
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  state, _ = program.refresh(program.initial_state(), jax.random.key(0), 0)
  idx = np.arange(32)
  batch = {"user": exp.examples["user"][idx], "pos": exp.examples["pos"][idx],
           "index": jnp.arange(32, dtype=jnp.int32), "weight": jnp.ones(32, jnp.float32)}
  calls = {"n": 0}
  propagate = lightgcn.propagate

  def counting(*args, **kwargs):
    calls["n"] += 1
    return propagate(*args, **kwargs)

  monkeypatch.setattr(lightgcn, "propagate", counting)
  counts, results = {}, {}
  for variant in ("prepared", "plain"):
    ms = dict(exp.models)
    if variant == "plain":
      ms = {m: model._replace(prepare=lambda p: p) for m, model in ms.items()}
    step = train.build_phase(exp, "distill", models=ms).step
    calls["n"] = 0
    fn = jax.jit(kstep.shard(step, kstep.make_mesh(1)))
    results[variant] = jax.device_get(fn(state, batch, jax.random.key(1)))
    counts[variant] = calls["n"]
  print(f"propagations traced per step: {counts}")
  assert counts["prepared"] == 2 < counts["plain"], counts
  (s_a, m_a), (s_b, m_b) = results["prepared"], results["plain"]
  assert float(m_a["bd_student"]) > 0
  for k in m_b:
    np.testing.assert_allclose(np.asarray(m_a[k]), np.asarray(m_b[k]), rtol=1e-5, err_msg=k)
  for m in train.MODELS:
    for k in ("user", "item"):
      np.testing.assert_allclose(s_a.params[m][k], s_b.params[m][k], rtol=1e-5,
                                 atol=1e-6, err_msg=f"{m}.{k}")


# ---------------------------------------------------------------------------------------------
# learning on real data
# ---------------------------------------------------------------------------------------------

SAMPLE_USERS = 1500


@pytest.fixture(scope="module")
def citeulike_sample():
  """The shipped CiteULike-t restricted to its first SAMPLE_USERS users (items they touch)."""
  full = kdata.load(kdata.default_data_config())
  rows = {}
  for s in ("train", "val", "test"):
    indptr, indices = full.split(s)
    rows[s] = [indices[indptr[u]:indptr[u + 1]] for u in range(SAMPLE_USERS)]
  used = np.unique(np.concatenate([np.concatenate(r) for r in rows.values()]))
  remap = np.full(full.num_items, -1, np.int64)
  remap[used] = np.arange(len(used))
  return Interactions.from_rows("citeulike-sample", len(used),
                                *[[remap[r] for r in rows[s]] for s in ("train", "val", "test")])


def _popularity_scores(popularity, users):
  return jnp.broadcast_to(popularity, (users.shape[0], popularity.shape[0]))


def _train(model, data, steps, batch_size, lr, weight_decay, seed=0):
  """Adam (with coupled L2) on the model's own loss over random batches of its batching (pairs
  with uniform negatives, or users with sampled negative masks): one jitted scan."""
  users_all, items_all = (jnp.asarray(x) for x in data.train_pairs())
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  row_len = jnp.asarray(np.diff(data.split("train")[0]))
  opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))
  ones = jnp.ones(batch_size)

  def batch_loss(params, k):
    if model.batching.kind == "users":
      k_idx, k_neg, k_drop = jax.random.split(k, 3)
      users = jax.random.randint(k_idx, (batch_size,), 0, data.num_users)
      pos = sparse.row_mask(train, users, data.num_items)
      neg, _ = ranking.draws_mask(jax.random.split(k_neg, batch_size),
                                  (~pos).astype(jnp.float32), model.num_negatives * row_len[users])
      logits = model.forward(params, users, jax.random.split(k_drop, batch_size))
      return model.cf_loss(logits, pos, neg, ones)
    k_idx, k_neg = jax.random.split(k)
    idx = jax.random.randint(k_idx, (batch_size,), 0, users_all.shape[0])
    neg = jax.random.randint(k_neg, (batch_size,), 0, data.num_items)
    return model.cf_loss(params, users_all[idx], items_all[idx], neg, ones)

  @jax.jit
  def run(params, key):
    def step(carry, k):
      params, opt_state = carry
      loss, g = jax.value_and_grad(batch_loss)(params, k)
      updates, opt_state = opt.update(g, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss / batch_size
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                       jax.random.split(key, steps))
    return params, losses

  return run(model.init(jax.random.key(seed)), jax.random.key(seed + 1))


TRAIN_SETTINGS = {  # (model fields, steps, batch, lr, weight decay)
    "bpr_mf": (dict(dim=32, init_std=0.1), 400, 512, 1e-2, 1e-2),
    "neumf": (dict(dim=16, mlp_dim=16, mlp_layers=(32, 16), init_std=0.01), 400, 512, 1e-2, 1e-2),
    "lightgcn": (dict(dim=32, num_layers=2, init_std=0.1), 200, 512, 1e-2, 1e-3),
    "cdae": (dict(dim=32, dropout=0.5, num_negatives=5), 300, 128, 1e-2, 1e-4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_training_beats_popularity(name, citeulike_sample):
  data = citeulike_sample
  fields, steps, batch, lr, wd = TRAIN_SETTINGS[name]
  model = models.make(_cfg(name, **fields), data.num_users, data.num_items, data=data)
  params, losses = _train(model, data, steps, batch, lr, wd)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)) and losses[-50:].mean() < 0.5 * losses[:10].mean()
  ks, chunk = (20,), 500
  got = metrics.evaluate(model.score_all, params, data, "val", ks=ks, chunk_size=chunk)
  pop = metrics.evaluate(_popularity_scores, jnp.asarray(data.item_popularity, jnp.float32),
                         data, "val", ks=ks, chunk_size=chunk)
  summary = f"{name}: val NDCG@20 {got['NDCG@20']:.4f} vs popularity {pop['NDCG@20']:.4f}"
  print(summary)
  # Every model must have learned a ranking far better than chance (random ~ 20 / I = 0.001).
  assert got["NDCG@20"] > 0.5 * pop["NDCG@20"], summary
  assert got["NDCG@20"] > pop["NDCG@20"], summary


# ---------------------------------------------------------------------------------------------
# BD through the launcher
# ---------------------------------------------------------------------------------------------

def _write_users_dat(path, num_users=100, num_items=150, seed=0):
  rng = np.random.default_rng(seed)
  lines = []
  for u in range(num_users):
    n = int(rng.integers(6, 21))
    # two taste groups so there is something to learn; every item id occurs
    pool = np.arange(u % 2, num_items, 2)
    chosen = rng.choice(pool, n, replace=False)
    lines.append(" ".join(str(x) for x in [n, *chosen]))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.mark.slow
def test_bd_launcher_end_to_end(tmp_path):
  """BD's CDAE quick config (user batches: its own path through the step) end to end through
  `launch.train`; the NeuMF and LightGCN configs build their experiment (their training is
  covered above and by the method tests)."""
  data_path = _write_users_dat(tmp_path / "users.dat")
  for name in ("neumf", "lightgcn"):
    cfg = load_config_module(os.path.join(REPO_ROOT, "configs", f"bd_{name}_citeulike.py")
                             ).get_config("quick")
    cfg.data.path = data_path
    exp = train.Experiment(cfg)
    assert exp.models["teacher"].name == exp.models["student"].name == name
    assert exp.method.name == "bd" and tuple(exp.method.learners) == train.MODELS
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device: no fake-device slowdown
  workdir = tmp_path / "cdae"
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/bd_cdae_citeulike.py:quick",
         f"--workdir={workdir}", f"--config.data.path={data_path}", "--config.warmup.epochs=1",
         "--config.distill.epochs=1", "--config.method.refresh_every=1",
         "--config.batch_size=32", "--config.eval.chunk_size=64"]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert set(results["phases"]) == {"warmup", "distill", "control"}
  for phase in results["phases"].values():
    for m in ("teacher", "student"):
      assert np.isfinite(phase[m]["test"]["NDCG@10"]), m
  assert results["config"]["teacher"]["name"] == results["config"]["student"]["name"] == "cdae"
