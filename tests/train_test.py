"""Tests for kdrec_jax.train: data-parallel equivalence, the pmap form, frozen models, the launcher
end to end, resuming, and loading a teacher. Uses the 4 fake CPU devices set up in conftest.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import logging

from conftest import REPO_ROOT
from kdrec_jax import parallel, schedule, step as kstep, train
from kdrec_jax.checkpoint import PhaseCheckpoints

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the quick tier

MODELS = train.MODELS
PHASES = ("warmup", "distill", "control")

needs_4_devices = pytest.mark.skipif(len(jax.devices()) < 4,
                                     reason="needs 4 (fake) devices; see conftest.py")


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _np(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def distill_setup(citeulike_file):
  """An Experiment, the distill phase's program and a start state with the method's tables."""
  from conftest import quick_config
  cfg = quick_config(citeulike_file, num_devices=1)
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  return cfg, exp, program, _distill_state(program), program.step


def _distill_state(program):
  """The phase's start state with the cache of a refresh at epoch 0."""
  return program.refresh(program.initial_state(), jax.random.key(0), 0)[0]


def _epoch(program, n):
  """The program's epoch on `n` devices."""
  return train.build_phase(program.exp, program.phase, num_devices=n, method=program.method,
                           optimizers=program.optimizers)


def _assert_params_close(a, b, rtol=1e-5, atol=1e-6):
  for m in MODELS:
    for k in ("user", "item"):
      np.testing.assert_allclose(np.asarray(_params(a)[m][k]), np.asarray(_params(b)[m][k]),
                                 rtol=rtol, atol=atol, err_msg=f"{m}.{k}")


def _params(state):
  """{model: params} of a TrainState or of a checkpoint tree ({model: {'params'}})."""
  if isinstance(state, kstep.TrainState):
    return state.params
  return {m: state[m]["params"] for m in MODELS}


# ---------------------------------------------------------------------------------------------
# data parallelism
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_4_devices
def test_distill_epoch_4_devices_matches_1(distill_setup):
  cfg, exp, program0, state0, _ = distill_setup
  key = jax.random.key(123)
  out = {}
  for n in (4, 1):
    program = _epoch(program0, n)
    assert program.steps == -(-exp.data.num_train // cfg.batch_size)
    steps = program.steps
    out[n] = _np(program.run_epoch(_copy(state0), key))
  (s4, m4), (s1, m1) = out[4], out[1]
  _assert_params_close(s4, s1)
  assert int(s4.step) == int(s1.step) == steps
  assert set(m4) == set(m1)
  for k in m1:
    np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, err_msg=k)
  # Every training pair seen once (padding has weight 0); BD draws are valid for every pair.
  assert float(m1["examples"]) == exp.data.num_train
  assert float(m1["valid_student"]) == float(m1["valid_teacher"]) == exp.data.num_train
  # loss = own BPR loss + lambda * BD term, for both models.
  np.testing.assert_allclose(float(m1["loss_student"]),
                             float(m1["cf_student"]) + cfg.method.lambda_ts * float(
                                 m1["bd_student"]), rtol=1e-5)
  np.testing.assert_allclose(float(m1["loss_teacher"]),
                             float(m1["cf_teacher"]) + cfg.method.lambda_st * float(
                                 m1["bd_teacher"]), rtol=1e-5)
  # Training moved the params.
  assert np.abs(s1.params["student"]["item"]
                - np.asarray(state0.params["student"]["item"])).max() > 1e-3


@pytest.mark.slow
@needs_4_devices
def test_pre_drawn_bd_epoch_4_devices_matches_1(citeulike_file):
  """BD with pre-drawn samples ('draws'): the step reads its pairs' draws; every pair gets a valid
  draw, and 4 devices give the 1-device epoch."""
  from conftest import quick_config
  cfg = quick_config(citeulike_file, num_devices=1, method__sampling_state="draws",
                     method__refresh_every=2)
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  state0 = _distill_state(program)
  assert set(state0.cache) == {"draws_student", "draws_teacher", "draws_epoch"}
  out = {n: _np(_epoch(program, n).run_epoch(_copy(state0), jax.random.key(5), 1))
         for n in (4, 1)}
  (s4, m4), (s1, m1) = out[4], out[1]
  _assert_params_close(s4, s1)
  for k in m1:
    np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, err_msg=k)
  assert float(m1["valid_student"]) == float(m1["valid_teacher"]) == exp.data.num_train


