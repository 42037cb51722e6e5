"""The top-K / ranking paths as they were before the fast top-K path, kept only as `bench_topk`'s baseline.

Frozen copies (commit 294073a) of: the chunked full-protocol evaluation (`full_ranks` per split,
`sparse.row_mask` masks, chunks of `chunk_size` users), `top_unobserved` / `TopLists` (XLA's
float `lax.top_k`), DCD's `capped_ranks`, UnKD's `group_lists` (through the float / int32-key
`top_k_candidates`) and BD's exact `user_ranks` with `mask_positives` (the packed-key sort and a
[rows, order] scatter). Not used by the library.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import metrics, ranking, sparse


@functools.partial(jax.jit, static_argnames=("score_fn", "ks", "chunk_size"))
def _per_user_full(score_fn, params, users, excluded, held, *, ks, chunk_size):
  def one_chunk(chunk):
    scores = score_fn(params, chunk)
    ranks, valid = metrics.full_ranks(scores, chunk, excluded, held, max(ks))
    return metrics.ranking_metrics_from_ranks(ranks, valid, ks)

  out = jax.lax.map(one_chunk, users.reshape(-1, chunk_size))
  return {name: v.reshape(-1) for name, v in out.items()}


class Evaluator:
  """The previous `metrics.Evaluator`, full protocol only."""

  def __init__(self, data, split="test", ks=metrics.DEFAULT_KS, chunk_size=1024,
               protocol="full", num_negatives=499, exclude_other=True, average="heldout"):
    del num_negatives
    if protocol != "full":
      raise ValueError("the reference evaluator has the full protocol only")
    self.data, self.split, self.ks, self.average = data, split, tuple(sorted(set(ks))), average
    other = "val" if split == "test" else "test"
    held_indptr, held_indices = data.split(split)
    self.users = np.flatnonzero(np.diff(held_indptr) > 0).astype(np.int32)
    n = len(self.users)
    self.chunk_size = max(1, min(int(chunk_size), n))
    pad = (-n) % self.chunk_size
    self._padded = jnp.asarray(np.concatenate([self.users, np.full(pad, self.users[-1],
                                                                   np.int32)]))
    self._held = sparse.DeviceCSR.from_numpy(held_indptr, held_indices)
    excluded = [data.split("train")] + ([data.split(other)] if exclude_other else [])
    self._excluded = sparse.DeviceCSR.from_numpy(
        *metrics._union_csr(data.num_users, data.num_items, *excluded))

  def __call__(self, score_fn, params):
    out = _per_user_full(score_fn, params, self._padded, self._excluded, self._held,
                         ks=self.ks, chunk_size=self.chunk_size)
    n = self.data.num_users if self.average == "all" else len(self.users)
    return {name: float(np.sum(np.asarray(v)[:len(self.users)], dtype=np.float64) / n)
            for name, v in out.items()}


def top_unobserved(scores, exclude, m):
  masked = jnp.where(exclude, -jnp.inf, scores.astype(jnp.float32))
  _, items = jax.lax.top_k(masked, m)
  return items.astype(jnp.int32), ~jnp.take_along_axis(exclude, items, axis=-1)


class TopLists:
  """The previous `ranking.TopLists` (build and all_rows without a stored table)."""

  def __init__(self, score_all, train, num_users, num_items, m, chunk=256):
    self.score_all, self.train = score_all, train
    self.num_users, self.num_items, self.m = num_users, num_items, int(m)
    self.chunk = max(1, min(int(chunk), num_users))

  def compute(self, params, users):
    exclude = sparse.row_mask(self.train, users, self.num_items)
    return top_unobserved(self.score_all(params, users), exclude, self.m)

  def _users(self):
    n_chunks = -(-self.num_users // self.chunk)
    users = jnp.arange(n_chunks * self.chunk, dtype=jnp.int32) % self.num_users
    return users.reshape(n_chunks, self.chunk)

  def build(self, params):
    items, valid = jax.lax.map(lambda u: self.compute(params, u), self._users())
    return {"items": items.reshape(-1, self.m)[:self.num_users],
            "valid": valid.reshape(-1, self.m)[:self.num_users]}

  def all_rows(self, table, params, fn):
    del table
    out = jax.lax.map(lambda u: fn(u, *self.compute(params, u)), self._users())
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:self.num_users], out)


def capped_ranks(scores, items, cap):
  top = jax.lax.top_k(scores.astype(jnp.float32), cap)[1]
  rows = jnp.arange(scores.shape[0])[:, None]
  position = jnp.full(scores.shape, cap, jnp.int32).at[rows, top].set(
      jnp.arange(cap, dtype=jnp.int32))
  return jnp.take_along_axis(position, items, axis=-1)


def top_k_candidates(scores, candidate, k):
  def by_floats(_):
    s = scores.astype(jnp.float32)
    s = jnp.where(candidate, jnp.where(s == 0, 0.0, s), -jnp.inf)
    items = jax.lax.top_k(s, k)[1]
    return items.astype(jnp.int32), jnp.take_along_axis(candidate, items, axis=-1)

  def by_keys(_):
    key = jnp.where(candidate, ranking.order_key(scores), jnp.int32(ranking.EXCLUDED_KEY))
    top_keys, items = jax.lax.top_k(key, k)
    return items.astype(jnp.int32), top_keys != ranking.EXCLUDED_KEY

  finite = jnp.all(jnp.isfinite(scores) | ~candidate)
  return jax.lax.cond(finite, by_floats, by_keys, None)


def group_lists(scores, observed, groups, num_groups, length):
  items, valid = [], []
  for g in range(num_groups):
    it, va = top_k_candidates(scores, ~observed & (groups == g)[None, :], length)
    items.append(it)
    valid.append(va)
  return jnp.stack(items, axis=1), jnp.stack(valid, axis=1)


def ranks(scores, exclude):
  key = jnp.where(exclude, jnp.int32(ranking.EXCLUDED_KEY), ranking.order_key(scores))
  order = ranking._descending_order_of_keys(key)
  c, n = scores.shape
  rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[:, None], (c, n))
  positions = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (c, n))
  out = jnp.zeros((c, n), jnp.int32).at[rows, order].set(positions)
  return jnp.where(exclude, 0, out)


def user_ranks(models, train, num_items, mask_positives, params, users):
  """The previous `bd.user_ranks` with `mask_positives` (the exact sort)."""
  assert mask_positives
  mask = sparse.row_mask(train, users, num_items)
  return tuple(ranks(models[m].score_all(params[m], users), mask)
               for m in ("teacher", "student"))
