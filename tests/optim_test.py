"""Tests for kdrec_jax.optim: the row-sparse Adam against a numpy LazyAdam and optax's Adam."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdrec_jax import optim


def np_lazy_adam(grads, p, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
  """Reference: per step, rows with a non-zero gradient get an Adam step (global count)."""
  p = p.astype(np.float64).copy()
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, g in enumerate(grads, start=1):
    rows = np.any(g != 0, axis=1)
    gg = g[rows] + wd * p[rows]
    m[rows] = b1 * m[rows] + (1 - b1) * gg
    v[rows] = b2 * v[rows] + (1 - b2) * gg ** 2
    p[rows] -= lr * (m[rows] / (1 - b1 ** t)) / (np.sqrt(v[rows] / (1 - b2 ** t)) + eps)
  return p, m, v


def _grads(steps, rows, dim, touched, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    g = np.zeros((rows, dim), np.float32)
    idx = rng.choice(rows, touched, replace=False)
    g[idx] = rng.normal(size=(touched, dim))
    out.append(g)
  return out


def _run(opt, params, grads):
  state = opt.init(params)
  step = jax.jit(lambda g, s, p: optim.apply(opt, g, s, p))
  for g in grads:
    params, state = step(g, state, params)
  return params, state


@pytest.mark.parametrize("max_rows", [12, 3])  # 3 < rows touched per step: the dense fallback
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_row_sparse_adam_matches_numpy_lazy_adam(max_rows, wd):
  grads = _grads(6, 40, 5, touched=8)
  p0 = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)
  bias = np.arange(3, dtype=np.float32)
  params = {"table": jnp.asarray(p0), "bias": jnp.asarray(bias)}
  opt = optim.row_sparse_adam(0.1, wd, max_rows=max_rows)
  got, state = _run(opt, params, [{"table": g, "bias": np.ones(3, np.float32)} for g in grads])
  want, m, v = np_lazy_adam(grads, p0, 0.1, wd)
  np.testing.assert_allclose(np.asarray(got["table"]), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state["mu"]["table"]), m, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state["nu"]["table"]), v, rtol=1e-5, atol=1e-9)
  never = ~np.any(np.stack(grads) != 0, axis=(0, 2))
  assert never.any()  # a row no step touched keeps its value and zero moments
  np.testing.assert_array_equal(np.asarray(got["table"])[never], p0[never])
  # The small leaf is dense Adam: six steps of gradient one.
  dense, _ = _run(optim.dense_adam(0.1, wd), {"bias": jnp.asarray(bias)},
                  [{"bias": np.ones(3, np.float32)}] * 6)
  np.testing.assert_allclose(np.asarray(got["bias"]), np.asarray(dense["bias"]), rtol=1e-6)


def test_row_sparse_adam_equals_dense_adam_when_every_row_has_a_gradient():
  grads = _grads(5, 30, 4, touched=30, seed=2)
  p0 = {"table": jnp.asarray(np.random.default_rng(3).normal(size=(30, 4)), jnp.float32)}
  got, _ = _run(optim.row_sparse_adam(1e-2, 1e-3, max_rows=8), p0, [{"table": g} for g in grads])
  want, _ = _run(optim.dense_adam(1e-2, 1e-3), p0, [{"table": g} for g in grads])
  np.testing.assert_allclose(np.asarray(got["table"]), np.asarray(want["table"]), rtol=1e-5,
                             atol=1e-7)


def test_make_names_the_optimizer():
  cfg = lambda **kw: ml_collections.ConfigDict(dict(dict(lr=1e-3, weight_decay=0.0), **kw))  # noqa
  assert isinstance(optim.make(cfg(), 64), optax.GradientTransformation)
  assert isinstance(optim.make(cfg(optimizer="lazy_adam"), 64), optim.RowSparse)
  with pytest.raises(ValueError, match="optimizer must be one of"):
    optim.make(cfg(optimizer="sgd"), 64)
