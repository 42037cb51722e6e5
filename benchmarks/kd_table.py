r"""The protocols' result tables from finished workdirs (results.json files), written into the
results pages between their marker lines.

  python -m benchmarks.kd_table --protocol kd --out docs/results/kd.md    # runs in results/kd
  python -m benchmarks.kd_table --protocol td --out docs/results/td.md
  python -m benchmarks.kd_table --protocol ub --out docs/results/ub.md
  python -m benchmarks.kd_table --protocol ibd --out docs/results/ibd.md
  python -m benchmarks.kd_table --protocol kd --runs runs/kd              # your own runs: print

`--runs` (default `results/<protocol>`) holds one folder per run with the results.json (and
metrics.jsonl) `launch.train` wrote; `python -m launch.sweep` names them as read here:
- kd (configs/kd_citeulike.py): `<method>_s<seed>` and `teacher`. Test Recall@10 / NDCG@10 /
  Recall@20 / NDCG@20 at the best validation epoch, mean ± std over seeds, beside the published
  RCE-KD Table 1 row where there is one, the gain in NDCG@20 over the no-KD student, the best
  epoch, the seconds per epoch and the wall time of the phase's epochs (from metrics.jsonl, each
  epoch counted once across the calls of a resumed run).
- td (configs/td_citeulike.py): `teacher` and `<method>_d<dim>`. Test HR@50 / NDCG@50 after the
  students' 100 epochs, beside the reference's logged HR@50.
- ub (configs/unkd_protocol.py): `<dataset>_<method>`. Test Recall@20 / NDCG@20, per popularity
  group (g0 the most popular), and each group's share of the top-20 lists; `<dataset>_unkd_l<x>`
  folders are UnKD rows with kd weight x.
- ibd (configs/ibd_citeulike.py beside the BD config of the same model): `<model>_s<seed>_<arm>`,
  arm `bd` (the BD run, whose results also hold the shared warm-up) or an iBD arm (`b05`, `b1`,
  `b2`: beta 0.5, 1, 2; `strict`; `random`). Test HR@50 / NDCG@50 of teacher and student, mean ±
  std over seeds, the student's gain over BD on the same seeds (and seed by seed), and the iBD
  row whose beta has the best validation HR@50 of the student, on the seeds that every beta arm
  has (none while fewer than two beta arms have finished; the row names the candidates while
  one is missing).
"""
import collections
import json
import os
import re

from absl import app
from absl import flags
import numpy as np

from configs import kd_citeulike

_RUNS = flags.DEFINE_string("runs", "", "Folder of run folders (default: results/<protocol>).")
_PROTOCOL = flags.DEFINE_enum("protocol", "kd", ["kd", "td", "ub", "ibd"], "Which table.")
_OUT = flags.DEFINE_string("out", "", "Also write the table into this file (e.g. "
                           "docs/results/kd.md), between the lines '<!-- <PROTOCOL>_TABLE -->' "
                           "and '<!-- /<PROTOCOL>_TABLE -->'.")
flags.DEFINE_alias("readme", "out")  # the flag's name before the tables left the README

KEYS = ("Recall@10", "NDCG@10", "Recall@20", "NDCG@20")
# The protocol's rows, their labels and the published rows come from its config; a method's
# label from the method registry (`kdrec_jax.methods.label`).
PUBLISHED = kd_citeulike.PUBLISHED
ORDER = kd_citeulike.TABLE_ORDER
LABELS = {arm: kd_citeulike.label(arm) for arm in ORDER}
# Topology_Distillation_KDD21 logs/: test HR@50 after 100 epochs, teacher d=200 0.3123.
TD_REFERENCE = {("none", 10): .1788, ("ftd", 10): .2112, ("htd", 10): .2282,
                ("none", 20): .2276, ("ftd", 20): .2516, ("htd", 20): .2744}