def _cdae_config(citeulike_file, **overrides):
  from conftest import quick_config
  cfg = quick_config(citeulike_file, **overrides)
  cfg.teacher = ml_collections.ConfigDict(dict(name="cdae", dim=8, dropout=0.5, num_negatives=5))
  cfg.student = ml_collections.ConfigDict(dict(name="cdae", dim=3, dropout=0.5, num_negatives=5))
  cfg.method.update(dict(tau=2.0, num_samples=5))
  return cfg


@pytest.mark.slow
@needs_4_devices
def test_user_batched_distill_epoch_4_devices_matches_1(citeulike_file):
  """CDAE: the batches are users; BD draws 5 |I+_u| items per user and direction."""
  cfg = _cdae_config(citeulike_file, num_devices=1, batch_size=16)
  exp = train.Experiment(cfg)
  assert exp.num_examples == exp.data.num_users and set(exp.examples) == {"user"}
  program = train.build_phase(exp, "distill")
  state0 = _distill_state(program)
  out = {n: _np(_epoch(program, n).run_epoch(_copy(state0), jax.random.key(5)))
         for n in (4, 1)}
  (s4, m4), (s1, m1) = out[4], out[1]
  for m in MODELS:
    for a, b in zip(jax.tree.leaves(s4.params[m]), jax.tree.leaves(s1.params[m])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=m)
  for k in m1:
    np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-4, err_msg=k)
  assert float(m1["examples"]) == float(m1["valid_student"]) == exp.data.num_users
  np.testing.assert_allclose(float(m1["loss_teacher"]),
                             float(m1["cf_teacher"]) + cfg.method.lambda_st * float(
                                 m1["bd_teacher"]), rtol=1e-5)
  moved = np.abs(s1.params["teacher"]["dec"]["w"]
                 - np.asarray(state0.params["teacher"]["dec"]["w"])).max()
  assert moved > 1e-4


def test_teacher_and_student_must_share_batching(citeulike_file):
  cfg = _cdae_config(citeulike_file)
  cfg.student = ml_collections.ConfigDict(dict(name="bpr_mf", dim=4))
  with pytest.raises(ValueError, match="same batches"):
    train.Experiment(cfg)


def _batch(exp, size=32, offset=5):
  idx = np.arange(offset, offset + size)
  weight = np.ones(size, np.float32)
  weight[-3:] = 0.0  # padding
  return {**{k: v[idx] for k, v in exp.examples.items()},
          "index": jnp.arange(size, dtype=jnp.int32), "weight": jnp.asarray(weight)}


@pytest.mark.slow
@needs_4_devices
def test_single_step_4_devices_matches_1(distill_setup):
  cfg, exp, _, state0, step = distill_setup
  batch, key = _batch(exp), jax.random.key(7)
  out = {n: _np(kstep.p_train_step(step, kstep.make_mesh(n))(_copy(state0), batch, key))
         for n in (4, 1)}
  (s4, m4), (s1, m1) = out[4], out[1]
  _assert_params_close(s4, s1)
  for k in m1:
    np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, err_msg=k)
  assert float(m1["examples"]) == 29.0
  assert int(s1.step) == int(np.asarray(state0.step)) + 1
  # First Adam step with no weight decay: rows with a gradient move by ~lr (|m/sqrt(v)| = 1),
  # users outside the batch do not move at all.
  lr = cfg.distill.student.lr
  in_batch = np.zeros(exp.data.num_users, bool)
  in_batch[np.asarray(batch["user"])[np.asarray(batch["weight"]) > 0]] = True
  for m in MODELS:
    delta = np.abs(s1.params[m]["user"] - np.asarray(state0.params[m]["user"]))
    assert np.all(delta[~in_batch] == 0), m
    assert np.all(delta[in_batch] > 0.5 * lr) and np.all(delta <= lr * 1.001), m


