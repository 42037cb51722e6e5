"""NeuMF (He et al., WWW'17): a GMF tower and an MLP tower fused by one output layer.

GMF: g_ui = p_u * q_i (size `dim`). MLP: h_ui = relu(... relu(W_0 [a_u; b_i] + c_0) ...) over
separate embeddings a_u, b_i of size `mlp_dim`. Logit: z_ui = w^T [g_ui; h_ui] + c.

Parameters are a plain pytree:
  {'gmf_user': [U, d], 'gmf_item': [I, d], 'mlp_user': [U, m], 'mlp_item': [I, m],
   'mlp': [{'w': [in, out], 'b': [out]}, ...], 'out': {'w': [d + h_last], 'b': []}}
The first MLP weight is applied as W_0 = [W_u; W_i] to the two halves separately, so
`score_all` never builds the [users, items, 2m] concatenation. Every function here is pure.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kdrec_jax.models.bpr_mf import bpr_loss


def init(key: jax.Array, num_users: int, num_items: int, dim: int, mlp_dim: int,
         mlp_layers: Sequence[int], init_std: float = 0.01):
  """Embeddings N(0, init_std); hidden layers Glorot-uniform, output LeCun-uniform; biases 0."""
  if not mlp_layers:
    raise ValueError("NeuMF needs at least one MLP layer")
  k_emb, k_mlp, k_out = jax.random.split(key, 3)
  kgu, kgi, kmu, kmi = jax.random.split(k_emb, 4)
  normal = lambda k, n, d: init_std * jax.random.normal(k, (n, d), jnp.float32)  # noqa: E731
  glorot = jax.nn.initializers.glorot_uniform()
  sizes = [2 * mlp_dim, *mlp_layers]
  mlp = [{"w": glorot(k, (n_in, n_out), jnp.float32), "b": jnp.zeros((n_out,), jnp.float32)}
         for k, n_in, n_out in zip(jax.random.split(k_mlp, len(mlp_layers)), sizes[:-1],
                                   sizes[1:])]
  w_out = jax.nn.initializers.lecun_uniform()(k_out, (dim + sizes[-1], 1), jnp.float32)[:, 0]
  return {"gmf_user": normal(kgu, num_users, dim), "gmf_item": normal(kgi, num_items, dim),
          "mlp_user": normal(kmu, num_users, mlp_dim), "mlp_item": normal(kmi, num_items, mlp_dim),
          "mlp": mlp, "out": {"w": w_out, "b": jnp.zeros((), jnp.float32)}}


def _first_layer_parts(params, users: jax.Array, items: jax.Array):
  """The first MLP layer's pre-activation as a user part (with the bias) and an item part."""
  w0 = params["mlp"][0]["w"]
  m = params["mlp_user"].shape[-1]
  user_part = params["mlp_user"][users] @ w0[:m] + params["mlp"][0]["b"]
  item_part = params["mlp_item"][items] @ w0[m:]
  return user_part, item_part


def _fuse(params, gmf_user, gmf_item, user_part, item_part):
  """Logits from per-user and per-item terms that broadcast against each other."""
  h = jax.nn.relu(user_part + item_part)
  for layer in params["mlp"][1:]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  d = gmf_user.shape[-1]
  w = params["out"]["w"]
  return (jnp.sum((gmf_user * w[:d]) * gmf_item, axis=-1) + h @ w[d:] + params["out"]["b"])


def score(params, users: jax.Array, items: jax.Array) -> jax.Array:
  """Scores of (user, item) pairs; `users` [B] against `items` [B] or [B, n]."""
  user_part, item_part = _first_layer_parts(params, users, items)
  gmf_user, gmf_item = params["gmf_user"][users], params["gmf_item"][items]
  if items.ndim == users.ndim + 1:
    gmf_user, user_part = gmf_user[:, None], user_part[:, None]
  return _fuse(params, gmf_user, gmf_item, user_part, item_part)


def score_all(params, users: jax.Array, item_chunk: int = 4096) -> jax.Array:
  """Scores of a chunk of users against every item: [C, I], in item chunks of `item_chunk`.

  Intermediate memory is O(C * item_chunk * hidden): items are scored chunk by chunk with
  `lax.map` (the last chunk padded).
  """
  num_items = params["gmf_item"].shape[0]
  chunk = max(1, min(int(item_chunk), num_items))
  n_chunks = -(-num_items // chunk)
  pad = n_chunks * chunk - num_items
  items = jnp.arange(n_chunks * chunk, dtype=jnp.int32) % num_items  # padding repeats items
  user_part, item_part = _first_layer_parts(params, users, items)
  gmf_user, gmf_item = params["gmf_user"][users], params["gmf_item"][items]

  def one_chunk(xs):
    g_i, a_i = xs  # [chunk, d], [chunk, h0]
    return _fuse(params, gmf_user[:, None], g_i[None], user_part[:, None], a_i[None])

  out = jax.lax.map(one_chunk, (gmf_item.reshape(n_chunks, chunk, -1),
                                item_part.reshape(n_chunks, chunk, -1)))  # [n_chunks, C, chunk]
  out = jnp.moveaxis(out, 0, 1).reshape(users.shape[0], n_chunks * chunk)
  return out[:, :num_items] if pad else out


def representations(params, users: jax.Array, items: jax.Array):
  """User and item embeddings: [GMF; MLP] concatenated, sizes d + m."""
  return (jnp.concatenate([params["gmf_user"][users], params["mlp_user"][users]], axis=-1),
          jnp.concatenate([params["gmf_item"][items], params["mlp_item"][items]], axis=-1))


def cf_loss(params, users: jax.Array, pos: jax.Array, neg: jax.Array, weight: jax.Array
            ) -> jax.Array:
  """Summed BPR loss on the NeuMF logits."""
  return bpr_loss(score(params, users, pos), score(params, users, neg), weight)
