"""The notebooks run top to bottom: each is executed with nbclient on a tiny setting (the
synthetic 120 x 150 dataset, 2 + 2 epochs, tiny models), injected after its "parameters" cell as
papermill does, so they cannot rot. Also: the committed notebooks carry no outputs.

Needs nbformat, nbclient and ipykernel (the `test` extra); skipped with the reason otherwise."""
from __future__ import annotations

import json
import os
import time

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the quick tier

NOTEBOOKS = os.path.join(REPO_ROOT, "notebooks")
CELL_TIMEOUT_S = 300  # per cell; a tiny run takes ~10-30 s on a 2-core CPU
FIXTURE_RUNS = os.path.join(REPO_ROOT, "tests", "fixtures", "workdirs", "kd")


def _read(name: str):
  nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install "
                                 "nbformat nbclient ipykernel, or the 'test' extra)")
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def _execute(name: str, parameters: dict, tmp_path, monkeypatch):
  """Runs notebooks/<name> with `parameters` injected after its parameters cell, in the
  repository root; returns the executed notebook and the seconds it took."""
  pytest.importorskip("nbclient", reason="nbclient is not installed (pip install nbclient "
                      "ipykernel, or the 'test' extra)")
  pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install ipykernel, "
                      "or the 'test' extra)")
  import nbclient
  import nbformat
  nb = _read(name)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  source = "# Injected by tests/notebooks_test.py\n" + "\n".join(
      f"{key} = {value!r}" for key, value in parameters.items())
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      source, metadata={"tags": ["injected-parameters"]}))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": REPO_ROOT}})
  start = time.time()
  client.execute()
  seconds = time.time() - start
  with open(tmp_path / f"executed_{name}", "w") as f:  # for looking at a failure
    nbformat.write(nb, f)
  print(f"{name}: {seconds:.0f} s")
  return nb, seconds


def _outputs(nb, kind: str) -> list:
  """The outputs of the executed code cells that carry MIME type `kind`."""
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
          if kind in o.get("data", {})]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "compare_methods.ipynb"])
def test_committed_without_outputs_and_with_a_parameters_cell(name):
  nb = _read(name)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert "parameters" in code[0].metadata.get("tags", []), "first code cell: the parameters"
  assert all(not c.outputs and c.execution_count is None for c in code), "outputs committed"
  assert f"colab.research.google.com/github/OWNER/REPO/blob/main/notebooks/{name}" in \
      nb.cells[0].source
  assert "REPO_URL" in code[0].source


def test_quickstart_runs(citeulike_file, tmp_path, monkeypatch):
  workdir = str(tmp_path / "quickstart")
  nb, _ = _execute("quickstart.ipynb", dict(
      QUICK=True, EPOCHS=(2, 2), EVAL_EVERY=1, DATA_PATH=citeulike_file, WORKDIR=workdir,
      FRESH=True, METRIC="NDCG@50",
      OVERRIDES={"batch_size": 32, "eval.chunk_size": 64, "num_devices": 1,
                 "method.refresh_every": 1, "checkpoint_every": 2}), tmp_path, monkeypatch)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert set(results["phases"]) == {"warmup", "distill", "control"}
  for png in ("curves", "losses", "beats"):
    assert os.path.getsize(os.path.join(workdir, "plots", f"{png}.png")) > 10_000
  assert len(_outputs(nb, "image/png")) >= 3  # curves, losses, student beats teacher
  tables = [o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown")]
  assert any("after warm-up" in t and "| student |" in t for t in tables)
  printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []) if o.get("output_type") == "stream")
  assert "default backend: cpu" in printed


def test_compare_methods_trains(citeulike_file, tmp_path, monkeypatch):
  workdir = str(tmp_path / "compare")
  small = dict(pool_size=40, top_m=30, num_interesting=5, num_uninteresting=10, top_k=5,
               num_dynamic_samples=10, dynamic_start_epoch=1, num_samples=3, top_l=30)
  nb, _ = _execute("compare_methods.ipynb", dict(
      RUNS_DIR="", METHODS=("none", "rrd"), SEEDS=(0,), TEACHER_EPOCHS=2, STUDENT_EPOCHS=2,
      DIMS=(8, 4), DATA_PATH=citeulike_file, WORKDIR=workdir, FRESH=True, METRIC="NDCG@20",
      OVERRIDES={"batch_size": 64, "eval.chunk_size": 64, "num_devices": 1},
      METHOD_OVERRIDES=small), tmp_path, monkeypatch)
  assert sorted(os.listdir(workdir)) == ["none_s0", "plots", "rrd_s0", "teacher"]
  for png in ("compare", "curves", "speed", "groups"):
    assert os.path.getsize(os.path.join(workdir, "plots", f"{png}.png")) > 10_000
  assert len(_outputs(nb, "image/png")) >= 4
  table = "".join(o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown"))
  assert all(f"| {run} |" in table for run in ("teacher", "none_s0", "rrd_s0"))


def test_compare_methods_loads_workdirs(tmp_path, monkeypatch):
  workdir = str(tmp_path / "loaded")
  nb, _ = _execute("compare_methods.ipynb", dict(RUNS_DIR=FIXTURE_RUNS, WORKDIR=workdir,
                                                 METRIC="NDCG@20"), tmp_path, monkeypatch)
  assert not os.path.exists(os.path.join(workdir, "teacher"))  # nothing trained
  assert sorted(os.listdir(os.path.join(workdir, "plots"))) == [
      "compare.png", "curves.png", "groups.png", "speed.png"]
  table = "".join(o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown"))
  assert all(f"| {run} |" in table for run in ("teacher", "none_s0", "none_s1", "rrd_s0"))
