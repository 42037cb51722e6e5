"""BPR-MF (Rendle et al., UAI'09): score z_ui = <p_u, q_i>, trained with the pairwise BPR loss.

Parameters are a plain pytree {'user': [U, d], 'item': [I, d]}; every function here is pure.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def init(key: jax.Array, num_users: int, num_items: int, dim: int, init_std: float = 0.1):
  ku, ki = jax.random.split(key)
  return {"user": init_std * jax.random.normal(ku, (num_users, dim), jnp.float32),
          "item": init_std * jax.random.normal(ki, (num_items, dim), jnp.float32)}


def score(params, users: jax.Array, items: jax.Array) -> jax.Array:
  """Scores of (user, item) pairs; `users` [B] against `items` [B] or [B, n]."""
  p = params["user"][users]
  q = params["item"][items]
  if items.ndim == users.ndim + 1:
    return jnp.einsum("bd,bnd->bn", p, q)
  return jnp.sum(p * q, axis=-1)


def score_all(params, users: jax.Array) -> jax.Array:
  """Scores of a chunk of users against every item: [C, I]."""
  return params["user"][users] @ params["item"].T


def representations(params, users: jax.Array, items: jax.Array):
  """The (user, item) embeddings that representation-distillation methods (DE, HTD) use."""
  return params["user"][users], params["item"][items]


def bpr_loss(pos_scores: jax.Array, neg_scores: jax.Array, weight: jax.Array) -> jax.Array:
  """Summed BPR loss, -sum_b w_b log sigma(z_ui - z_uj)."""
  return -jnp.sum(weight * jax.nn.log_sigmoid(pos_scores - neg_scores))


def cf_loss(params, users: jax.Array, pos: jax.Array, neg: jax.Array, weight: jax.Array
            ) -> jax.Array:
  """The model's own loss: summed BPR with the given negatives."""
  return bpr_loss(score(params, users, pos), score(params, users, neg), weight)
