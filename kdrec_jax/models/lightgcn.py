"""LightGCN (He et al., SIGIR'20): embeddings smoothed over the user-item graph, dot-product score.

Layer k+1: e_u = sum_{i in N(u)} e_i / sqrt(|N(u)| |N(i)|), and symmetrically for items, i.e.
E^{k+1} = D^{-1/2} A D^{-1/2} E^k on the bipartite graph of the training interactions. The final
embedding is the mean of layers 0..L. The graph is built once (`build_graph`) as edge arrays and
bound to the functions by `make`; propagation is two segment sums per layer (no dense U x I).

Parameters are a plain pytree {'user': [U, d], 'item': [I, d]} (layer 0); every function here is
pure and propagates from the params it is given, unless they are `prepare`d: then they also hold
the propagated embeddings ('prop_user', 'prop_item'), which the functions read instead, so that
a train step calling several of them propagates once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax.models.bpr_mf import bpr_loss


def build_graph(indptr: np.ndarray, indices: np.ndarray, num_items: int) -> dict:
  """Edge arrays of the normalised graph from the training CSR: {'users', 'items' (int32 [E],
  user-major), 'weights' (float32 [E], 1 / sqrt(deg_u deg_i))}."""
  indptr = np.asarray(indptr, np.int64)
  deg_u = np.diff(indptr)
  users = np.repeat(np.arange(len(deg_u), dtype=np.int32), deg_u)
  items = np.asarray(indices, np.int32)
  deg_i = np.bincount(items, minlength=num_items)
  weights = 1.0 / np.sqrt(deg_u[users].astype(np.float64) * deg_i[items])
  return {"users": jnp.asarray(users), "items": jnp.asarray(items),
          "weights": jnp.asarray(weights, jnp.float32)}


def init(key: jax.Array, num_users: int, num_items: int, dim: int, init_std: float = 0.1):
  ku, ki = jax.random.split(key)
  return {"user": init_std * jax.random.normal(ku, (num_users, dim), jnp.float32),
          "item": init_std * jax.random.normal(ki, (num_items, dim), jnp.float32)}


def propagate(params, graph: dict, num_layers: int):
  """Final (user [U, d], item [I, d]) embeddings: the mean of layers 0..num_layers."""
  eu, ei = params["user"], params["item"]
  num_users, num_items = eu.shape[0], ei.shape[0]
  u, i, w = graph["users"], graph["items"], graph["weights"][:, None]
  sum_u, sum_i = eu, ei
  for _ in range(num_layers):
    eu, ei = (jax.ops.segment_sum(w * ei[i], u, num_users, indices_are_sorted=True),
              jax.ops.segment_sum(w * eu[u], i, num_items))
    sum_u, sum_i = sum_u + eu, sum_i + ei
  return sum_u / (num_layers + 1), sum_i / (num_layers + 1)


def prepare(params, *, graph: dict, num_layers: int):
  """`params` with the propagated embeddings added as 'prop_user' [U, d] and 'prop_item' [I, d]
  (recomputed from the layer-0 'user', 'item', which are kept). Every function here gives the same
  result, and the same gradient with respect to `params`, on the prepared dict."""
  eu, ei = propagate(params, graph, num_layers)
  return dict(params, prop_user=eu, prop_item=ei)


def _final(params, graph: dict, num_layers: int):
  """The propagated (user, item) embeddings: the prepared ones, if any, else propagated now."""
  if "prop_user" in params:
    return params["prop_user"], params["prop_item"]
  return propagate(params, graph, num_layers)


def score(params, users: jax.Array, items: jax.Array, *, graph: dict, num_layers: int
          ) -> jax.Array:
  """Scores of (user, item) pairs; `users` [B] against `items` [B] or [B, n]."""
  eu, ei = _final(params, graph, num_layers)
  p, q = eu[users], ei[items]
  if items.ndim == users.ndim + 1:
    return jnp.einsum("bd,bnd->bn", p, q)
  return jnp.sum(p * q, axis=-1)


def score_all(params, users: jax.Array, *, graph: dict, num_layers: int) -> jax.Array:
  """Scores of a chunk of users against every item: [C, I]."""
  eu, ei = _final(params, graph, num_layers)
  return eu[users] @ ei.T


def representations(params, users: jax.Array, items: jax.Array, *, graph: dict,
                    num_layers: int):
  """The propagated (user, item) embeddings."""
  eu, ei = _final(params, graph, num_layers)
  return eu[users], ei[items]


def cf_loss(params, users: jax.Array, pos: jax.Array, neg: jax.Array, weight: jax.Array, *,
            graph: dict, num_layers: int) -> jax.Array:
  """Summed BPR loss on the propagated embeddings (one propagation for both terms)."""
  eu, ei = _final(params, graph, num_layers)
  p = eu[users]
  return bpr_loss(jnp.sum(p * ei[pos], axis=-1), jnp.sum(p * ei[neg], axis=-1), weight)
