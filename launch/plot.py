r"""Draws PNG figures from one or more run folders (workdirs) with `kdrec_jax.plots`.

  python -m launch.plot --workdirs runs/teacher,runs/none_s0,runs/rrd_s0 --out plots/ \
      [--which curves,losses,compare,groups,refresh,beats] [--metric NDCG@20] [--split test]

Per run: `<label>_curves.png` (validation per epoch; BD vs control), `<label>_losses.png`,
`<label>_refresh.png` (iBD's per-round statistics) and `<label>_beats.png` (the share of test
users for whom the student ranks the held-out item above the teacher, by user activity). Across
runs: `compare_<split>_<metric>.png` (bar chart), `groups_<split>_<model>.png` (popularity-group
Recall@K and top-K share), `speed.png` (seconds per epoch) and `overlay_<model>_<metric>.png`
(the validation curves of --model, student by default). Labels are the folders' names (or
--labels). Each written file's path is printed; a figure a run cannot have (no refresh lines, no
popularity groups) is skipped with a `skipped:` line on stderr. A missing or unreadable
workdir, or nothing to draw, ends in one `error:` line and exit status 1.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags

from launch.flags_util import parse_flags

PER_RUN = ("curves", "losses", "refresh", "beats")
ACROSS = ("compare", "groups", "speed", "overlay")
DEFAULT = ("curves", "losses", "compare", "groups", "refresh", "beats")

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run folders (or results.json files), comma-"
                              "separated.")
_OUT = flags.DEFINE_string("out", "plots", "Folder for the PNG files (made if missing).")
_WHICH = flags.DEFINE_list("which", list(DEFAULT), "Figures, of " + ", ".join(PER_RUN + ACROSS)
                           + "; 'all' for every one.")
_METRIC = flags.DEFINE_string("metric", None, "Metric of curves, compare and overlay (default: "
                              "NDCG@50, NDCG@20 or NDCG@10, whichever all runs have).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "Split of compare and groups.")
_MODEL = flags.DEFINE_string("model", "student", "Model of groups and overlay.")
_PHASE = flags.DEFINE_string("phase", None, "Phase of compare, groups, speed and overlay "
                             "(default: each run's distillation, or its only phase).")
_LABELS = flags.DEFINE_list("labels", None, "Names of the runs, in --workdirs order (default: "
                            "folder names).")
flags.mark_flags_as_required(["workdirs"])


def _safe(name: str) -> str:
  """`name` as a file-name part: letters, digits, '.', '-', '_' only."""
  return re.sub(r"[^A-Za-z0-9._-]+", "", name.replace("/", "_")) or "run"


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from kdrec_jax import plots
  which = list(PER_RUN + ACROSS) if _WHICH.value == ["all"] else _WHICH.value
  unknown = [w for w in which if w not in PER_RUN + ACROSS]
  if unknown:
    _fail(f"unknown --which {', '.join(unknown)}; choose from {', '.join(PER_RUN + ACROSS)}")
  try:
    runs = plots.load_runs(_WORKDIRS.value, _LABELS.value)
  except ValueError as e:  # RunError included: a missing, empty or unreadable workdir
    _fail(str(e))
  os.makedirs(_OUT.value, exist_ok=True)
  out = lambda name: os.path.join(_OUT.value, name + ".png")  # noqa: E731
  metric = _METRIC.value
  jobs = []  # (file name, what, function)
  for run in runs:
    label = _safe(run.name)
    if "curves" in which:
      jobs.append((f"{label}_curves", "curves",
                   lambda p, r=run: plots.validation_curves(r, metric, out=p)))
    if "losses" in which:
      jobs.append((f"{label}_losses", "losses",
                   lambda p, r=run: plots.training_losses(r, out=p)))
    if "refresh" in which:
      jobs.append((f"{label}_refresh", "refresh",
                   lambda p, r=run: plots.refresh_statistics(r, out=p)))
    if "beats" in which:
      jobs.append((f"{label}_beats", "beats",
                   lambda p, r=run: plots.student_beats_teacher(r, out=p)))
  if "compare" in which:
    name = metric or _maybe(lambda: plots.default_metric(runs)) or "metric"
    jobs.append((f"compare_{_SPLIT.value}_{_safe(name)}", "compare",
                 lambda p: plots.compare_runs(runs, metric, _SPLIT.value, phases=_PHASE.value,
                                              out=p)))
  if "groups" in which:
    jobs.append((f"groups_{_SPLIT.value}_{_safe(_MODEL.value)}", "groups",
                 lambda p: plots.popularity_groups(runs, split=_SPLIT.value, model=_MODEL.value,
                                                   phase=_PHASE.value, out=p)))
  if "speed" in which:
    jobs.append(("speed", "speed", lambda p: plots.speed(runs, _PHASE.value, out=p)))
  if "overlay" in which:
    name = metric or _maybe(lambda: plots.default_metric(runs)) or "metric"
    jobs.append((f"overlay_{_safe(_MODEL.value)}_{_safe(name)}", "overlay",
                 lambda p: plots.compare_curves(runs, metric, _MODEL.value, _PHASE.value,
                                                out=p)))
  written = []
  for name, what, draw in jobs:
    try:
      draw(out(name))
    except ValueError as e:  # a figure this run (or set of runs) cannot have
      print(f"skipped: {what}: {e}", file=sys.stderr)
      continue
    written.append(out(name))
    print(out(name))
  if not written:
    _fail("nothing to plot from " + ", ".join(_WORKDIRS.value) + " with --which "
          + ",".join(which))


def _maybe(fn):
  try:
    return fn()
  except ValueError:
    return None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
