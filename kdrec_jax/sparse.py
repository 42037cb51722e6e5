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

  @property
  def row_lengths(self) -> jax.Array:
    """int32 [U]: the number of items in each row."""
    return self.indptr[1:] - self.indptr[:-1]




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
  """bool, shape of `items`: whether items[..] is in row users[..] (rows sorted); `users`
  broadcasts against `items`.

  A branchless binary search that carries one position through power-of-two steps, so the
  unrolled chain fuses into one kernel without recomputation.
  """
  users = jnp.broadcast_to(users, items.shape)
  lo = csr.indptr[users]
  hi = csr.indptr[users + 1]
  last = csr.indices.shape[0] - 1
  pos = lo - 1  # invariant: every element of the row at or before pos is < item
  step = 1 << max(int(csr.max_len).bit_length() - 1, 0)
  while step:
    cand = pos + step
    ok = (cand < hi) & (csr.indices[jnp.clip(cand, 0, last)] < items)
    pos = jnp.where(ok, cand, pos)
    step >>= 1
  first = pos + 1
  return (first < hi) & (csr.indices[jnp.clip(first, 0, last)] == items)
