"""NeuMF (He et al., WWW'17): a GMF tower and an MLP tower fused by one output layer.

GMF: g_ui = p_u * q_i (size `dim`). MLP: h_ui = relu(... relu(W_0 [a_u; b_i] + c_0) ...) over
separate embeddings a_u, b_i of size `mlp_dim`. Logit: z_ui = w^T [g_ui; h_ui] + c.

Parameters are a plain pytree:
  {'gmf_user': [U, d], 'gmf_item': [I, d], 'mlp_user': [U, m], 'mlp_item': [I, m],
   'mlp': [{'w': [in, out], 'b': [out]}, ...], 'out': {'w': [d + h_last], 'b': []}}
The first MLP weight is applied as W_0 = [W_u; W_i] to the two halves separately, so
`score_all` never builds the [users, items, 2m] concatenation. Every function here is pure.
Ranking all items with `score_all` costs the MLP for every (user, item) pair: for layers (100, 50)
10^4 FLOP per pair in the second layer's matmul, which bounds its time.
"""
from __future__ import annotations

import functools
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


def _mlp_term(params, pre):
  """The MLP tower's share of the logits, w_h^T h, from first-layer pre-activations [..., h0]."""
  h = jax.nn.relu(pre)
  for layer in params["mlp"][1:]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return h @ params["out"]["w"][params["gmf_user"].shape[-1]:]


def _fuse(params, gmf_user, gmf_item, user_part, item_part):
  """Logits from per-user and per-item terms that broadcast against each other."""
  d = gmf_user.shape[-1]
  w = params["out"]["w"]
  return (jnp.sum((gmf_user * w[:d]) * gmf_item, axis=-1)
          + _mlp_term(params, user_part + item_part) + params["out"]["b"])


def score(params, users: jax.Array, items: jax.Array) -> jax.Array:
  """Scores of (user, item) pairs; `users` [B] against `items` [B] or [B, n]."""
  user_part, item_part = _first_layer_parts(params, users, items)
  gmf_user, gmf_item = params["gmf_user"][users], params["gmf_item"][items]
  if items.ndim == users.ndim + 1:
    gmf_user, user_part = gmf_user[:, None], user_part[:, None]
  return _fuse(params, gmf_user, gmf_item, user_part, item_part)


# `score_all` computes an MLP elementwise when its hidden layers after the first need at most this
# many multiply-adds per (user, item) pair (layers (2d, d) up to d = 22); larger ones use matmuls.
ELEMENTWISE_MAX_MACS = 1024
USER_BLOCK = 16  # users per step of the elementwise MLP


def score_all(params, users: jax.Array, item_chunk: int = 32) -> jax.Array:
  """Scores of a chunk of users against every item: [C, I].

  The GMF term is one [C, d] x [d, I] matmul. The MLP term of a small MLP (`ELEMENTWISE_MAX_MACS`)
  is computed elementwise, one [USER_BLOCK, I] plane per hidden unit, which XLA fuses into one loop
  with no per-pair activations in memory (with matmuls, layers this narrow run at a few GFLOP/s on
  CPU). A larger MLP is a chain of matmuls over item chunks of `item_chunk` (`lax.map`, the last
  chunk padded): intermediate memory O(C * item_chunk * hidden); keep C * item_chunk ~ 10^4 so the
  activations stay in cache.
  """
  d = params["gmf_user"].shape[-1]
  gmf = (params["gmf_user"][users] * params["out"]["w"][:d]) @ params["gmf_item"].T
  macs = sum(layer["w"].shape[0] * layer["w"].shape[1] for layer in params["mlp"][1:])
  if macs <= ELEMENTWISE_MAX_MACS:
    mlp = _mlp_elementwise(params, users)
  else:
    mlp = _mlp_chunked(params, users, item_chunk)
  return gmf + mlp + params["out"]["b"]


def _mlp_elementwise(params, users: jax.Array) -> jax.Array:
  """MLP term [C, I], unit by unit on [block, I] planes, mapped over blocks of users."""
  num_items, c = params["mlp_item"].shape[0], users.shape[0]
  block = min(USER_BLOCK, c)
  n_blocks = -(-c // block)
  padded = users[jnp.arange(n_blocks * block) % c]  # padding repeats users
  user_part, item_part = _first_layer_parts(params, padded, jnp.arange(num_items))
  item_part = item_part.T  # [h0, I]
  w_out = params["out"]["w"][params["gmf_user"].shape[-1]:]

  def dot(w, h):  # sum_k w[k] h[k] over a list of planes
    return functools.reduce(lambda acc, k: acc + w[k] * h[k], range(1, len(h)), w[0] * h[0])

  def one_block(u):  # [block, h0]
    h = [jax.nn.relu(u[:, k, None] + item_part[k]) for k in range(u.shape[-1])]
    for layer in params["mlp"][1:]:
      h = [jax.nn.relu(dot(layer["w"][:, j], h) + layer["b"][j])
           for j in range(layer["w"].shape[1])]
    return dot(w_out, h)

  out = jax.lax.map(one_block, user_part.reshape(n_blocks, block, -1))  # [n_blocks, block, I]
  return out.reshape(n_blocks * block, num_items)[:c]


def _mlp_chunked(params, users: jax.Array, item_chunk: int) -> jax.Array:
  """MLP term [C, I] with matmuls, in item chunks of `item_chunk`."""
  num_items = params["mlp_item"].shape[0]
  chunk = max(1, min(int(item_chunk), num_items))
  n_chunks = -(-num_items // chunk)
  items = jnp.arange(n_chunks * chunk, dtype=jnp.int32) % num_items  # padding repeats items
  user_part, item_part = _first_layer_parts(params, users, items)
  out = jax.lax.map(lambda a_i: _mlp_term(params, user_part[:, None] + a_i[None]),
                    item_part.reshape(n_chunks, chunk, -1))  # [n_chunks, C, chunk]
  return jnp.moveaxis(out, 0, 1).reshape(users.shape[0], n_chunks * chunk)[:, :num_items]


def representations(params, users: jax.Array, items: jax.Array):
  """User and item embeddings: [GMF; MLP] concatenated, sizes d + m."""
  return (jnp.concatenate([params["gmf_user"][users], params["mlp_user"][users]], axis=-1),
          jnp.concatenate([params["gmf_item"][items], params["mlp_item"][items]], axis=-1))


def cf_loss(params, users: jax.Array, pos: jax.Array, neg: jax.Array, weight: jax.Array
            ) -> jax.Array:
  """Summed BPR loss on the NeuMF logits."""
  return bpr_loss(score(params, users, pos), score(params, users, neg), weight)
