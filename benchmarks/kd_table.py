r"""The README's teacher->student comparison table from finished workdirs (results.json files).

  python -m benchmarks.kd_table --runs benchmarks/results/kd_cpu [--markdown]

`--runs` holds one folder per run named `<method>_s<seed>` (plus `teacher`), each with the
results.json (and metrics.jsonl) that `launch.train` wrote. Prints test Recall@10 / NDCG@10 /
Recall@20 / NDCG@20 at the best validation epoch, mean ± std over seeds, beside the published
RCE-KD Table 1 row where there is one, the best epoch, the seconds per epoch and the wall time.
"""
import collections
import json
import os
import re

from absl import app
from absl import flags
import numpy as np

_RUNS = flags.DEFINE_string("runs", "benchmarks/results/kd_cpu", "Folder of run folders.")

KEYS = ("Recall@10", "NDCG@10", "Recall@20", "NDCG@20")
# RCE-KD (arXiv 2509.20989) Table 1, MF -> MF on CiteULike, mean of 5 runs (from the issue).
PUBLISHED = {
    "teacher": (.0283, .0155, .0442, .0198),
    "none": (.0177, .0098, .0284, .0128),
    "cd": (.0239, .0131, .0347, .0158),
    "rrd": (.0251, .0135, .0362, .0169),
    "dcd": (.0254, .0136, .0375, .0173),
}
LABELS = {
    "teacher": "teacher (MF d=400)", "none": "student d=20, no KD", "cd": "CD, student-guided",
    "cd_teacher": "CD, teacher-guided", "rd": "RD", "de": "DE", "rrd": "RRD",
    "de_rrd": "DE-RRD", "dcd": "DCD",
}
ORDER = ("teacher", "none", "cd", "cd_teacher", "rd", "de", "rrd", "de_rrd", "dcd")


def load_runs(root: str) -> dict:
  """{method: [(seed, phase results, metrics records)]} for every finished run under `root`."""
  out = collections.defaultdict(list)
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, "results.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      phases = json.load(f)["phases"]
    match = re.fullmatch(r"(.+)_s(\d+)", name)
    method, seed = (match.group(1), int(match.group(2))) if match else (name, 0)
    phase = "warmup" if method == "teacher" else "distill"
    if phase not in phases:
      continue
    records = []
    metrics_path = os.path.join(root, name, "metrics.jsonl")
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    out[method].append((seed, phases[phase], [r for r in records if r.get("phase") == phase]))
  return out


def _cell(values) -> str:
  values = np.asarray(values)
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def table(root: str) -> str:
  runs = load_runs(root)
  model = lambda m: "teacher" if m == "teacher" else "student"  # noqa: E731
  none = [r[1]["student"]["test"]["NDCG@20"] for r in runs.get("none", [])]
  lines = ["| run | seeds | R@10 | N@10 | R@20 | N@20 | published R@10 / N@10 / R@20 / N@20 "
           "| N@20 vs no-KD | best epoch | s/epoch | wall |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for method in ORDER:
    if method not in runs:
      continue
    rs = runs[method]
    tests = [r[1][model(method)]["test"] for r in rs]
    cells = [_cell([t[k] for t in tests]) for k in KEYS]
    pub = " / ".join(f"{v:.4f}" for v in PUBLISHED[method]) if method in PUBLISHED else "—"
    n20 = np.mean([t["NDCG@20"] for t in tests])
    gain = f"{100 * (n20 / np.mean(none) - 1):+.1f}%" if none and method != "teacher" else "—"
    best = ", ".join(str(r[1].get("best_epoch", "—")) for r in rs)
    per_epoch = [r[1]["seconds"] / max(r[1]["epochs"], 1) for r in rs]
    wall = [r[1]["seconds"] for r in rs]
    lines.append(f"| {LABELS.get(method, method)} | {','.join(str(r[0]) for r in rs)} | "
                 + " | ".join(cells) + f" | {pub} | {gain} | {best} | "
                 f"{np.mean(per_epoch):.2f} | {np.mean(wall) / 60:.0f} min |")
  return "\n".join(lines)


def main(argv):
  del argv
  print(table(_RUNS.value))


if __name__ == "__main__":
  app.run(main)
