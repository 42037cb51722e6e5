"""Multi-host data parallelism: two launcher processes on localhost joined by
`jax.distributed` (one CPU device each) give the same results as one process with two devices
and the same global batch; process 0 alone writes the workdir."""
from __future__ import annotations

import pytest

import json
import os
import socket
import subprocess
import sys

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the quick tier


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(data_path: str, workdir: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "launch.train", "--config=configs/bd_bpr_citeulike.py:quick",
          f"--workdir={workdir}", f"--config.data.path={data_path}", "--config.warmup.epochs=2",
          "--config.distill.epochs=2", "--config.method.refresh_every=1",
          "--config.batch_size=32", "--config.eval.ks=(5,10)", "--config.eval.chunk_size=64",
          "--config.eval_every=1", "--config.control=False", *extra]


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  return env


def _phases(workdir) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["phases"]


def test_two_processes_match_one_process_with_the_same_global_batch(citeulike_file, tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(_command(citeulike_file, multi, f"--coordinator_address={address}",
                                     "--num_processes=2", f"--process_id={i}"),
                            cwd=REPO_ROOT, env=_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  one = subprocess.Popen(_command(citeulike_file, single), cwd=REPO_ROOT, env=_env(2),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  for proc in (*procs, one):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  got, want = _phases(multi), _phases(single)
  assert set(got) == {"warmup", "distill"}
  for phase in got:
    for m in ("teacher", "student"):
      for split in ("val", "test"):
        assert got[phase][m][split] == want[phase][m][split], (phase, m, split)
  with open(os.path.join(multi, "results.json")) as f:
    provenance = json.load(f)["provenance"]
  assert provenance["devices"] == ["cpu", "cpu"] and provenance["processes"] == 2
  assert not os.path.exists(os.path.join(multi, "results.json.tmp"))


def test_multi_host_flags_need_count_and_id(tmp_path, citeulike_file):
  proc = subprocess.run(_command(citeulike_file, str(tmp_path / "w"),
                                 "--coordinator_address=localhost:1"),
                        cwd=REPO_ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "a multi-host run needs --num_processes and --process_id" in proc.stderr
