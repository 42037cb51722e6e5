"""No distillation: the student trains alone with its own loss (the no-KD baseline), through the
same schedule as the teacher->student methods (teacher warm-up or `teacher_init`, then the
student from scratch)."""
from __future__ import annotations

from kdrec_jax.methods import Method

LABEL = "no KD"
PAPER = ""
DEFAULTS = dict()  # the student alone (the no-KD baseline of every protocol)


def make(cfg, models, data) -> Method:
  del cfg, models, data
  return Method(name="none", loss=lambda outputs, batch, samples, hp: ({}, {}),
                learners=("student",))
