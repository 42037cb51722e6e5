"""kdrec_jax: knowledge distillation for top-K recommenders, in JAX.

The public API (imported lazily, so `import kdrec_jax` is cheap):

  kdrec_jax.train_and_evaluate(config, workdir)   a whole run (warm-up, distillation, control)
  kdrec_jax.Experiment(config)                    data, models, method, mesh, evaluators
  kdrec_jax.build_phase(experiment, 'distill')    a phase as one program (step, epoch, state)
  kdrec_jax.TrainState                            the typed train state
  kdrec_jax.methods / models / data / metrics / losses / ranking   the building blocks
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

_LAZY = {
    "train_and_evaluate": ("kdrec_jax.train", "train_and_evaluate"),
    "Experiment": ("kdrec_jax.experiment", "Experiment"),
    "build_phase": ("kdrec_jax.schedule", "build_phase"),
    "TrainState": ("kdrec_jax.step", "TrainState"),
}
_MODULES = ("methods", "models", "data", "metrics", "losses", "ranking", "train", "schedule",
            "step", "experiment", "workdir", "checkpoint", "plots")

__all__ = ["__version__", *_LAZY, *_MODULES]


def __getattr__(name: str):
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  if name in _MODULES:
    return importlib.import_module(f"kdrec_jax.{name}")
  raise AttributeError(f"module 'kdrec_jax' has no attribute {name!r}")
