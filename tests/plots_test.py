"""kdrec_jax.plots and launch/plot.py on the fixture workdirs of tests/fixtures/workdirs (tiny
real runs: BD with a control, iBD with refresh statistics, a teacher and three students sharing
it; see make_fixtures.py there): every figure renders to a non-trivial PNG with its title, axis
labels and legend, the tables and errors read right, and the launcher writes the files and fails
with one line on a missing workdir."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytest.importorskip("matplotlib", reason="matplotlib is not installed")

from kdrec_jax import plots  # noqa: E402

FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "workdirs")
BD, IBD = os.path.join(FIXTURES, "bd"), os.path.join(FIXTURES, "ibd")
KD = [os.path.join(FIXTURES, "kd", n) for n in ("teacher", "none_s0", "none_s1", "rrd_s0")]


def check_png(path: str, min_width: int = 500, min_height: int = 300) -> None:
  """`path` is a PNG of at least that size, with more than a blank canvas in it."""
  from matplotlib import image
  assert os.path.getsize(path) > 10_000, path
  pixels = image.imread(path)
  height, width = pixels.shape[:2]
  assert width >= min_width and height >= min_height, (path, width, height)
  assert pixels[..., :3].std() > 0.05, f"{path} looks blank"


def check_labels(fig, legend: bool = True) -> None:
  """Every panel has a title (or the figure one), both axis labels and, if asked, a legend."""
  assert fig.axes
  suptitle = fig.get_suptitle() if hasattr(fig, "get_suptitle") else ""
  for ax in fig.axes:
    assert ax.get_title() or suptitle
    assert ax.get_xlabel() and ax.get_ylabel()
    if legend:
      assert ax.get_legend() is not None and ax.get_legend().get_texts()


def legend_texts(ax) -> list[str]:
  return [t.get_text() for t in ax.get_legend().get_texts()]


@pytest.mark.slow
def test_validation_curves_bd_vs_control(tmp_path):
  out = str(tmp_path / "curves.png")
  fig = plots.validation_curves(BD, out=out)
  check_png(out)
  check_labels(fig)
  warmup, both = fig.axes
  assert warmup.get_title() == "warm-up"
  assert both.get_title() == "BD (solid) vs control (dashed)"
  assert warmup.get_ylabel() == "validation NDCG@10"  # the fixture's ks are (5, 10)
  labels = legend_texts(both)
  assert {"teacher, distillation", "student, distillation", "teacher, control",
          "student, control"} <= set(labels)
  # BD and the control start at epoch 0 from the warm-up's end, at the same value.
  lines = {line.get_label(): line for line in both.get_lines()}
  for model in ("teacher", "student"):
    bd, control = lines[f"{model}, distillation"], lines[f"{model}, control"]
    assert bd.get_xdata()[0] == control.get_xdata()[0] == 0
    assert bd.get_ydata()[0] == control.get_ydata()[0]
    assert control.get_linestyle() == "--"
  fig = plots.validation_curves(BD, metric="Recall@5")
  assert fig.axes[0].get_ylabel() == "validation Recall@5"


def test_validation_curves_frozen_teacher_and_best_epoch(tmp_path):
  out = str(tmp_path / "rrd.png")
  fig = plots.validation_curves(KD[3], metric="NDCG@20", out=out)
  check_png(out)
  check_labels(fig)
  (ax,) = fig.axes  # the loaded teacher's warm-up trained nothing: no panel
  assert ax.get_title() == "distillation (RRD)"
  labels = legend_texts(ax)
  assert any(t.startswith("teacher (not trained here)") for t in labels)
  assert any(t.startswith("student: best epoch") for t in labels)


def test_training_losses(tmp_path):
  out = str(tmp_path / "losses.png")
  fig = plots.training_losses(BD, out=out)
  check_png(out)
  check_labels(fig)
  assert [ax.get_title() for ax in fig.axes] == ["warm-up", "distillation (BD)", "control"]
  distill = set(legend_texts(fig.axes[1]))
  assert {"teacher: total", "teacher: base loss", "teacher: bd term", "student: total",
          "student: base loss", "student: bd term"} <= distill
  assert "student: total (= base loss)" in legend_texts(fig.axes[0])
  assert fig.axes[0].get_ylabel().startswith("loss per training example")
  fig = plots.training_losses(KD[3])
  assert "rrd term" in legend_texts(fig.axes[-1])


def test_compare_runs_seeds_and_shared_teacher(tmp_path):
  out = str(tmp_path / "compare.png")
  fig = plots.compare_runs(KD, metric="NDCG@20", out=out)
  check_png(out)
  check_labels(fig)
  (ax,) = fig.axes
  ticks = [t.get_text() for t in ax.get_xticklabels()]
  assert ticks == ["none (2 seeds)", "rrd"]  # the teacher-only run has no student bar
  assert "not shown (no bar value): teacher" in ax.get_xlabel()
  assert any(t.startswith("teacher (same in every run)") for t in legend_texts(ax))
  assert ax.get_ylabel() == "test NDCG@20"
  heights = [p.get_height() for p in ax.patches]
  none = [json.load(open(os.path.join(p, "results.json")))["phases"]["distill"]["student"]
          ["test"]["NDCG@20"] for p in KD[1:3]]
  assert heights[0] == pytest.approx(sum(none) / 2)
  # Named runs, both phases of BD, no seed averaging; a bare results.json file loads too.
  fig = plots.compare_runs([BD, os.path.join(IBD, "results.json")], metric="NDCG@10",
                           phases=("distill", "control"), labels=["BD", "iBD"])
  ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
  assert ticks == ["BD", "iBD"]
  assert {"teacher, control", "student, distillation"} <= set(legend_texts(fig.axes[0]))
  # Seeds run as one program (`<arm>/s<k>`, kdrec_jax.runs) read as `<arm>_s<k>`.
  for k, src in enumerate(KD[1:3]):
    shutil.copytree(src, tmp_path / "none" / f"s{k}")
  runs = plots.load_runs([str(tmp_path / "none" / "s0"), str(tmp_path / "none" / "s1")])
  assert [r.name for r in runs] == ["none_s0", "none_s1"]
  fig = plots.compare_runs(runs, metric="NDCG@20")
  assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["none (2 seeds)"]


def test_speed_and_curves_across_runs(tmp_path):
  fig = plots.speed(KD, out=str(tmp_path / "speed.png"))
  check_png(str(tmp_path / "speed.png"))
  check_labels(fig, legend=False)
  assert fig.axes[0].get_ylabel().startswith("seconds per epoch")
  fig = plots.compare_curves(KD[1:], "NDCG@20", out=str(tmp_path / "overlay.png"))
  check_png(str(tmp_path / "overlay.png"))
  check_labels(fig)
  assert legend_texts(fig.axes[0]) == ["none_s0", "none_s1", "rrd_s0"]


def test_popularity_groups(tmp_path):
  out = str(tmp_path / "groups.png")
  fig = plots.popularity_groups(KD[1:] + [BD], out=out)  # K = 10: the one all runs have
  check_png(out)
  check_labels(fig)
  recall, share = fig.axes
  assert recall.get_ylabel() == "test Recall@10 within the group"
  assert share.get_ylabel() == "share of the top-10 lists in the group"
  ticks = [t.get_text() for t in recall.get_xticklabels()]
  assert len(ticks) == 4 and ticks[0].startswith("g0") and "most popular" in ticks[0]
  fig = plots.popularity_groups(KD[1:])
  assert fig.axes[0].get_ylabel() == "test Recall@20 within the group"
  with pytest.raises(ValueError, match="no popularity-group metrics"):
    plots.popularity_groups([KD[0]])  # a teacher-only run: no student


def test_refresh_statistics(tmp_path):
  out = str(tmp_path / "refresh.png")
  fig = plots.refresh_statistics(IBD, out=out)
  check_png(out)
  check_labels(fig)
  assert "refresh statistics" in fig.get_suptitle()
  student, teacher, discrepancy, histogram = fig.axes
  assert "teacher → student" in student.get_title()
  assert histogram.get_ylabel() == "share of the sampled items"
  assert len(histogram.patches) == 2 * 16  # 16 bins, both directions
  heights = [p.get_height() for p in histogram.patches]
  assert sum(heights) == pytest.approx(2.0, abs=1e-6)  # shares sum to 1 per direction
  assert {"sampled last round", "corrected (d <= delta)", "up-weighted"} <= set(
      legend_texts(student))
  rounds = student.get_lines()[0].get_xdata()
  assert list(rounds) == [1, 2, 3]  # round 0 has no previous round
  assert discrepancy.get_ylabel().startswith("learner's rank")
  with pytest.raises(ValueError, match="no 'refresh' statistics"):
    plots.refresh_statistics(BD)


def test_student_beats_teacher(tmp_path):
  out = str(tmp_path / "beats.png")
  fig = plots.student_beats_teacher(BD, out=out)
  check_png(out)
  check_labels(fig)
  (ax,) = fig.axes
  record = json.load(open(os.path.join(BD, "results.json")))["phases"]["distill"][
      "student_beats_teacher"]
  bins = len(record["by_activity"])
  assert len(ax.patches) == 3 * bins  # warm-up, distillation and control
  assert any(t.startswith(f"all users, after distillation: {record['overall']:.3f}")
             for t in legend_texts(ax))
  assert ax.get_xlabel() == "user activity (training interactions)"
  with pytest.raises(ValueError, match="no 'student_beats_teacher'"):
    plots.student_beats_teacher(KD[0])


def test_student_beats_teacher_exact_shape(tmp_path):
  """The record's documented shape alone (no 'ties', no 'users' total) is enough."""
  results = {"phases": {"distill": {
      "student": {"test": {"NDCG@10": 0.1}}, "teacher": {"test": {"NDCG@10": 0.2}},
      "student_beats_teacher": {"overall": 0.3, "by_activity": [
          {"range": [5, 8], "share": 0.4, "users": 10},
          {"range": [8, 20], "share": 0.2, "users": 12}]}}}}
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "results.json").write_text(json.dumps(results))
  fig = plots.student_beats_teacher(str(tmp_path / "run"), out=str(tmp_path / "b.png"))
  check_png(str(tmp_path / "b.png"))
  ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
  assert ticks == ["5–7\n10 users", "8–20\n12 users"]
  assert [p.get_height() for p in fig.axes[0].patches] == [0.4, 0.2]


