"""Knowledge-distillation methods as data: each is a `Method`, a bundle of pure functions that the
one train step calls. Adding a method never touches the step or the loop."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional


class Method(NamedTuple):
  """A distillation method.

  refresh(snapshot) -> method_state: rebuilds the method's per-refresh state (e.g. sampling
    tables) from `snapshot` = {'teacher': params, 'student': params}; jittable and deterministic,
    so a checkpoint only stores the snapshot.
  refresh_every: epochs between refreshes (0: refresh once at the start of distillation).
  sample(method_state, users [B], keys [B]) -> samples: per-example draws (one key per example,
    so results do not depend on how the batch is split over devices).
  loss(params, users [B], weight [B], samples) -> ({'teacher': l, 'student': l}, aux): the
    distillation terms added to each model's own loss; guides' outputs are stop-gradient.
  cf_negatives(samples, uniform) -> {'teacher': neg [B], 'student': neg [B]} or None: negatives
    for the models' own losses, when a method replaces the uniform ones.
  """
  name: str
  refresh: Callable[[Any], Any]
  refresh_every: int
  sample: Callable
  loss: Callable
  cf_negatives: Optional[Callable] = None


def make(cfg, models, data) -> Method:
  """Builds the method named by `cfg.name` for `models` = {'teacher': Model, 'student': Model}."""
  if cfg.name == "bd":
    from kdrec_jax.methods import bd
    return bd.make(cfg, models, data)
  raise ValueError(f"unknown method {cfg.name!r}; available: bd")
