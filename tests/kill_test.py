"""Kill -9 at any moment: a launcher process SIGKILLed at named points of the training loop
(mid-epoch, mid-checkpoint-save, mid-evaluation, mid-results-write; `kdrec_jax.faults`), ten
times in a row at points drawn with a fixed seed, each time rerun with the same command, ends
with the uninterrupted run's metrics and never redoes more than the epoch whose checkpoint was
being written. The uninterrupted run is made twice, in two processes: bit-identical metrics.
"""
from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import sys

import numpy as np

from conftest import REPO_ROOT
from kdrec_jax import faults

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the quick tier

KILLS = 10


def _command(data_path: str, workdir: str) -> list[str]:
  """BD on the synthetic data: 3 warm-up + 4 BD epochs, refresh every 2 (so kills also land
  mid-period), validation and a checkpoint every epoch."""
  return [sys.executable, "-m", "launch.train", "--config=configs/bd_bpr_citeulike.py:quick",
          f"--workdir={workdir}", f"--config.data.path={data_path}", "--config.num_devices=1",
          "--config.warmup.epochs=3", "--config.distill.epochs=4", "--config.control=False",
          "--config.method.refresh_every=2", "--config.batch_size=32", "--config.eval.ks=(5,10)",
          "--config.eval.chunk_size=64", "--config.eval_every=1", "--config.log_every=1",
          "--config.checkpoint_every=1"]


def _env(kill_at: str = "") -> dict:
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device: the fake devices only slow this down
  env.pop("KDREC_JAX_KILL_AT", None)
  if kill_at:
    env["KDREC_JAX_KILL_AT"] = kill_at
  return env


def _metrics(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    phases = json.load(f)["phases"]
  return {(p, m, split): phases[p][m][split] for p in phases for m in ("teacher", "student")
          for split in ("val", "test")}


def _training_lines(workdir: str, start: int) -> list[tuple[str, int]]:
  """(phase, epoch) of the per-epoch training records written after byte `start`."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    f.seek(start)
    records = [json.loads(line) for line in f if line.strip()]
  return [(r["phase"], r["epoch"]) for r in records if "seconds_per_epoch" in r]


def _size(path: str) -> int:
  return os.path.getsize(path) if os.path.exists(path) else 0


def test_killed_anywhere_then_rerun_ends_with_the_uninterrupted_metrics(citeulike_file,
                                                                        tmp_path):
  refs = [str(tmp_path / f"ref{i}") for i in range(2)]
  procs = [subprocess.Popen(_command(citeulike_file, w), cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for w in refs]
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  reference = _metrics(refs[0])
  assert _metrics(refs[1]) == reference  # two processes, one config and seed: bit-identical
  assert {k[0] for k in reference} == {"warmup", "distill"}

  rng = np.random.default_rng(2026)
  kills, workdirs, where = 0, [str(tmp_path / "run0")], []
  while kills < KILLS:
    workdir = workdirs[-1]
    at = f"{rng.choice(faults.POINTS)}:{int(rng.integers(1, 4))}"
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    before = _size(metrics_path)
    done_before = _training_lines(workdir, 0) if before else []
    proc = subprocess.run(_command(citeulike_file, workdir), cwd=REPO_ROOT, env=_env(at),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:  # finished before reaching the point: check it, start afresh
      assert _metrics(workdir) == reference, f"after kills at {where}"
      workdirs.append(str(tmp_path / f"run{len(workdirs)}"))
      continue
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    kills += 1
    where.append(at)
    # Nothing finished is redone beyond the epoch whose checkpoint may have been cut short: the
    # rerun's first epoch of a phase is at least the last one logged before this kill.
    new = _training_lines(workdir, before)
    for phase, epoch in new[:1]:
      logged = [e for p, e in done_before if p == phase]
      if logged:
        assert epoch >= max(logged), (at, phase, epoch, max(logged))
    if os.path.exists(os.path.join(workdir, "results.json")):
      _metrics(workdir)  # written atomically: whole and readable whenever it exists
  final = subprocess.run(_command(citeulike_file, workdirs[-1]), cwd=REPO_ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  assert _metrics(workdirs[-1]) == reference, f"after kills at {where}"
  assert len(set(p.split(":")[0] for p in where)) == len(faults.POINTS), where
