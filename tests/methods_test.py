"""The method contract, for every registered method (a new method is covered by adding its file):
its registry entry, and a whole schedule through `train.train_and_evaluate` (warm-up, a refresh,
one distillation epoch, the evaluations) on the synthetic data with its defaults shrunk to fit:
finite metrics, a frozen teacher untouched, the learners moved."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import kd_config
from kdrec_jax import methods, train, workdir

# The defaults' list sizes and sample counts, shrunk to the 150-item synthetic catalogue.
SMALL = dict(pool_size=40, top_m=30, num_interesting=5, num_uninteresting=10, top_k=5,
             num_dynamic_samples=10, dynamic_start_epoch=1, num_experts=3, num_samples=3,
             top_l=30, refresh_every=1, period=1)


def contract_config(data_path: str, name: str):
  """A tiny run of method `name` with its registry defaults: BPR-MF teacher d = 8, student
  d = 4, one warm-up epoch, one distillation epoch."""
  cfg = kd_config(data_path, "none", num_devices=1, warmup__epochs=1, distill__epochs=1,
                  warmup__patience=0, distill__patience=0, eval_every=0)
  settings = methods.defaults(name)
  settings.update({k: v for k, v in SMALL.items() if k in settings})
  if name in ("bd", "ibd"):
    settings.num_samples = 1
  cfg.method = settings
  cfg.warmup.models = ()  # the method's own choice: both for BD and iBD, else the teacher
  return cfg


def test_registry_entries():
  assert {"bd", "ibd", "none", "cd", "rd", "de", "rrd", "de_rrd", "dcd", "ftd", "htd", "unkd",
          "rce_kd", "hetcomp"} <= set(methods.NAMES)
  for name in methods.NAMES:
    module = methods.module(name)
    assert isinstance(module.LABEL, str) and module.LABEL and isinstance(module.PAPER, str)
    assert methods.defaults(name).name == name
    assert "name" not in module.DEFAULTS
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    methods.defaults("nope")


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.NAMES)
def test_every_method_runs_through_the_schedule(citeulike_file, tmp_path, name):
  cfg = contract_config(citeulike_file, name)
  run = str(tmp_path / name)
  results = train.train_and_evaluate(cfg, run)
  assert set(results["phases"]) == {"warmup", "distill"}
  distill = results["phases"]["distill"]
  for model in ("teacher", "student"):
    for split in ("val", "test"):
      values = [v for v in distill[model][split].values() if v is not None]
      assert values and all(np.isfinite(values)), (name, model, split)
  lines = [l for l in open(f"{run}/metrics.jsonl").read().splitlines() if '"distill"' in l]
  assert any('"loss_student"' in l for l in lines), name
  warm = workdir.phase_result_params(run, "warmup")
  final = workdir.phase_result_params(run, "distill")
  exp = train.Experiment(cfg)
  start = warm.get("student") or exp.models["student"].init(jax.random.split(exp.key)[1])
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(final["student"]), jax.tree.leaves(start))]
  assert max(moved) > 0, name
  if exp.method.teacher_to_student:  # frozen: same metrics as after the warm-up, not checkpointed
    assert distill["teacher"] == results["phases"]["warmup"]["teacher"], name
    assert "teacher" not in final
  else:
    assert "teacher" in final