@pytest.mark.slow
@needs_4_devices
def test_pmap_form_matches_shard_map(distill_setup):
  _, exp, _, state0, step = distill_setup
  batch, key = _batch(exp), jax.random.key(7)
  try:
    pstep = jax.pmap(step, axis_name=parallel.AXIS, in_axes=(None, 0, None),
                     out_axes=(None, None))
    split = jax.tree.map(lambda x: x.reshape(4, -1), batch)
    s_p, m_p = _np(pstep(_copy(state0), split, key))
  except (NotImplementedError, AttributeError) as e:  # pragma: no cover
    pytest.skip(f"jax.pmap unusable in jax {jax.__version__}: {e}")
  s_s, m_s = _np(kstep.p_train_step(step, kstep.make_mesh(4))(_copy(state0), batch, key))
  _assert_params_close(s_p, s_s, rtol=1e-6, atol=1e-7)
  for k in m_s:
    np.testing.assert_allclose(float(m_p[k]), float(m_s[k]), rtol=1e-6, err_msg=k)


@pytest.mark.slow
@needs_4_devices
def test_frozen_teacher_in_warmup_is_bit_identical(distill_setup):
  cfg, exp, _, _, _ = distill_setup
  opts = exp.optimizers(cfg.warmup)
  state0 = kstep.init_state(jax.random.key(5), exp.models, opts)
  before = _np(state0)
  program = train.build_phase(exp, kstep.Phase("warmup", ("student",), False), num_devices=4,
                              optimizers=opts)
  after, metrics = _np(program.run_epoch(_copy(state0), jax.random.key(9)))
  for k in ("user", "item"):
    np.testing.assert_array_equal(after.params["teacher"][k], before.params["teacher"][k])
    assert np.abs(after.params["student"][k] - before.params["student"][k]).max() > 1e-3
  for a, b in zip(jax.tree.leaves(after.opt["teacher"]),
                  jax.tree.leaves(before.opt["teacher"])):
    np.testing.assert_array_equal(a, b)
  assert float(metrics["examples"]) == exp.data.num_train
  assert "bd_student" not in metrics  # no distillation in warm-up


# ---------------------------------------------------------------------------------------------
# resuming and the teacher checkpoint
# ---------------------------------------------------------------------------------------------

def _resume_config(citeulike_file, **kw):
  from conftest import quick_config
  # checkpoint_every=100: only phase ends and budget stops save.
  settings = dict(num_devices=1, distill__epochs=4, method__refresh_every=3,
                  checkpoint_every=100)
  settings.update(kw)
  return quick_config(citeulike_file, **settings)


def _metrics_only(results):
  return {p: {m: results["phases"][p][m] for m in MODELS} for p in results["phases"]}


def _restore_distill(cfg, workdir):
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  ckpt = PhaseCheckpoints(os.path.join(workdir, "checkpoints"), "distill")
  assert ckpt.latest_epoch() == cfg.distill.epochs
  like = schedule.saved(program.initial_state(), program.phase, {})  # a distill checkpoint
  return _np(ckpt.restore(like))