def test_tables():
  table = plots.phase_table(BD)
  lines = table.splitlines()
  assert lines[0] == ("| model (test NDCG@10) | after warm-up | after BD | "
                      "control (no distillation) |")
  assert lines[2].startswith("| teacher | ") and lines[3].startswith("| student | ")
  table = plots.runs_table(KD)
  rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
  assert list(rows) == ["teacher", "none_s0", "none_s1", "rrd_s0"]
  assert rows["teacher"].startswith("| teacher | teacher | ")  # a teacher-only run
  assert rows["rrd_s0"].startswith("| rrd_s0 | student | ")
  assert "test NDCG@20" in table.splitlines()[0]


def test_load_errors(tmp_path):
  with pytest.raises(plots.RunError, match="no such workdir"):
    plots.load_run(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(plots.RunError, match="not a workdir"):
    plots.load_run(str(tmp_path / "empty"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "metrics.jsonl").write_text('{"phase": "warmup", "epoch": 1}\n{oops\n')
  with pytest.raises(plots.RunError, match="line 2 is not valid JSON"):
    plots.load_run(str(tmp_path / "bad"))
  run = plots.load_run(os.path.join(BD, "results.json"))
  assert run.name == "bd" and not run.records and run.main_phase() == "distill"
  for parent in ("a", "b"):  # two folders of one name: told apart by their parents
    (tmp_path / parent / "run").mkdir(parents=True)
    (tmp_path / parent / "run" / "results.json").write_text(
        open(os.path.join(BD, "results.json")).read())
  runs = plots.load_runs([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")])
  assert [r.name for r in runs] == ["a/run", "b/run"]


def _launch(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, MPLBACKEND="Agg")
  return subprocess.run([sys.executable, "-m", "launch.plot", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_launcher_writes_pngs(tmp_path):
  out = tmp_path / "plots"
  done = _launch("--workdirs", ",".join([BD] + KD[1:]), "--out", str(out),
                 "--which", "curves,losses,compare,groups,refresh,beats,overlay",
                 "--metric", "NDCG@10")
  assert done.returncode == 0, done.stderr
  written = done.stdout.split()
  names = sorted(os.path.basename(p) for p in written)
  assert names == sorted(
      [f"{r}_{k}.png" for r in ("bd", "none_s0", "none_s1", "rrd_s0")
       for k in ("curves", "losses", "beats")]
      + ["compare_test_NDCG10.png", "groups_test_student.png", "overlay_student_NDCG10.png"])
  for path in written:
    check_png(path, min_width=400)
  assert "skipped: refresh: bd: no 'refresh' statistics" in done.stderr  # BD writes none
  done = _launch("--workdirs", IBD, "--out", str(out), "--which", "refresh")
  assert done.returncode == 0 and done.stdout.split() == [str(out / "ibd_refresh.png")]


@pytest.mark.slow
def test_launcher_one_line_errors(tmp_path):
  missing = str(tmp_path / "nowhere")
  for args, message in (
      (("--workdirs", f"{BD},{missing}"), f"error: {missing}: no such workdir"),
      (("--workdirs", BD, "--which", "histogram"), "error: unknown --which histogram"),
      (("--workdirs", KD[0], "--which", "refresh"), "error: nothing to plot"),
      (("--out", str(tmp_path)), "error: flag --workdirs=None")):
    done = _launch(*args, "--out", str(tmp_path / "o")) if "--out" not in args else \
        _launch(*args)
    assert done.returncode == 1, (args, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), (args, done.stderr)
    assert "Traceback" not in done.stderr
