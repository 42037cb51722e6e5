"""Every teacher->student method trains with BPR-MF, LightGCN and NeuMF teachers and students
(one distillation epoch each, losses finite, the student moves, the teacher does not), and gives
a clear error with a user-batched model (CDAE)."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from conftest import assert_only_student_moved, kd_config
from kdrec_jax import train

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the quick tier

KD_METHODS = ("cd", "cd_teacher", "rd", "de", "rrd", "de_rrd", "dcd", "dcd_kds", "ftd", "htd",
              "unkd")


def _model(name, dim):
  extra = dict(num_layers=1) if name == "lightgcn" else {}
  return ml_collections.ConfigDict(dict(name=name, dim=dim, **extra))


# LightGCN with every loss (CD's two guides share their code, DE-RRD holds DE and RRD); NeuMF
# (whose representations concatenate two towers) with one method that reads representations
# and one that only reads scores, to keep the suite short.
@pytest.mark.parametrize("model,methods", [
    ("lightgcn", ("cd", "rd", "de_rrd", "dcd", "ftd", "htd", "unkd")),
    ("neumf", ("cd", "de"))])
def test_every_method_trains_with_graph_and_neural_models(citeulike_file, model, methods):
  for method in methods:
    cfg = kd_config(citeulike_file, method, num_devices=1, teacher=_model(model, 8),
                    student=_model(model, 4))
    exp = train.Experiment(cfg)
    program = train.build_phase(exp, "distill")
    state = program.initial_state()
    if program.uses_refresh:
      state, _ = program.refresh(state, jax.random.key(0), 0)
    before = jax.device_get(state)
    after, metrics = jax.device_get(program.run_epoch(state, jax.random.key(1), 0))
    assert all(np.isfinite(float(v)) for v in metrics.values()), (method, metrics)
    kd_terms = [k for k in metrics if not k.startswith(("cf_", "loss_", "examples"))]
    assert kd_terms and any(float(metrics[k]) > 0 for k in kd_terms), (method, metrics)
    assert_only_student_moved(before, after, method)


@pytest.mark.parametrize("method", KD_METHODS)
def test_user_batched_models_are_refused(citeulike_file, method):
  cdae = lambda d: ml_collections.ConfigDict(dict(name="cdae", dim=d))  # noqa: E731
  cfg = kd_config(citeulike_file, method, teacher=cdae(8), student=cdae(4))
  name = cfg.method.name
  with pytest.raises(ValueError, match=f"method '{name}' needs models trained on"):
    train.Experiment(cfg)