@pytest.fixture(scope="module")
def uninterrupted_run(citeulike_file, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run_a"))
  cfg = _resume_config(citeulike_file)
  logging.set_verbosity(logging.WARNING)
  return cfg, workdir, train.train_and_evaluate(cfg, workdir)


def test_interrupted_then_resumed_equals_uninterrupted(uninterrupted_run, citeulike_file,
                                                       tmp_path):
  cfg_a, workdir_a, results_a = uninterrupted_run
  assert set(results_a["phases"]) == set(PHASES)
  cfg_b = _resume_config(citeulike_file, max_epochs_per_run=3)
  workdir_b = str(tmp_path / "run_b")
  calls, seen = 0, []
  while True:
    results_b = train.train_and_evaluate(cfg_b, workdir_b)
    calls += 1
    seen.append(sorted(results_b["phases"]))
    if set(results_b["phases"]) == set(PHASES) or calls >= 10:
      break
  # 2 warm-up + 4 distill + 4 control epochs, 3 per call: the first call stops after distill
  # epoch 1 (mid refresh period: refreshes at 0 and 3), the second resumes there.
  assert seen[0] == ["warmup"] and calls == 4, seen
  with open(os.path.join(workdir_b, "results.json")) as f:
    on_disk = json.load(f)
  got, want = _metrics_only(on_disk), _metrics_only(results_a)
  assert set(got) == set(want)
  for p in want:
    for m in MODELS:
      for split in ("val", "test"):
        for name, v in want[p][m][split].items():
          assert got[p][m][split][name] == pytest.approx(v, abs=1e-6), (p, m, split, name)
  a = _restore_distill(cfg_a, workdir_a)
  b = _restore_distill(cfg_b, workdir_b)
  _assert_params_close(a, b, rtol=1e-6, atol=1e-7)
  for m in MODELS:  # the last refresh's snapshot (distill epoch 3) too
    for k in ("user", "item"):
      np.testing.assert_allclose(a["snapshot"][m][k], b["snapshot"][m][k], rtol=1e-6, atol=1e-7)
  assert int(a["step"]) == int(b["step"])


def test_teacher_init_trains_only_the_student(uninterrupted_run, citeulike_file,
                                                    tmp_path):
  _, workdir_a, results_a = uninterrupted_run
  cfg = _resume_config(citeulike_file, teacher_init=workdir_a, distill__epochs=0)
  results = train.train_and_evaluate(cfg, str(tmp_path / "run_c"))
  assert set(results["phases"]) == {"warmup"}
  got, want = results["phases"]["warmup"], results_a["phases"]["warmup"]
  for split in ("val", "test"):
    for name, v in want["teacher"][split].items():
      assert got["teacher"][split][name] == pytest.approx(v, abs=1e-6), (split, name)
  # The student trains alone on the same keys and its loss ignores the teacher: same result.
  for split in ("val", "test"):
    for name, v in want["student"][split].items():
      assert got["student"][split][name] == pytest.approx(v, abs=1e-6), (split, name)
  with pytest.raises(FileNotFoundError, match="teacher_init"):
    train.train_and_evaluate(
        _resume_config(citeulike_file, teacher_init=str(tmp_path / "nowhere"),
                       distill__epochs=0), str(tmp_path / "run_d"))


@pytest.mark.slow
@needs_4_devices
def test_multi_device_run_matches_single_device(citeulike_file, tmp_path):
  """A whole run on 4 devices (states restored from checkpoints at the start of distillation
  and placed on the mesh) gives the 1-device results."""
  from conftest import quick_config
  results = {}
  for n in (4, 1):
    cfg = quick_config(citeulike_file, num_devices=n, warmup__epochs=1, distill__epochs=1,
                       control=False)
    results[n] = train.train_and_evaluate(cfg, str(tmp_path / f"run{n}"))
    assert set(results[n]["phases"]) == {"warmup", "distill"}
  got, want = _metrics_only(results[4]), _metrics_only(results[1])
  for p in want:
    for m in MODELS:
      for split in ("val", "test"):
        for name, v in want[p][m][split].items():
          assert 0.0 <= v <= 1.0
          assert got[p][m][split][name] == pytest.approx(v, abs=1e-6), (p, m, split, name)


# ---------------------------------------------------------------------------------------------
# the launcher (after the in-process runs: its programs are then in the compilation cache)
# ---------------------------------------------------------------------------------------------

def _launch(workdir, *flags):
  cmd = [sys.executable, "-m", "launch.train", "--config", "configs/bd_bpr_citeulike.py:quick",
         "--workdir", str(workdir), *flags]
  return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                        env=dict(os.environ))


QUICK_FLAGS = ("--config.warmup.epochs=2", "--config.distill.epochs=2",
               "--config.method.refresh_every=1", "--config.batch_size=32",
               "--config.eval.ks=(5,10)", "--config.eval.chunk_size=64",
               "--config.log_every=1", "--config.checkpoint_every=1", "--config.eval_every=1")
# (num_devices stays 0: all 4 fake devices, inherited through XLA_FLAGS)


