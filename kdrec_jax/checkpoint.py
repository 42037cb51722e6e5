"""Orbax checkpoints, in one place: one directory per training phase, steps are epochs; and
standalone params directories (e.g. a teacher trained elsewhere, for `config.teacher_init`)."""
from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

from kdrec_jax import faults


class PhaseCheckpoints:
  """Saves and restores a phase's train state (a pytree) under `<root>/<phase>/<epoch>`."""

  def __init__(self, root: str, phase: str, max_to_keep: int = 2, keep_epochs=()):
    """`keep_epochs`: epochs whose checkpoints are kept beyond `max_to_keep` (e.g. a teacher's
    training trajectory, for methods that distil from it)."""
    self.directory = os.path.abspath(os.path.join(root, phase))
    self.max_to_keep = max_to_keep
    self.keep_epochs = frozenset(int(e) for e in keep_epochs)
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    if not self.keep_epochs:
      options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True)
    else:  # the latest `max_to_keep`, and every epoch in `keep_epochs`
      policies = ocp.checkpoint_managers
      options = ocp.CheckpointManagerOptions(create=True, preservation_policy=(
          policies.AnyPreservationPolicy([
              policies.LatestN(n=self.max_to_keep),
              policies.CustomSteps(steps=sorted(self.keep_epochs))])))
    return ocp.CheckpointManager(self.directory, options=options)

  def latest_epoch(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_epochs(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, epoch: int, tree: Any) -> None:
    """Saves `tree` as `epoch` (a no-op if that epoch is already the latest checkpoint)."""
    if self.latest_epoch() == epoch:
      return
    self._manager.save(epoch, args=ocp.args.StandardSave(tree), force=True)
    faults.point("checkpoint")  # the save is under way (orbax writes in the background)
    self._manager.wait_until_finished()

  def restore(self, like: Any, epoch: Optional[int] = None) -> Any:
    """Restores the checkpoint at `epoch` (default: latest) into the structure of `like`."""
    epoch = self._epoch(epoch)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract))

  def restore_latest(self, like: Any) -> tuple[Optional[int], Any]:
    """(epoch, state) of the newest readable checkpoint, (None, None) if there is none.

    A checkpoint that cannot be restored (truncated, garbled, wrong structure) is reported by
    path, renamed to `<epoch>.unreadable` (kept for inspection, ignored from then on) and the one
    before it is tried.
    """
    for epoch in sorted(self._manager.all_steps(), reverse=True):
      try:
        return epoch, self.restore(like, epoch)
      except Exception as e:  # noqa: BLE001 - any failure to read means: use an older one
        path = os.path.join(self.directory, str(epoch))
        logging.error("Checkpoint %s is unreadable (%s: %s); moving it to %s.unreadable and "
                      "trying the previous one.", path, type(e).__name__,
                      str(e).splitlines()[0] if str(e) else "", path)
        self._manager.close()
        os.replace(path, path + ".unreadable")
        self._manager = self._new_manager()
    return None, None

  def restore_raw(self, epoch: Optional[int] = None) -> Any:
    """Restores the checkpoint at `epoch` (default: latest) as it was saved (nested dicts)."""
    return self._manager.restore(self._epoch(epoch), args=ocp.args.StandardRestore())

  def _epoch(self, epoch: Optional[int]) -> int:
    epoch = self.latest_epoch() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return epoch

  def close(self) -> None:
    self._manager.close()


def save_params(path: str, params: Any) -> None:
  """Writes a params pytree to the new directory `path` (usable as `config.teacher_init`)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), params)


def is_params_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA"))


def load_params(path: str) -> Any:
  """The params pytree `save_params` wrote to `path`."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path))
