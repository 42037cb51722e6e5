"""Several frozen teachers of different kinds, with their training trajectories: teacher workdirs
keep checkpoints at `warmup.keep_epochs`, a method distils from a BPR-MF and a LightGCN teacher
and their checkpoints (HetComp, `configs/kd_citeulike.py:hetcomp_mf_lgcn`), every teacher is
recorded by source and hash, never updated, and a resume against another teacher is refused."""
from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from conftest import kd_config
from kdrec_jax import train, workdir
from kdrec_jax.checkpoint import PhaseCheckpoints

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the quick tier

LGCN = dict(name="lightgcn", dim=8, num_layers=2, init_std=0.1)


def _teacher(citeulike_file, path, model=None, epochs=4):
  """A teacher workdir: `epochs` warm-up epochs (no early stopping), checkpoints kept at 1, 2."""
  cfg = kd_config(citeulike_file, "teacher", num_devices=1, warmup__epochs=epochs,
                  warmup__patience=0, warmup__keep_epochs=(1, 2))
  if model is not None:
    cfg.teacher = ml_collections.ConfigDict(model)
  train.train_and_evaluate(cfg, path)
  return path


@pytest.fixture(scope="module")
def teachers(citeulike_file, tmp_path_factory):
  root = tmp_path_factory.mktemp("teachers")
  return {"mf": _teacher(citeulike_file, str(root / "mf")),
          "lgcn": _teacher(citeulike_file, str(root / "lgcn"), LGCN),
          "lgcn_other": _teacher(citeulike_file, str(root / "lgcn_other"), LGCN, epochs=3)}


def _hetcomp(citeulike_file, teachers, lgcn="lgcn", **overrides):
  cfg = kd_config(citeulike_file, "hetcomp_mf_lgcn", num_devices=1, teacher_init=teachers["mf"],
                  teacher_trajectory=(1, 2), **overrides)
  cfg.method.update(dict(top_k=10, period=1))
  cfg.teachers.lgcn.model = ml_collections.ConfigDict(LGCN)
  cfg.teachers.lgcn.init = teachers[lgcn]
  cfg.teachers.lgcn.trajectory = (1, 2)
  return cfg


def test_teacher_workdir_keeps_its_trajectory(teachers):
  ckpt = PhaseCheckpoints(os.path.join(teachers["mf"], "checkpoints"), "warmup", max_to_keep=1)
  assert sorted(ckpt.all_epochs()) == [1, 2, 4]  # the kept epochs and the latest
  early = workdir.phase_result_params(teachers["mf"], "warmup", 1)["teacher"]
  final = workdir.phase_result_params(teachers["mf"], "warmup")["teacher"]
  assert np.abs(np.asarray(early["item"]) - np.asarray(final["item"])).max() > 0


def test_two_frozen_teachers_of_different_kinds(citeulike_file, teachers, tmp_path):
  run = str(tmp_path / "run")
  exp = train.Experiment(_hetcomp(citeulike_file, teachers))
  assert exp.models["lgcn"].name == "lightgcn" and exp.models["teacher"].name == "bpr_mf"
  # One distillation epoch, then a resume against another LightGCN teacher is refused, naming
  # it; the right one finishes.
  first = train.train_and_evaluate(_hetcomp(citeulike_file, teachers, max_epochs_per_run=1), run)
  assert set(first["phases"]) == {"warmup"}
  with pytest.raises(workdir.WorkdirError, match="lgcn"):
    train.train_and_evaluate(_hetcomp(citeulike_file, teachers, lgcn="lgcn_other"), run)
  results = train.train_and_evaluate(_hetcomp(citeulike_file, teachers), run)
  assert set(results["phases"]) == {"warmup", "distill"}
  # Every frozen teacher recorded by source and hash: the MF teacher, the LightGCN teacher and
  # the checkpoints of both trajectories.
  record = json.load(open(os.path.join(run, "teacher.json")))
  assert record["source"] == teachers["mf"]
  assert set(record["others"]) == {"lgcn", "lgcn@1", "lgcn@2", "teacher@1", "teacher@2"}
  want = workdir.params_hash(workdir.phase_result_params(teachers["lgcn"], "warmup", 2)[
      "teacher"])
  assert record["others"]["lgcn@2"]["sha256"] == want
  # Never updated: the distillation checkpoint holds the student only, and the teacher's
  # metrics after distillation are those of its loaded params.
  raw = PhaseCheckpoints(os.path.join(run, "checkpoints"), "distill").restore_raw()
  assert "teacher" not in raw and "lgcn" not in raw and "student" in raw
  assert results["phases"]["distill"]["teacher"] == results["phases"]["warmup"]["teacher"]
  student = results["phases"]["distill"]["student"]["test"]
  assert all(np.isfinite(v) for v in student.values())


def test_trajectory_ends_before_the_best_epoch(citeulike_file, teachers, tmp_path):
  """Checkpoints at or after a teacher's best epoch are not on its way to the final teacher."""
  fake = str(tmp_path / "mf_best2")
  shutil.copytree(teachers["mf"], fake)
  results = json.load(open(os.path.join(fake, "results.json")))
  results["phases"]["warmup"]["best_epoch"] = 2  # as if the warm-up had stopped early at 2
  with open(os.path.join(fake, "results.json"), "w") as f:
    json.dump(results, f)
  cfg = _hetcomp(citeulike_file, teachers)
  cfg.teacher_init = fake
  params, _ = train._frozen_extras(train.Experiment(cfg), str(tmp_path / "w"))
  assert set(params) == {"lgcn", "lgcn@1", "lgcn@2", "teacher@1"}
  assert jax.tree.structure(params["lgcn@1"]) == jax.tree.structure(params["lgcn"])
