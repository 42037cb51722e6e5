"""Knowledge-distillation methods as data: each is a `Method`, a bundle of pure functions that the
one train step and the schedule call. Adding a method never touches the step or the loop.

The registry is this package: every module here (not starting with '_') is a method, named by
its file, with
  make(cfg, models, data) -> Method
  DEFAULTS: dict   its settings' defaults (where they come from, in a comment beside them)
  LABEL: str       its name in tables, PAPER: str its reference.
`defaults(name)` gives a method's settings as a config section; protocol configs compose it
with their own changes, and the table generator reads `label(name)`.

A method says which learners its distillation phase trains ('teacher', 'student' and, for
methods with networks of their own, 'method'); the other models are frozen (replicated, never
updated, their own loss not computed, left out of that phase's checkpoints).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Mapping, NamedTuple, Optional

LEARNERS = ("teacher", "student", "method")
# Every method module of this package, found on disk: registering a method is adding its file.
NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


class Method(NamedTuple):
  """A distillation method.

  learners: which of 'teacher', 'student', 'method' learn in the distillation phase (BD: teacher
    and student; teacher->student methods: the student; DE: the student and its experts).
  loss(outputs, batch, samples, hp) -> ({learner: term}, aux): the distillation terms added to
    each learner's own loss. outputs: {'teacher', 'student'}: the models' params (pair batches)
    or training-mode logits [B, I] (user batches), plus 'method': the method's params if any.
    batch: {'user' [B], 'pos' [B] (pairs), 'neg': {model: [B]} (the models' own negatives,
    pairs), 'weight' [B] (0 for padding), 'global': the global-batch helpers
    (`parallel.GlobalBatch`)}. hp: the traced hyperparameters (`hparams`) plus 'epoch' (int32).
    Terms are this device's part of a sum over the global batch: a per-example sum over this
    device's rows as it is, and a term computed from the global batch (e.g. over its unique users,
    `batch['global'].unique`) as `batch['global'].share(term)`.
  sample(view, batch, keys, key) -> samples: per-example draws (keys: one PRNG key per example,
    so results do not depend on how the batch is split over devices) and global ones (key: the
    same on every device). view: {'static', 'cache', 'carry', 'hparams', 'epoch'}.
  prepare(frozen) -> static: per-phase constants computed once from the frozen teachers
    (frozen: {name: params}: 'teacher', each of `config.teachers` by name and their trajectory
    checkpoints as '<name>@<epoch>'), e.g. the teacher's top-M unobserved items per user, under
    a memory budget; jittable.
  refresh(static, params, carry, key, epoch) -> (cache, carry): per-period state (sampling
    tables, per-epoch random sets) from the models' params, every `refresh_every` epochs
    (0: once, at the start of the phase). Deterministic in its inputs, so a checkpoint stores
    only the trained models' params at the last refresh ('snapshot') and the carry.
  refresh_reads: the models whose params `refresh` reads.
  hparams: {name: float}: hyperparameters the step receives as traced values (changing them
    never recompiles).
  init(key) -> params of the method's own networks (flax), trained when 'method' is a learner.
  init_carry() -> carry: state the step writes (via `update_carry(carry, batch, samples)`) and
    the checkpoint keeps.
  cf_negatives(samples, uniform) -> {model: neg [B]}: negatives for the models' own losses, when
    a method replaces the uniform ones.
  report(experiment, params) -> dict: an analysis of both models added to a phase's final results
    when both are evaluated (BD: `student_beats_teacher`).
  """
  name: str
  loss: Callable
  learners: tuple[str, ...] = ("teacher", "student")
  sample: Optional[Callable] = None
  prepare: Optional[Callable] = None
  refresh: Optional[Callable] = None
  refresh_every: int = 0
  refresh_reads: tuple[str, ...] = ()
  hparams: Mapping[str, float] = {}
  init: Optional[Callable[[Any], Any]] = None
  init_carry: Optional[Callable[[], Any]] = None
  update_carry: Optional[Callable] = None
  cf_negatives: Optional[Callable] = None
  report: Optional[Callable] = None

  @property
  def teacher_to_student(self) -> bool:
    """True when the teacher is frozen in the distillation phase."""
    return "teacher" not in self.learners


def module(name: str):
  """The method module `name` (one of `NAMES`)."""
  if name not in NAMES:
    raise ValueError(f"unknown method {name!r}; available: {', '.join(NAMES)}")
  return importlib.import_module(f"kdrec_jax.methods.{name}")


def defaults(name: str, **overrides):
  """The method's settings as a config section: {'name': name, **DEFAULTS, **overrides}
  (overrides may add the optional settings a method reads with defaults of its own)."""
  import ml_collections
  return ml_collections.ConfigDict({"name": name, **module(name).DEFAULTS, **overrides})


def label(name: str) -> str:
  """The method's name in tables."""
  return module(name).LABEL


def make(cfg, models, data) -> Method:
  """Builds the method named by `cfg.name` for `models` = {'teacher': Model, 'student': Model,
  and any extra frozen teachers by name}."""
  return module(cfg.name).make(cfg, models, data)


def require_pairs(name: str, models) -> None:
  """A clear error for methods defined on (user, positive) pair batches."""
  for role in ("teacher", "student"):
    if models[role].batching.kind != "pairs":
      raise ValueError(f"method {name!r} needs models trained on (user, item) pairs; the "
                       f"{role} {models[role].name!r} trains on batches of {models[role].batching}")