def test_launcher_end_to_end(tmp_path, citeulike_file):
  workdir = tmp_path / "run"
  proc = _launch(workdir, f"--config.data.path={citeulike_file}", *QUICK_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert set(results["phases"]) == set(PHASES)
  assert "120 users x 150 items" in results["dataset"]
  for phase in PHASES:
    for m in MODELS:
      for split in ("val", "test"):
        metrics = results["phases"][phase][m][split]
        assert {"HR@5", "HR@10", "NDCG@5", "NDCG@10"} <= set(metrics)
        for name, v in metrics.items():
          assert 0.0 <= v <= 1.0, (phase, m, split, name, v)
        assert metrics["HR@5"] <= metrics["HR@10"]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records
  for r in records:
    assert r["phase"] in PHASES and isinstance(r["epoch"], int)
  train_logs = {(r["phase"], r["epoch"]) for r in records if "loss_teacher" in r}
  assert train_logs == {(p, e) for p in PHASES for e in (1, 2)}
  assert {r["phase"] for r in records if r.get("final")} == set(PHASES)
  evals = [r for r in records if "eval" in r and not r.get("final")]  # eval_every=1, epoch 1
  assert {(r["phase"], r["epoch"]) for r in evals} == {(p, 1) for p in PHASES}
  assert all(0 <= r["eval"]["student"]["val"]["HR@10"] <= 1 for r in evals)
  distill = [r for r in records if r["phase"] == "distill" and "bd_student" in r]
  assert len(distill) == 2 and all(r["valid_student"] == 1.0 for r in distill)
  for phase in PHASES:
    assert PhaseCheckpoints(str(workdir / "checkpoints"), phase).latest_epoch() == 2


def test_launcher_bad_input(tmp_path):
  bad = tmp_path / "bad_users.dat"
  bad.write_text("5 1 2 3 4 5\n3 1 2\n")
  proc = _launch(tmp_path / "run", f"--config.data.path={bad}")
  assert proc.returncode != 0
  assert f"{bad}:2" in proc.stderr, proc.stderr[-2000:]
  assert "count 3 does not match 2" in proc.stderr
  assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# regressions
# ---------------------------------------------------------------------------------------------

def test_budget_stop_on_a_checkpointed_epoch(citeulike_file, tmp_path):
  from conftest import quick_config
  cfg = quick_config(citeulike_file, num_devices=1, warmup__epochs=2, distill__epochs=0,
                     checkpoint_every=1, max_epochs_per_run=1)
  workdir = str(tmp_path / "run")
  for _ in range(3):
    results = train.train_and_evaluate(cfg, workdir)
    if "warmup" in results["phases"]:
      break
  assert set(results["phases"]) == {"warmup"}
  assert PhaseCheckpoints(os.path.join(workdir, "checkpoints"), "warmup").latest_epoch() == 2


def test_warmup_from_reuses_both_warmed_up_models(uninterrupted_run, citeulike_file, tmp_path):
  """A run started from another workdir's warm-up skips it and distils exactly as that run."""
  _, workdir_a, results_a = uninterrupted_run
  cfg = _resume_config(citeulike_file, warmup_from=workdir_a)
  results = train.train_and_evaluate(cfg, str(tmp_path / "run_e"))
  assert not os.path.exists(tmp_path / "run_e" / "checkpoints" / "warmup")
  got, want = _metrics_only(results), _metrics_only(results_a)
  for p in PHASES:
    for m in MODELS:
      for name, v in want[p][m]["test"].items():
        assert got[p][m]["test"][name] == pytest.approx(v, abs=1e-6), (p, m, name)
  with pytest.raises(FileNotFoundError, match="no finished 3-epoch warm-up"):
    train.train_and_evaluate(_resume_config(citeulike_file, warmup_from=workdir_a,
                                            warmup__epochs=3), str(tmp_path / "run_f"))
  assert not os.path.exists(tmp_path / "run_f" / "results.json")


def test_results_record_provenance_and_student_vs_teacher(uninterrupted_run):
  """results.json says what produced it, the wall time, and BD's motivating observation."""
  cfg, workdir, results = uninterrupted_run
  prov = results["provenance"]
  assert prov["jax"] == jax.__version__ and prov["backend"] == "cpu"
  assert len(prov["data_sha256"]) == 64 and prov["devices"] == ["cpu"]
  assert results["wall_seconds"] > 0
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["provenance"] == json.loads(json.dumps(prov))
  exp = train.Experiment(cfg)
  for phase in ("distill", "control"):
    beats = results["phases"][phase]["student_beats_teacher"]
    assert 0 <= beats["overall"] <= 1 and 0 <= beats["ties"] <= 1
    assert beats["users"] == exp.evaluators["test"].num_users
    assert sum(b["users"] for b in beats["by_activity"]) == beats["users"]
    overall = sum(b["share"] * b["users"] for b in beats["by_activity"]) / beats["users"]
    assert overall == pytest.approx(beats["overall"])
  # The share from the restored final params, by hand (MRR per user: 1 / best held-out rank).
  state = _restore_distill(cfg, workdir)
  mrr = {m: exp.evaluators["test"].per_user(exp.models[m].score_all, state[m]["params"])["MRR"]
         for m in MODELS}  # (a checkpoint tree: {model: {'params', 'opt'}})
  assert results["phases"]["distill"]["student_beats_teacher"]["overall"] == pytest.approx(
      float(np.mean(mrr["student"] > mrr["teacher"])))
