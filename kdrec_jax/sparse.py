"""CSR rows on device: dense masks for a chunk of users and membership tests, in O(nnz) memory."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["indptr", "indices"], meta_fields=["max_len"])
@dataclasses.dataclass(frozen=True)
class DeviceCSR:
  """A CSR matrix of item ids on device; a pytree whose `max_len` (row-length bound) is static."""
  indptr: jax.Array   # int32 [U+1]
  indices: jax.Array  # int32 [nnz] (at least one element, so gathers are always valid)
  max_len: int

  @classmethod
  def from_numpy(cls, indptr: np.ndarray, indices: np.ndarray) -> "DeviceCSR":
    max_len = int(np.diff(indptr).max()) if len(indptr) > 1 else 0
    idx = np.asarray(indices, np.int32)
    if len(idx) == 0:
      idx = np.zeros(1, np.int32)
    return cls(jnp.asarray(indptr, jnp.int32), jnp.asarray(idx), max(max_len, 1))




def padded_rows(csr: DeviceCSR, users: jax.Array, pad: int) -> tuple[jax.Array, jax.Array]:
  """Items of each user's row, padded to `csr.max_len` with `pad`; returns (items, valid)."""
  start = csr.indptr[users]
  length = csr.indptr[users + 1] - start
  offs = jnp.arange(csr.max_len, dtype=jnp.int32)
  valid = offs[None, :] < length[:, None]
  pos = jnp.minimum(start[:, None] + offs[None, :], csr.indices.shape[0] - 1)
  return jnp.where(valid, csr.indices[pos], pad), valid


def row_mask(csr: DeviceCSR, users: jax.Array, num_items: int) -> jax.Array:
  """bool [len(users), num_items]: True where the item is in the user's row."""
  items, _ = padded_rows(csr, users, pad=num_items)
  rows = jnp.broadcast_to(jnp.arange(users.shape[0])[:, None], items.shape)
  mask = jnp.zeros((users.shape[0], num_items), bool)
  return mask.at[rows, items].set(True, mode="drop")


def contains(csr: DeviceCSR, users: jax.Array, items: jax.Array) -> jax.Array:
  """bool, shape of `items`: whether items[..] is in row users[..] (binary search, rows sorted).

  `users` broadcasts against `items`.
  """
  users = jnp.broadcast_to(users, items.shape)
  lo = csr.indptr[users]
  hi = csr.indptr[users + 1]  # search in [lo, hi)
  n = csr.indices.shape[0]
  steps = max(int(np.ceil(np.log2(csr.max_len + 1))), 1)

  def body(_, lohi):
    lo, hi = lohi
    mid = (lo + hi) // 2
    go_right = csr.indices[jnp.minimum(mid, n - 1)] < items
    active = lo < hi
    lo = jnp.where(active & go_right, mid + 1, lo)
    hi = jnp.where(active & ~go_right, mid, hi)
    return lo, hi

  for _ in range(steps):  # unrolled: XLA fuses the gathers (a loop costs kernels per step on GPU)
    lo, hi = body(None, (lo, hi))
  end = csr.indptr[users + 1]
  return (lo < end) & (csr.indices[jnp.minimum(lo, n - 1)] == items)
