"""The data-parallel axis and the global-batch helpers the train step hands to methods.

The step runs per device (pmap semantics) under `jax.shard_map` over the 1-D mesh axis `AXIS`.
Losses that couple the batch (sums over its unique users or items, similarity matrices) gather
the global batch's ids (never parameters), so every device computes the same global term; each
device then contributes its share of it, and the step's gradient mean over devices restores the
whole term. 4 devices thus give the result of 1. Methods never see the device count: the step
puts `GLOBAL` in the batch view (`batch['global']`) and a method calls its `unique`, `gather`
and `share`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

AXIS = "data"
# The vmap axis of several runs trained as one program (`kdrec_jax.runs`, `step.make_epoch`).
RUN_AXIS = "runs"


def device_count() -> int:
  """Number of devices on the data axis (inside the step)."""
  return jax.lax.axis_size(AXIS)


def in_runs() -> bool:
  """Whether the code being traced runs under the run axis (several runs as one program):
  there a `lax.cond` with a per-run predicate computes both branches."""
  try:
    jax.lax.axis_size(RUN_AXIS)
  except NameError:
    return False
  return True


def gather(x: jax.Array) -> jax.Array:
  """This device's [b, ...] slices of the global batch, concatenated in device order: [n b, ...]."""
  return jax.lax.all_gather(x, AXIS, tiled=True)


def global_unique(ids: jax.Array, valid: jax.Array, fill: int) -> tuple[jax.Array, jax.Array]:
  """The sorted unique valid ids of the global batch, padded with `fill` to a static size.

  ids, valid: this device's [b] (or [b, k]) ids and their validity; `fill` must exceed every id.
  Returns (unique [n b k], mask [n b k]), identical on every device.
  """
  ids = gather(jnp.where(valid, ids, fill).reshape(ids.shape[0], -1)).reshape(-1)
  unique = jnp.unique(ids, size=ids.shape[0], fill_value=fill)
  return unique, unique != fill


def replicated_share(x):
  """This device's share of a term that every device computes identically."""
  return jax.tree.map(lambda v: v / device_count(), x)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class GlobalBatch:
  """Global-batch helpers for methods whose loss couples the batch (inside the step).

  unique(ids, valid, fill) -> (unique, mask): the sorted unique valid ids of the global batch,
    padded with `fill` to a static size, the same on every device.
  gather(x): this device's [b, ...] slices of the global batch, concatenated in device order.
  share(term): this device's share of a term every device computes identically from the
    gathered batch (a pytree), so that the step's sum over devices is the term once.
  A static pytree (no leaves): a batch holding it passes through jit, vmap and shard_map.
  """
  unique: Callable
  gather: Callable
  share: Callable


GLOBAL = GlobalBatch(unique=global_unique, gather=gather, share=replicated_share)
