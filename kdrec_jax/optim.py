"""Optimisers of the train step: Adam with coupled L2 decay (dense, the reference's), and an
opt-in row-sparse ("lazy") Adam for embedding tables.

Dense Adam touches every row of every table at every step: at batch 128 on the 2-core CPU that is
most of a BPR-MF epoch (benchmarks/REPORT.md, the step profile). `row_sparse_adam` updates, in
each table (a 2-D leaf with more than `max_rows` rows), only the rows whose gradient is not zero
in that step: their moments and values follow Adam exactly (bias correction by the global step
count, the coupled decay added to their gradient); the other rows keep their moments and values
(no moment decay, no momentum drift, no weight decay), as TensorFlow's LazyAdam and PyTorch's
SparseAdam do. Other leaves (biases, MLP weights) get dense Adam. With at most `max_rows` rows
touched per table and step, the update costs O(max_rows x dim) plus one read of the gradient;
a step touching more rows falls back to the dense update of that table (same semantics). The
semantics differ from dense Adam, so results differ: it is never chosen silently
(`optimizer='lazy_adam'` in a phase's optimiser config).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "lazy_adam")


class RowSparse(NamedTuple):
  """An optimiser that applies itself: init(params) -> state;
  apply(grads, state, params) -> (new_params, new_state)."""
  init: Callable
  apply: Callable


def dense_adam(lr: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay (decay added to the gradient, as torch's Adam does)."""
  adam = optax.adam(lr)
  if weight_decay:
    return optax.chain(optax.add_decayed_weights(weight_decay), adam)
  return adam


def make(opt_cfg, max_rows: int):
  """The optimiser `opt_cfg` names ('adam' by default): an optax transformation, or `RowSparse`
  for 'lazy_adam' (tables with more than `max_rows` rows updated row-sparsely)."""
  name = str(opt_cfg.get("optimizer", "adam"))
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
  if name == "adam":
    return dense_adam(opt_cfg.lr, opt_cfg.weight_decay)
  return row_sparse_adam(opt_cfg.lr, opt_cfg.weight_decay, max_rows)


def apply(opt, grads, opt_state, params):
  """(new_params, new_opt_state) for an optax transformation or a `RowSparse` optimiser."""
  if isinstance(opt, RowSparse):
    return opt.apply(grads, opt_state, params)
  updates, opt_state = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def row_sparse_adam(lr: float, weight_decay: float = 0.0, max_rows: int = 1024,
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> RowSparse:
  """Adam that updates only the rows of large 2-D leaves whose gradient is non-zero (see the
  module docstring); the state is {'count', 'mu', 'nu'} like optax's Adam."""
  max_rows = int(max_rows)

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"count": jnp.zeros((), jnp.int32), "mu": zeros,
            "nu": jax.tree.map(jnp.zeros_like, params)}

  def adam_rows(g, p, m, v, c1, c2):
    g = g + weight_decay * p if weight_decay else g
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * jnp.square(g)
    return p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), m, v

  def leaf(g, p, m, v, c1, c2):
    if g.ndim != 2 or g.shape[0] <= max_rows:
      return adam_rows(g, p, m, v, c1, c2)
    touched = jnp.any(g != 0, axis=-1)

    def sparse(_):
      rows = jnp.nonzero(touched, size=max_rows, fill_value=g.shape[0])[0]
      safe = jnp.minimum(rows, g.shape[0] - 1)
      new = adam_rows(g[safe], p[safe], m[safe], v[safe], c1, c2)
      return tuple(x.at[rows].set(y, mode="drop") for x, y in zip((p, m, v), new))

    def dense(_):
      new = adam_rows(g, p, m, v, c1, c2)
      keep = touched[:, None]
      return tuple(jnp.where(keep, y, x) for x, y in zip((p, m, v), new))

    return jax.lax.cond(jnp.sum(touched) <= max_rows, sparse, dense, None)

  def apply_(grads, state, params):
    count = state["count"] + 1
    t = count.astype(jnp.float32)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    out = jax.tree.map(lambda g, p, m, v: leaf(g, p, m, v, c1, c2), grads, params, state["mu"],
                       state["nu"])
    pick = lambda i: jax.tree.map(lambda o: o[i], out,  # noqa: E731
                                  is_leaf=lambda o: isinstance(o, tuple))
    return pick(0), {"count": count, "mu": pick(1), "nu": pick(2)}

  return RowSparse(init=init, apply=apply_)
