"""CDAE (Wu et al., WSDM'16), as in the BD reference notebook: a denoising autoencoder of each
user's binary training row with a user embedding.

  h_u = sigmoid(W_enc^T dropout(r_u) + b_enc + v_u)       (hidden size `dim`)
  z_u = W_dec^T h_u + b_dec                                (logits over all items)

Trained on user batches: BCE on the user's positives and on a 0/1 mask of sampled negatives
(`num_negatives` draws per positive), summed. Dropout is inverted (kept inputs scaled by
1 / (1 - p)) and only in `forward`; `score`/`score_all` are the deterministic model.

Parameters are a plain pytree {'enc': {'w': [I, d], 'b': [d]}, 'user': [U, d],
'dec': {'w': [d, I], 'b': [I]}}. The training rows are bound by `make` (`train`, a DeviceCSR);
every function here is pure.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kdrec_jax import ranking, sparse


def init(key: jax.Array, num_users: int, num_items: int, dim: int, init_std: float = 1.0):
  """PyTorch's defaults, as the notebook has them: Linear layers U(+-1/sqrt(fan_in)) for weights
  and biases, the user embedding N(0, init_std)."""
  ke, keb, kd, kdb, ku = jax.random.split(key, 5)
  uniform = lambda k, shape, fan_in: jax.random.uniform(  # noqa: E731
      k, shape, jnp.float32, -1.0, 1.0) / jnp.sqrt(float(fan_in))
  return {"enc": {"w": uniform(ke, (num_items, dim), num_items),
                  "b": uniform(keb, (dim,), num_items)},
          "user": init_std * jax.random.normal(ku, (num_users, dim), jnp.float32),
          "dec": {"w": uniform(kd, (dim, num_items), dim), "b": uniform(kdb, (num_items,), dim)}}


def _hidden(params, users: jax.Array, rows: jax.Array) -> jax.Array:
  return jax.nn.sigmoid(rows @ params["enc"]["w"] + params["enc"]["b"] + params["user"][users])


def hidden(params, users: jax.Array, *, train: sparse.DeviceCSR) -> jax.Array:
  """The users' hidden codes h_u [C, d] from their full (undropped) training rows."""
  num_items = params["dec"]["b"].shape[0]
  rows = sparse.row_mask(train, users, num_items).astype(jnp.float32)
  return _hidden(params, users, rows)


def forward(params, users: jax.Array, keys: jax.Array, *, train: sparse.DeviceCSR,
            dropout: float) -> jax.Array:
  """Training-mode logits [B, I]: input dropout with one key per user (`keys` [B])."""
  num_items = params["dec"]["b"].shape[0]
  rows = sparse.row_mask(train, users, num_items)
  if dropout:
    rows = rows & (ranking.uniform_rows(keys, num_items) >= dropout)
  h = _hidden(params, users, rows.astype(jnp.float32) / (1.0 - dropout))
  return h @ params["dec"]["w"] + params["dec"]["b"]


def score_all(params, users: jax.Array, *, train: sparse.DeviceCSR) -> jax.Array:
  """Logits of a chunk of users against every item: [C, I]."""
  return hidden(params, users, train=train) @ params["dec"]["w"] + params["dec"]["b"]


def score(params, users: jax.Array, items: jax.Array, *, train: sparse.DeviceCSR) -> jax.Array:
  """Logits of (user, item) pairs; `users` [B] against `items` [B] or [B, n]."""
  h = hidden(params, users, train=train)
  w = params["dec"]["w"].T[items]  # [B, d] or [B, n, d]
  if items.ndim == users.ndim + 1:
    return jnp.einsum("bd,bnd->bn", h, w) + params["dec"]["b"][items]
  return jnp.sum(h * w, axis=-1) + params["dec"]["b"][items]


def representations(params, users: jax.Array, items: jax.Array, *, train: sparse.DeviceCSR):
  """(h_u, the decoder's item vectors W_dec[:, i])."""
  return hidden(params, users, train=train), params["dec"]["w"].T[items]


def cf_loss(logits: jax.Array, pos_mask: jax.Array, neg_mask: jax.Array, weight: jax.Array
            ) -> jax.Array:
  """Summed BCE over each user's positives (label 1) and sampled negatives (label 0), users
  weighted by `weight` [B]; `logits`, `pos_mask`, `neg_mask` are [B, I]."""
  per_item = (pos_mask * jax.nn.softplus(-logits) + neg_mask * jax.nn.softplus(logits))
  return jnp.sum(weight * jnp.sum(per_item, axis=-1))
