"""Workdir safety: a resume with another config is refused naming the keys (steering keys are
exempt; force_resume overrides and is recorded), a second run on a busy workdir is refused, an
unreadable latest checkpoint is reported and the previous one used, and command-line mistakes end
in one line naming the key or argument."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, quick_config
from kdrec_jax import progress as progress_mod
from kdrec_jax import train
from kdrec_jax import workdir as workdir_mod
from kdrec_jax.checkpoint import PhaseCheckpoints


def _cfg(citeulike_file, **kw):
  settings = dict(num_devices=1, warmup__epochs=2, distill__epochs=3, control=False)
  settings.update(kw)
  return quick_config(citeulike_file, **settings)


def _stopped_run(citeulike_file, workdir, epochs=3):
  """A run stopped (checkpointed) after `epochs` epochs in all: mid-distillation."""
  return train.train_and_evaluate(_cfg(citeulike_file, max_epochs_per_run=epochs), workdir)


@pytest.mark.slow
def test_resume_with_another_config_is_refused(citeulike_file, tmp_path):
  workdir = str(tmp_path / "run")
  _stopped_run(citeulike_file, workdir)
  with pytest.raises(train.WorkdirError,
                     match=r"method\.lambda_st: 0\.5 -> 0\.1; method\.tau: 5\.0 -> 2\.0"):
    train.train_and_evaluate(_cfg(citeulike_file, method__tau=2.0, method__lambda_st=0.1),
                             workdir)
  with pytest.raises(train.WorkdirError, match="student.dim"):
    train.train_and_evaluate(_cfg(citeulike_file, student__dim=7), workdir)
  # Steering keys may change; the run resumes and finishes.
  results = train.train_and_evaluate(_cfg(citeulike_file, log_every=2, checkpoint_keep=3),
                                     workdir)
  assert set(results["phases"]) == {"warmup", "distill"}


@pytest.mark.slow
def test_force_resume_is_recorded(citeulike_file, tmp_path):
  workdir = str(tmp_path / "run")
  _stopped_run(citeulike_file, workdir)
  results = train.train_and_evaluate(_cfg(citeulike_file, method__tau=2.0, force_resume=True),
                                     workdir)
  assert results["forced_resumes"] == [["method.tau: 5.0 -> 2.0"]]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["config"]["method.tau"] == 2.0


def test_force_resume_needs_no_config_key():
  # The refusal's advice, --config.force_resume=True, works with configs that do not declare it.
  from launch import flags_util
  argv = ["prog", "--config.force_resume=True", "--config.seed=1", "--config.force_resume"]
  assert flags_util._pop_run_keys(argv) == (["prog", "--config.seed=1"], {"force_resume": True})
  assert flags_util._pop_run_keys(["prog", "--config.force_resume=0"])[1] == {
      "force_resume": False}
  # absl's space-separated form
  assert flags_util._pop_run_keys(["prog", "--config.force_resume", "False", "--config.seed=1"]
                                  ) == (["prog", "--config.seed=1"], {"force_resume": False})


@pytest.mark.slow
def test_force_resume_flag_reaches_the_run(tmp_path):
  # Parsed and added to the config: the run gets as far as reading its (missing) data file.
  proc = _launch("--config", "configs/bd_bpr_citeulike.py:quick", "--config.force_resume=True",
                 "--config.data.path=" + str(tmp_path / "missing.dat"),
                 "--workdir", str(tmp_path / "run"))
  assert proc.returncode != 0
  assert "missing.dat: file does not exist" in proc.stderr, proc.stderr[-2000:]
  assert "config override" not in proc.stderr and "config key" not in proc.stderr


@pytest.mark.slow
def test_busy_workdir_is_refused(citeulike_file, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with workdir_mod.WorkdirLock(workdir):
    with pytest.raises(train.WorkdirError, match=f"in use by a running run \\(pid {os.getpid()}"):
      train.train_and_evaluate(_cfg(citeulike_file), workdir)
  # Released: the run goes ahead.
  assert "warmup" in _stopped_run(citeulike_file, workdir, epochs=2)["phases"]


@pytest.mark.slow
def test_unreadable_latest_checkpoint_falls_back(citeulike_file, tmp_path):
  full = train.train_and_evaluate(_cfg(citeulike_file), str(tmp_path / "full"))
  workdir = str(tmp_path / "run")
  _stopped_run(citeulike_file, workdir, epochs=4)  # warm-up 2 + distill 2: distill ckpts 1, 2
  ckpt_dir = os.path.join(workdir, "checkpoints", "distill")
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]
  for root, _, files in os.walk(os.path.join(ckpt_dir, "2")):
    for name in files:  # truncate every file of the latest checkpoint
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
  resumed = train.train_and_evaluate(_cfg(citeulike_file), workdir)
  assert os.path.isdir(os.path.join(ckpt_dir, "2.unreadable"))
  # Resumed from epoch 1 and retrained epoch 2 onwards: the uninterrupted run's numbers.
  for m in train.MODELS:
    assert resumed["phases"]["distill"][m]["test"] == full["phases"]["distill"][m]["test"]
  assert PhaseCheckpoints(os.path.join(workdir, "checkpoints"), "distill").latest_epoch() == 3


def _launch(*args):
  cmd = [sys.executable, "-m", "launch.train", *args]
  return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (("--config", "configs/bd_bpr_citeulike.py:quick", "--config.method.tua=3"),
     "unknown config key --config.method.tua: method has no 'tua'; did you mean tau?"),
    (("--config", "configs/bd_bpr_citeulike.py:fast"),
     "unknown config arg 'fast'; expected '' or 'quick'"),
    (("--config", "configs/nope.py"), "cannot load the config file"),
    (("--config", "configs/bd_bpr_citeulike.py:quick", "--config.method.tau=abc"),
     "flag --config.method.tau=abc: could not convert string to float: 'abc'"),
    (("--config", "configs/bd_bpr_citeulike.py:quick", "--config.force_resume=maybe"),
     "--config.force_resume takes True or False, got 'maybe'"),
])
@pytest.mark.slow
def test_command_line_mistakes_are_one_line(tmp_path, args, message):
  proc = _launch(*args, "--workdir", str(tmp_path / "run"))
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "run")


class _Terminal:
  def __init__(self):
    self.text = ""

  def isatty(self):
    return True

  def write(self, s):
    self.text += s

  def flush(self):
    pass


def test_progress_line_on_a_terminal_only(monkeypatch):
  term = _Terminal()
  monkeypatch.setattr("sys.stderr", term)
  progress = progress_mod.Progress("distill", total=10, start=0)
  progress.update(4, "loss S 0.5")
  assert term.text.startswith("\r[distill] ") and "4/10 epochs  loss S 0.5" in term.text
  assert "left" in term.text and "\n" not in term.text
  progress.clear()
  assert term.text.endswith("\r\x1b[K")
  piped = _Terminal()
  piped.isatty = lambda: False
  monkeypatch.setattr("sys.stderr", piped)
  quiet = progress_mod.Progress("distill", total=10, start=0)
  quiet.update(3, "loss S 0.4")
  quiet.clear()
  assert piped.text == ""  # logs piped to a file stay clean
  # ipykernel imported (e.g. by a notebook runner) but no kernel running: still quiet, no error
  import ipykernel  # noqa: F401
  outside = progress_mod.Progress("distill", total=10, start=0)
  assert outside.mode is None
  outside.update(2, "loss S 0.3")


# ---------------------------------------------------------------------------------------------
# numerics and degenerate data
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_non_finite_loss_stops_naming_phase_epoch_and_last_good_checkpoint(citeulike_file,
                                                                           tmp_path):
  workdir = str(tmp_path / "run")
  _stopped_run(citeulike_file, workdir, epochs=3)  # warm-up 2 + distill 1 (checkpointed)
  blown = _cfg(citeulike_file, distill__student__lr=1e30, force_resume=True)
  good = os.path.join(workdir, "checkpoints", "distill", "1")
  with pytest.raises(FloatingPointError,
                     match=rf"\[distill\] epoch 2: non-finite loss .*checkpoint is {good}$"):
    train.train_and_evaluate(blown, workdir)


def _write_pairs(path, pairs):
  path.write_text("".join(f"{u} {i}\n" for u, i in pairs))
  return str(path)


@pytest.mark.slow
def test_degenerate_users_and_items_train_and_evaluate(citeulike_file, tmp_path):
  """A ready-made split with a user id that has no interactions at all, item ids nobody
  interacted with, a user whose every item is held out (a cold user) and items seen only in
  held-out data: the run trains, every test user is evaluated, and the metrics are finite."""
  from kdrec_jax import data as kdata
  base = kdata.load(kdata.data_config(path=citeulike_file))
  rows = {s: base.split(s) for s in ("train", "val", "test")}
  pairs = {s: [(u + 1, i) for u in range(base.num_users)  # user 0: no interactions anywhere
               for i in rows[s][1][rows[s][0][u]:rows[s][0][u + 1]]] for s in rows}
  cold, n_items = base.num_users + 1, base.num_items
  pairs["val"].append((cold, n_items))           # items n, n+1 only held out, by the cold user
  pairs["test"].append((cold, n_items + 1))      # items n+2 .. n+4: no interactions at all
  pairs["test"].append((3, n_items + 5))
  paths = {s: _write_pairs(tmp_path / f"{s}.txt", p) for s, p in pairs.items()}
  cfg = _cfg(citeulike_file, warmup__epochs=1, distill__epochs=1)
  cfg.data.format = "splits"
  cfg.data.train, cfg.data.val, cfg.data.test = paths["train"], paths["val"], paths["test"]
  results = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  data = kdata.load(cfg.data)
  assert data.num_users == base.num_users + 2 and data.num_items == n_items + 6
  for phase in ("warmup", "distill"):
    for m in train.MODELS:
      test = results["phases"][phase][m]["test"]
      assert all(v is not None and np.isfinite(v) for v in test.values()), (phase, m, test)
  assert results["phases"]["distill"]["student_beats_teacher"]["users"] == base.num_users + 1


@pytest.mark.parametrize("lines,problem", [
    (["1 0"] * 30, "a catalogue of one item leaves nothing to rank"),
    (["2 0 1", "2 1 2", "2 0 2"], "no test interactions"),  # two items each: all in training
])
def test_unusable_datasets_get_a_clear_error(tmp_path, lines, problem):
  from kdrec_jax import data as kdata
  path = tmp_path / "users.dat"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(kdata.DataError, match=f"{path}: after preprocessing and the split, "
                                            f"{problem}"):
    kdata.load(kdata.data_config(path=str(path), min_user_interactions=0))