def run_folders(root: str) -> dict:
  """{run name: its folder} for every run under `root`: `<name>/results.json`, and the runs of
  a multi-run workdir (`launch.sweep --vmap_seeds`, kdrec_jax.runs) `<name>/<run>/results.json`
  as `<name>_<run>` (e.g. `rrd/s0` as `rrd_s0`)."""
  out = {}
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if os.path.exists(os.path.join(folder, "results.json")):
      out[name] = folder
    elif os.path.isdir(folder):
      for sub in sorted(os.listdir(folder)):
        if os.path.exists(os.path.join(folder, sub, "results.json")):
          out[f"{name}_{sub}"] = os.path.join(folder, sub)
  return out


def load_runs(root: str) -> dict:
  """{run name: the results.json phases} for every run under `root` (`run_folders`)."""
  out = {}
  for name, folder in run_folders(root).items():
    with open(os.path.join(folder, "results.json")) as f:
      out[name] = json.load(f)["phases"]
  return out


def training_seconds(root: str, name: str, phase: str):
  """Wall seconds of a phase's epochs from the run's metrics.jsonl, counting each epoch once
  however many calls a resumed run took (the per-epoch lines' seconds_per_epoch times the
  epochs since the previous kept line; evaluation and refresh included, compilation not), or
  None without per-epoch lines."""
  folders = run_folders(root) if root and os.path.isdir(root) else {}
  folder = folders.get(name, os.path.join(root, name))
  path = os.path.join(folder, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  last = {}  # epoch -> seconds per epoch of its latest line (a resumed run redoes epochs)
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if r.get("phase") == phase and "seconds_per_epoch" in r:
        last[r["epoch"]] = r["seconds_per_epoch"]
  if not last:
    return None
  epochs = sorted(last)
  return sum(last[e] * (e - p) for p, e in zip([0] + epochs[:-1], epochs))


def _result(phases: dict, teacher: bool):
  """(the phase's results, the model key) of a run: the warm-up for a teacher run."""
  phase = phases.get("warmup" if teacher else "distill")
  return (phase, "teacher" if teacher else "student") if phase else (None, None)


def _cell(values) -> str:
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def kd_table(runs: dict, root: str = "") -> str:
  by_method = collections.defaultdict(list)
  for name, phases in runs.items():
    match = re.fullmatch(r"(.+)_s(\d+)", name)
    method, seed = (match.group(1), int(match.group(2))) if match else (name, 0)
    phase, model = _result(phases, method == "teacher")
    if phase:
      seconds = training_seconds(root, name, "warmup" if method == "teacher" else "distill")
      phase = dict(phase, seconds=seconds if seconds is not None else phase["seconds"])
      by_method[method].append((seed, phase, model))
  none = [p[model]["test"]["NDCG@20"] for _, p, model in by_method.get("none", [])]
  lines = ["| run | seeds | R@10 | N@10 | R@20 | N@20 | published R@10 / N@10 / R@20 / N@20 "
           "| N@20 vs no-KD | best epoch | s/epoch | wall |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for method in ORDER + tuple(sorted(set(by_method) - set(ORDER))):  # new methods last
    rs = by_method.get(method)
    if not rs:
      continue
    tests = [p[model]["test"] for _, p, model in rs]
    cells = [_cell([t[k] for t in tests]) for k in KEYS]
    pub = " / ".join(f"{v:.4f}" for v in PUBLISHED[method]) if method in PUBLISHED else "—"
    n20 = np.mean([t["NDCG@20"] for t in tests])
    gain = f"{100 * (n20 / np.mean(none) - 1):+.1f}%" if none and method != "teacher" else "—"
    best = ", ".join(str(p.get("best_epoch", "—")) for _, p, _ in rs)
    per_epoch = np.mean([p["seconds"] / max(p["epochs"], 1) for _, p, _ in rs])
    wall = np.mean([p["seconds"] for _, p, _ in rs]) / 60
    lines.append(f"| {LABELS.get(method, method)} | {','.join(str(r[0]) for r in rs)} | "
                 + " | ".join(cells) + f" | {pub} | {gain} | {best} | {per_epoch:.2f} | "
                 f"{wall:.0f} min |")
  return "\n".join(lines)


def td_table(runs: dict) -> str:
  lines = ["| student | method | HR@50 | NDCG@50 | reference HR@50 (its split) | wall |",
           "|---|---|---|---|---|---|"]
  if "teacher" in runs:
    phase, _ = _result(runs["teacher"], True)
    t = phase["teacher"]["test"]
    lines.append(f"| teacher d=200 | — | {t['HR@50']:.4f} | {t['NDCG@50']:.4f} | 0.3123 | "
                 f"{phase['seconds'] / 60:.0f} min |")
  for dim in (10, 20):
    for method in ("none", "ftd", "htd"):
      name = f"{method}_d{dim}"
      if name not in runs or "distill" not in runs[name]:
        continue
      phase = runs[name]["distill"]
      t = phase["student"]["test"]
      label = "alone" if method == "none" else LABELS[method]
      lines.append(f"| d={dim} | {label} | {t['HR@50']:.4f} | {t['NDCG@50']:.4f} | "
                   f"{TD_REFERENCE[(method, dim)]:.4f} | {phase['seconds'] / 60:.0f} min |")
  return "\n".join(lines)


def ub_table(runs: dict) -> str:
  labels = dict(LABELS, teacher="teacher (MF d=100)", none="student d=10, no KD",
                unkd="UnKD (the authors' pairs)", unkd_intended="UnKD, intended pair swap")
  header = None
  lines = []
  for dataset in ("citeulike", "ml1m"):
    short = "cite" if dataset == "citeulike" else "ml1m"
    variants = sorted(n[len(short) + 1:] for n in runs
                      if re.fullmatch(rf"{short}_unkd(_intended)?_l[\d.]+", n))
    for method in ("teacher", "none", "rrd", "cd", "unkd", "unkd_intended", *variants):
      name = f"{short}_{method}"
      phase, model = _result(runs.get(name, {}), method == "teacher")
      if not phase:
        continue
      t = phase[model]["test"]
      groups = sorted({int(k.rsplit("/g", 1)[1]) for k in t if "/g" in k})
      if header is None:
        per = " | ".join(f"R@20 g{g}" for g in groups)
        share = " | ".join(f"share g{g}" for g in groups)
        header = (f"| data | run | R@20 | N@20 | {per} | {share} |",
                  "|---|---|---|---|" + "---|" * (2 * len(groups)))
      fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
      label = labels.get(method, method)
      if "_l" in method:
        label = f"{labels[method.rsplit('_l', 1)[0]]}, λ = {method.rsplit('_l', 1)[1]}"
      lines.append(f"| {dataset} | {label} | {t['Recall@20']:.4f} | "
                   f"{t['NDCG@20']:.4f} | "
                   + " | ".join(fmt(t.get(f"Recall@20/g{g}")) for g in groups) + " | "
                   + " | ".join(fmt(t.get(f"Share@20/g{g}")) for g in groups) + " |")
  return "\n".join([*header, *lines]) if header else ""


IBD_ARMS = {"b05": "iBD β = 0.5", "b1": "iBD β = 1", "b2": "iBD β = 2",
            "strict": "iBD β = 1, strict (no progress)", "random": "random feedback set, β = 1"}
IBD_MODELS = {"cdae": "CDAE", "neumf": "NeuMF", "bpr": "BPR-MF"}


def ibd_table(runs: dict) -> str:
  by = collections.defaultdict(dict)  # (model, arm) -> {seed: phases}
  for name, phases in runs.items():
    match = re.fullmatch(r"(.+)_s(\d+)_(.+)", name)
    if match and "distill" in phases:
      by[(match.group(1), match.group(3))][int(match.group(2))] = phases
  lines = ["| model | run | seeds | teacher HR@50 | teacher NDCG@50 | student HR@50 | "
           "student NDCG@50 | student HR@50 vs BD | per seed |",
           "|---|---|---|---|---|---|---|---|---|"]

  def row(model, label, seeds, phase_name, bd=None):
    tests = {m: [seeds[s][phase_name][m]["test"] for s in sorted(seeds)] for m in ("teacher",
                                                                                   "student")}
    cells = [_cell([t[k] for t in tests[m]]) for m in ("teacher", "student")
             for k in ("HR@50", "NDCG@50")]
    mean = float(np.mean([t["HR@50"] for t in tests["student"]]))
    # against BD over the same seeds (paired: same warm-up, same distillation seed)
    base = None if bd is None else np.mean([bd[k]["distill"]["student"]["test"]["HR@50"]
                                            for k in seeds if k in bd])
    gain = "—" if base is None or np.isnan(base) else f"{100 * (mean / base - 1):+.1f}%"
    # the same gain seed by seed (the spread the mean hides), with two or more paired seeds
    paired = [100 * (seeds[k][phase_name]["student"]["test"]["HR@50"]
                     / bd[k]["distill"]["student"]["test"]["HR@50"] - 1)
              for k in sorted(seeds) if bd is not None and k in bd]
    per_seed = " / ".join(f"{g:+.1f}" for g in paired) + "%" if len(paired) > 1 else "—"
    lines.append(f"| {IBD_MODELS.get(model, model)} | {label} | "
                 f"{','.join(map(str, sorted(seeds)))} | " + " | ".join(cells)
                 + f" | {gain} | {per_seed} |")

  for model in [m for m in IBD_MODELS if (m, "bd") in by]:
    bd = by[(model, "bd")]
    row(model, "warm-up", {min(bd): bd[min(bd)]}, "warmup")
    row(model, "BD", bd, "distill")
    betas = [arm for arm in ("b05", "b1", "b2") if (model, arm) in by]
    # chosen on the seeds every beta arm has (the protocol runs all three on seed 0 only); no
    # choice while fewer than two beta arms have finished
    common = (sorted(set.intersection(*(set(by[(model, arm)]) for arm in betas)))
              if len(betas) > 1 else [])
    if common:
      val = {arm: np.mean([by[(model, arm)][s]["distill"]["student"]["val"]["HR@50"]
                           for s in common]) for arm in betas}
      best = max(val, key=val.get)
      among = ("" if len(betas) == 3 else
               " among " + ", ".join(IBD_ARMS[a].split("= ")[1] for a in betas))
      row(model, f"**iBD, β chosen on validation of seed{'s' * (len(common) > 1)} "
          f"{','.join(map(str, common))} ({IBD_ARMS[best][4:]}{among})**", by[(model, best)],
          "distill", bd)
    for arm, label in IBD_ARMS.items():
      if (model, arm) in by:
        row(model, label, by[(model, arm)], "distill", bd)
  return "\n".join(lines)


def write_between_markers(path: str, name: str, text: str) -> None:
  """Replaces what lies between the marker lines of `name` in the file at `path`."""
  start, end = f"<!-- {name}_TABLE -->", f"<!-- /{name}_TABLE -->"
  with open(path) as f:
    doc = f.read()
  if start not in doc or end not in doc:
    raise ValueError(f"{path}: no '{start}' ... '{end}' lines")
  head, rest = doc.split(start, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(f"{head}{start}\n{text}\n{end}{tail}")


def table(protocol: str, root: str) -> str:
  """The markdown table of `protocol` from the run folders under `root`."""
  runs = load_runs(root)
  if protocol == "kd":
    return kd_table(runs, root)
  return {"td": td_table, "ub": ub_table, "ibd": ibd_table}[protocol](runs)


def main(argv):
  del argv
  text = table(_PROTOCOL.value, _RUNS.value or os.path.join("results", _PROTOCOL.value))
  print(text)
  if _OUT.value:
    write_between_markers(_OUT.value, _PROTOCOL.value.upper(), text)


if __name__ == "__main__":
  app.run(main)
