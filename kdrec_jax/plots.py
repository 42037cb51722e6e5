"""Figures and tables from run folders (workdirs), for notebooks and `python -m launch.plot`.

A workdir is what `train.train_and_evaluate(config, workdir)` writes: `results.json` (each
finished phase's validation and test metrics per model, the popularity-group metrics
`Recall@K/g<i>`, `NDCG@K/g<i>`, `Share@K/g<i>`, and `student_beats_teacher` where a phase
evaluates both models) and `metrics.jsonl` (training lines with the losses, validation lines
`{"phase", "epoch", "eval": {model: {"val": {...}}}}`, each phase's final line with `"final":
true`, and iBD's `{"phase", "epoch", "refresh": {...}}` statistics). A bare `results.json` file
(e.g. `results/bd/cpu_runs/*.results.json`) loads too, for the figures built from it.

Every figure function takes runs (workdir paths or `Run`s from `load_run`), returns a matplotlib
`Figure` and, with `out=`, also writes it as a PNG. Figures are built without pyplot (no global
state, nothing pops up); in a notebook, `%matplotlib inline` and the returned figure as a
cell's last expression (or `display(fig)`) shows it. matplotlib is imported on first use.

  validation_curves   validation metric per epoch, per phase; BD vs control in one panel
  compare_curves      one model's validation curve across runs (e.g. methods)
  training_losses     the training losses per phase (totals and their terms)
  compare_runs        bar chart of a test metric across runs (seeds `<name>_s<k>` averaged)
  speed               seconds per epoch across runs
  popularity_groups   per-popularity-group Recall@K and top-K share across runs
  refresh_statistics  iBD's per-round sampled / corrected / re-selected counts per user
  student_beats_teacher  share of test users for whom the student ranks the held-out item
                      above the teacher, overall and by user activity
  phase_table, runs_table  markdown tables (before/after per phase; one row per run)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import sys
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported on first use
  from matplotlib.axes import Axes
  from matplotlib.figure import Figure

MODELS = ("teacher", "student")
PHASES = ("warmup", "distill", "control")
PHASE_TITLES = {"warmup": "warm-up", "distill": "distillation", "control": "control"}
COLORS = {"teacher": "C0", "student": "C1"}
BIDIRECTIONAL = ("bd", "ibd")  # methods whose distillation (and control) train both models
_HATCHES = {"warmup": "..", "control": "//"}  # bars of phases other than the distillation
DPI = 120

_SEED_SUFFIX = re.compile(r"_s(\d+)$")
_NOT_LOSSES = ("epoch", "seconds_per_epoch", "examples_per_s")


class RunError(ValueError):
  """A workdir that is missing, empty or unreadable."""


@dataclasses.dataclass
class Run:
  """One run folder: `results` (results.json, {} if absent) and `records` (metrics.jsonl lines,
  [] if absent), shown under `name`."""
  name: str
  path: str
  results: dict
  records: list

  @property
  def method(self) -> str:
    """The distillation method's name from the recorded config ('' if unknown)."""
    return str(self.results.get("config", {}).get("method", {}).get("name", ""))

  @property
  def method_label(self) -> str:
    """The method's name for titles: 'BD', 'DE-RRD', 'no KD' ('' if unknown)."""
    return "no KD" if self.method == "none" else self.method.upper().replace("_", "-")

  def phases(self) -> list[str]:
    """Phases with results or records, in schedule order (unknown names last)."""
    names = set(self.results.get("phases", {})) | {r["phase"] for r in self.records
                                                   if "phase" in r}
    return sorted(names, key=lambda p: (PHASES.index(p) if p in PHASES else len(PHASES), p))

  def main_phase(self) -> Optional[str]:
    """The phase whose results characterise the run: 'distill' if finished, else the last."""
    done = [p for p in self.phases() if p in self.results.get("phases", {})]
    return "distill" if "distill" in done else (done[-1] if done else None)

  def phase_metrics(self, phase: str, model: str, split: str = "test") -> dict:
    """{metric: value} of `model` at the end of `phase` ({} if not recorded); from results.json,
    else from the phase's final line in metrics.jsonl."""
    found = self.results.get("phases", {}).get(phase, {}).get(model, {}).get(split)
    if found is None:
      final = self.final_eval(phase)
      found = final.get(model, {}).get(split) if final else None
    return dict(found or {})

  def final_eval(self, phase: str) -> dict:
    """The `eval` of `phase`'s final line in metrics.jsonl (the last one), or {}."""
    finals = [r["eval"] for r in self.records
              if r.get("phase") == phase and r.get("final") and "eval" in r]
    return finals[-1] if finals else {}

  def phase_info(self, phase: str) -> dict:
    """The phase's entry in results.json (metrics, 'seconds', 'epochs', 'best_epoch', ...)."""
    return dict(self.results.get("phases", {}).get(phase) or self.final_eval(phase))

  def validation(self, phase: str, model: str, metric: str) -> tuple[list, list, bool]:
    """(epochs, values, periodic) of `model`'s validation `metric` in `phase`: the periodic
    validations and the phase's end (left out when the phase stopped early and the model has
    periodic validations: its end then repeats the best epoch). `periodic` is False when only
    the phase's end has the model (e.g. a frozen teacher)."""
    points, ends = {}, {}
    for r in self.records:
      if r.get("phase") != phase or "eval" not in r:
        continue
      value = r["eval"].get(model, {}).get("val", {}).get(metric)
      if value is None:
        continue
      target = ends if r.get("final") else points
      target[int(r["epoch"])] = float(value)
      if r.get("final") and "best_epoch" in r["eval"]:
        ends["early"] = True
    periodic = bool(points)
    if not (periodic and ends.pop("early", False)):
      ends.pop("early", None)
      for epoch, value in ends.items():
        points.setdefault(epoch, value)
    epochs = sorted(points)
    return epochs, [points[e] for e in epochs], periodic

  def trained(self, phase: str) -> Optional[tuple[str, ...]]:
    """The models `phase` trains, from the recorded config (None if there is none): the
    warm-up's `warmup.models` (both by default; not a teacher loaded by `teacher_init`), both in
    BD and iBD's distillation and control, the student alone in teacher -> student methods."""
    cfg = self.results.get("config")
    if not cfg:
      return None
    if phase == "warmup":
      models = tuple(cfg.get("warmup", {}).get("models") or MODELS)
      return tuple(m for m in models if not (m == "teacher" and cfg.get("teacher_init")))
    if phase in ("distill", "control"):
      return MODELS if self.method in BIDIRECTIONAL else ("student",)
    return None

  def training(self, phase: str) -> list[dict]:
    """The training lines of `phase` (losses, seconds per epoch, examples/s), by epoch."""
    lines = [r for r in self.records if r.get("phase") == phase and "seconds_per_epoch" in r]
    return sorted(lines, key=lambda r: r["epoch"])

  def refreshes(self, phase: Optional[str] = None) -> list[dict]:
    """The `refresh` statistics lines (iBD), of `phase` if given, by epoch."""
    lines = [r for r in self.records if "refresh" in r and (phase is None
                                                           or r.get("phase") == phase)]
    return sorted(lines, key=lambda r: (r.get("phase", ""), r["epoch"]))


RunLike = Union[str, os.PathLike, Run]


def _read_json(path: str) -> dict:
  """The JSON object in `path`; RunError naming the file (and line) otherwise."""
  try:
    with open(path) as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise RunError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
  except OSError as e:
    raise RunError(f"{path}: cannot read ({e.strerror})") from None
  if not isinstance(value, dict):
    raise RunError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _read_jsonl(path: str) -> list:
  """The JSON objects of `path`, one a line (blank lines skipped); RunError naming the line."""
  records = []
  try:
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise RunError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
          raise RunError(f"{path}: line {number} is not a JSON object")
        records.append(record)
  except OSError as e:
    raise RunError(f"{path}: cannot read ({e.strerror})") from None
  return records


def load_run(path: RunLike, name: Optional[str] = None) -> Run:
  """The run in `path`: a workdir (results.json and/or metrics.jsonl), a results file
  (`*.json`) or a metrics file (`*.jsonl`). `name` defaults to the folder's name (`<arm>_s<k>`
  for the seed folder `<arm>/s<k>` of several runs as one program; a results file's name
  without `.results.json`). Raises RunError when there is nothing to read."""
  if isinstance(path, Run):
    return dataclasses.replace(path, name=name) if name else path
  path = os.path.normpath(os.fspath(path))
  if os.path.isdir(path):
    results_path = os.path.join(path, "results.json")
    metrics_path = os.path.join(path, "metrics.jsonl")
    if not (os.path.exists(results_path) or os.path.exists(metrics_path)):
      raise RunError(f"{path}: not a workdir (no results.json or metrics.jsonl in it)")
    results = _read_json(results_path) if os.path.exists(results_path) else {}
    records = _read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    default = os.path.basename(os.path.abspath(path))
    if re.fullmatch(r"s\d+", default):  # a seed of a multi-run workdir (kdrec_jax.runs)
      default = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}_{default}"
  elif os.path.isfile(path):
    base = os.path.basename(path)
    if base.endswith(".jsonl"):
      results, records = {}, _read_jsonl(path)
      default = os.path.basename(os.path.dirname(os.path.abspath(path)))
    else:
      results, records = _read_json(path), []
      default = re.sub(r"(\.results)?\.json$", "", base) or base
      if default == "results":
        default = os.path.basename(os.path.dirname(os.path.abspath(path)))
  else:
    raise RunError(f"{path}: no such workdir")
  if results and not isinstance(results.get("phases", {}), dict):
    raise RunError(f"{path}: results.json has no 'phases' object")
  if not results.get("phases") and not records:
    raise RunError(f"{path}: no finished phase and no metrics lines yet")
  return Run(name=name or default, path=path, results=results, records=records)


def load_runs(paths: Iterable[RunLike], labels: Optional[Sequence[str]] = None) -> list[Run]:
  """`load_run` for each path; `labels` name them (default: folder names, made unique by
  prefixing parent folders where two are alike)."""
  paths = list(paths)
  if labels is not None and len(labels) != len(paths):
    raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
  runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]
  if labels is None:
    unique = _unique_labels([r.path for r in runs], [r.name for r in runs])
    runs = [dataclasses.replace(r, name=label) for r, label in zip(runs, unique)]
  return runs


def _unique_labels(paths: list[str], names: list[str]) -> list[str]:
  """`names`, where two are equal replaced by the last path components that tell them apart."""
  out = list(names)
  for name in set(names):
    same = [i for i, n in enumerate(names) if n == name]
    if len(same) < 2:
      continue
    parts = [os.path.abspath(paths[i]).split(os.sep) for i in same]
    for depth in range(2, max(len(p) for p in parts) + 1):
      tails = ["/".join(p[-depth:]) for p in parts]
      if len(set(tails)) == len(tails):
        for i, tail in zip(same, tails):
          out[i] = tail
        break
  return out


def _runs(runs: Union[RunLike, Iterable[RunLike]], labels: Optional[Sequence[str]] = None
          ) -> list[Run]:
  """`runs` (one or several paths or Runs) as a list of Runs, named by `labels` if given."""
  if isinstance(runs, (str, os.PathLike, Run)):
    runs = [runs]
  runs = list(runs)
  if not runs:
    raise ValueError("no runs given")
  if all(isinstance(r, Run) for r in runs):
    if labels is not None:
      if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
      runs = [dataclasses.replace(r, name=label) for r, label in zip(runs, labels)]
    return runs
  return load_runs(runs, labels)


# ----------------------------------------------------------------------------------------------
# matplotlib
# ----------------------------------------------------------------------------------------------

def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.5, height: float = 4.0
            ) -> tuple[Figure, list[Axes]]:
  """(figure, flat list of axes): a pyplot-free Figure with a constrained layout."""
  import matplotlib
  if (not os.environ.get("MPLBACKEND") and not os.environ.get("DISPLAY")
      and sys.platform.startswith("linux") and "matplotlib.pyplot" not in sys.modules
      and "ipykernel" not in sys.modules):
    matplotlib.use("Agg")  # no display: never try an interactive backend
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, [ax for row in axes for ax in row]


def _finish(fig: Figure, out: Optional[str]) -> Figure:
  """Saves `fig` as a PNG at `out` (folders made) when given; returns `fig`."""
  if out:
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
  return fig


def _metric_names(run: Run) -> set:
  """Every metric name the run records for a model (phase ends and validations)."""
  names = set()
  for phase in run.phases():
    for model in MODELS:
      for split in ("val", "test"):
        names |= set(run.phase_metrics(phase, model, split))
  for r in run.records:
    for model in MODELS:
      names |= set(r.get("eval", {}).get(model, {}).get("val", {}) or {})
  return names


def default_metric(runs: Union[RunLike, Iterable[RunLike]]) -> str:
  """A metric every run has: NDCG@50 (BD's tables), NDCG@20 (the teacher -> student protocol),
  NDCG@10, else the first NDCG@K, else the first one."""
  runs = _runs(runs)
  common = set.intersection(*[_metric_names(r) for r in runs])
  overall = [n for n in common if "/" not in n]
  for name in ("NDCG@50", "NDCG@20", "NDCG@10"):
    if name in overall:
      return name
  ndcg = sorted((n for n in overall if n.startswith("NDCG@")), key=_k_of)
  if ndcg or overall:
    return (ndcg or sorted(overall))[0]
  raise ValueError("no metric common to runs " + ", ".join(r.name for r in runs))


def _k_of(name: str) -> int:
  """K of a metric name like `NDCG@20` or `Recall@10/g0` (0 without one)."""
  match = re.search(r"@(\d+)", name)
  return int(match.group(1)) if match else 0


def _markers(n: int) -> str:
  """Line format: with point markers for curves of few points."""
  return "o-" if n <= 25 else "-"


# ----------------------------------------------------------------------------------------------
# curves
# ----------------------------------------------------------------------------------------------

def _curve(run: Run, phase: str, model: str, metric: str) -> tuple[list, list, bool]:
  """(epochs, values, frozen) of `model` in `phase` for `validation_curves`: a model the phase
  trains from the warm-up's end (BD's distillation and control) starts at epoch 0 with the
  warm-up's final validation value."""
  epochs, values, periodic = run.validation(phase, model, metric)
  trained = run.trained(phase)
  if trained is None:  # no config: a model validated only at the end, beside one validated
    others = [run.validation(phase, m, metric)[2] for m in MODELS if m != model]  # throughout
    frozen = not periodic and any(others)
  else:
    frozen = model not in trained
  warm = run.trained("warmup") or ()
  if (epochs and not frozen and phase in ("distill", "control") and model in warm
      and 0 not in epochs):
    start = run.phase_metrics("warmup", model, "val").get(metric)
    if start is not None:
      epochs, values = [0] + epochs, [float(start)] + values
  return epochs, values, frozen


def validation_curves(run: RunLike, metric: Optional[str] = None,
                      models: Sequence[str] = MODELS, out: Optional[str] = None) -> Figure:
  """Validation `metric` per epoch of each phase, teacher and student; when the run has both a
  distillation phase and a control, they share a panel (distillation solid, control dashed,
  both starting at epoch 0 from the warm-up's end). A model the phase does not train (a frozen
  teacher) is a dotted line at its value; a warm-up that trained nothing (a loaded teacher) has
  no panel. The best epoch of an early-stopped phase is starred."""
  run = _runs(run)[0]
  metric = metric or default_metric(run)
  phases = []
  for phase in run.phases():
    curves = [_curve(run, phase, m, metric) for m in models]
    if any(epochs and not frozen for epochs, _, frozen in curves):
      phases.append(phase)
  if not phases:
    raise ValueError(f"{run.name}: no validation {metric} of a trained model in metrics.jsonl")
  panels = []  # (title, [(phase, linestyle)])
  for phase in phases:
    if phase == "control" and "distill" in phases:
      continue
    title = PHASE_TITLES.get(phase, phase)
    if phase == "distill":
      title = f"distillation ({run.method_label})" if run.method else title
      if "control" in phases:
        panels.append((f"{run.method_label or 'distillation'} (solid) vs control (dashed)",
                       [("distill", "-"), ("control", "--")]))
        continue
    panels.append((title, [(phase, "-")]))
  fig, axes = _figure(len(panels))
  for ax, (title, members) in zip(axes, panels):
    for phase, style in members:
      label_phase = "" if len(members) == 1 else f", {PHASE_TITLES.get(phase, phase)}"
      best = run.phase_info(phase).get("best_epoch")
      for model in models:
        epochs, values, frozen = _curve(run, phase, model, metric)
        if not epochs:
          continue
        color = COLORS.get(model)
        if frozen:
          ax.axhline(values[-1], color=color, linestyle=":",
                     label=f"{model} (not trained here){label_phase}: {values[-1]:.4f}")
          continue
        marker = "o" if len(epochs) <= 25 else None
        ax.plot(epochs, values, linestyle=style, marker=marker, color=color, markersize=3,
                label=f"{model}{label_phase}")
        if best is not None and best in epochs:
          ax.plot([best], [values[epochs.index(best)]], "*", color=color, markersize=12,
                  markeredgecolor="black", label=f"{model}: best epoch ({best})")
    ax.set_title(title)
    ax.set_xlabel("epoch (within the phase)")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"{run.name}: validation {metric} per epoch")
  return _finish(fig, out)


def compare_curves(runs: Iterable[RunLike], metric: Optional[str] = None,
                   model: str = "student", phase: Optional[str] = None,
                   labels: Optional[Sequence[str]] = None, out: Optional[str] = None) -> Figure:
  """`model`'s validation `metric` per epoch in `phase` (default: each run's main phase, the
  distillation where there is one), one line per run."""
  runs = _runs(runs, labels)
  metric = metric or default_metric(runs)
  fig, (ax,) = _figure(1, width=7.0, height=4.5)
  drawn = 0
  for run in runs:
    ph = phase or run.main_phase() or (run.phases() or [None])[-1]
    epochs, values, _ = run.validation(ph, model, metric) if ph else ([], [], False)
    if not epochs:
      continue
    ax.plot(epochs, values, _markers(len(epochs)), markersize=3, label=run.name)
    drawn += 1
  if not drawn:
    raise ValueError(f"no validation {metric} of the {model} in runs "
                     + ", ".join(r.name for r in runs))
  ax.set_title(f"{model}: validation {metric} per epoch"
               + (f" ({PHASE_TITLES.get(phase, phase)})" if phase else ""))
  ax.set_xlabel("epoch (within the phase)")
  ax.set_ylabel(f"validation {metric}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _finish(fig, out)


def _loss_style(key: str) -> tuple[tuple, str, str, str]:
  """(sort key, color, linestyle, label) of a training-line key: per model its total, its base
  loss (`cf_<model>`: BPR or the model's own) and its distillation terms; then the rest."""
  for index, model in enumerate(MODELS):
    if key == f"loss_{model}":
      return (index, 0, key), COLORS[model], "-", f"{model}: total"
    if key == f"cf_{model}":
      return (index, 1, key), COLORS[model], "--", f"{model}: base loss"
    if key.endswith(f"_{model}"):
      term = key[:-len(model) - 1]
      return (index, 2, key), COLORS[model], ":", f"{model}: {term} term"
  if key == "loss_method":
    return (len(MODELS), 0, key), "C2", "-", "method's own networks: total"
  return (len(MODELS) + 1, 0, key), "", "-.", f"{key} term"


def _is_loss(key: str, value: Any) -> bool:
  """Whether a training-line entry is a loss (not timing, counts or shares)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and key not in _NOT_LOSSES and not key.startswith("valid_")
          and not key.endswith(("_users", "_items")))


def training_losses(run: RunLike, keys: Optional[Sequence[str]] = None,
                    out: Optional[str] = None) -> Figure:
  """The training losses per phase (one panel each), per training example: each model's total
  (solid), its base loss (dashed; left out where it is the whole total) and the distillation
  terms (dotted, unweighted); a log scale when the values span more than 20x. `keys` picks the
  metrics.jsonl keys to draw (default: every loss)."""
  run = _runs(run)[0]
  phases = [p for p in run.phases() if run.training(p)]
  if not phases:
    raise ValueError(f"{run.name}: no training lines in metrics.jsonl")
  fig, axes = _figure(len(phases))
  for ax, phase in zip(axes, phases):
    lines = run.training(phase)
    names = sorted({k for r in lines for k, v in r.items() if _is_loss(k, v)
                    and (keys is None or k in keys)}, key=lambda k: _loss_style(k)[0])
    series = {}
    for key in names:
      points = [(r["epoch"], r[key]) for r in lines if r.get(key) is not None]
      if points:
        series[key] = points
    for model in MODELS:  # the base loss is the total when nothing else is added
      base, total = series.get(f"cf_{model}"), series.get(f"loss_{model}")
      if base and total and all(math.isclose(a[1], b[1], rel_tol=1e-6)
                                for a, b in zip(base, total)) and len(base) == len(total):
        del series[f"cf_{model}"]
    values = [v for points in series.values() for _, v in points]
    log = bool(values) and min(values) > 0 and max(values) / min(values) > 20
    for key, points in series.items():
      _, color, style, label = _loss_style(key)
      if key.startswith("loss_") and f"cf_{key[5:]}" in names and f"cf_{key[5:]}" not in series:
        label += " (= base loss)"
      epochs, ys = zip(*points)
      ax.plot(epochs, ys, linestyle=style, marker="o" if len(points) <= 25 else None,
              markersize=3, label=label, **({"color": color} if color else {}))
    if log:
      ax.set_yscale("log")
    title = PHASE_TITLES.get(phase, phase)
    ax.set_title(f"{title} ({run.method_label})" if phase == "distill" and run.method else title)
    ax.set_xlabel("epoch (within the phase)")
    ax.set_ylabel("loss per training example" + (" (log scale)" if log else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle(f"{run.name}: training losses")
  return _finish(fig, out)


# ----------------------------------------------------------------------------------------------
# across runs
# ----------------------------------------------------------------------------------------------

def _group_seeds(runs: list[Run], aggregate: bool) -> list[tuple[str, list[Run]]]:
  """[(name, runs)]: with `aggregate`, runs named `<name>_s<k>` grouped under `<name>`."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    key = _SEED_SUFFIX.sub("", run.name) if aggregate else run.name
    groups.setdefault(key, []).append(run)
  return list(groups.items())


def _label(name: str, count: int) -> str:
  """A group's tick label: its name, with the number of seeds averaged when more than one."""
  return f"{name} ({count} seeds)" if count > 1 else name


def _mean_std(values: list) -> tuple[float, float, int]:
  """(mean, standard deviation, count) of the recorded values (None and NaN left out)."""
  values = [float(v) for v in values if v is not None and not math.isnan(v)]
  if not values:
    return math.nan, 0.0, 0
  return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
          len(values))


def _phases_of(run: Run, phases: Optional[Sequence[str]]) -> list[str]:
  """The `phases` the run has, or its main phase."""
  if phases:
    return [p for p in phases if p in run.phases()]
  main = run.main_phase()
  return [main] if main else []


def compare_runs(runs: Iterable[RunLike], metric: Optional[str] = None, split: str = "test",
                 phases: Optional[Union[str, Sequence[str]]] = None,
                 models: Sequence[str] = MODELS, labels: Optional[Sequence[str]] = None,
                 aggregate_seeds: bool = True, out: Optional[str] = None) -> Figure:
  """Bar chart of `split` `metric` across runs: for each run its main phase (the distillation,
  or a teacher-only run's warm-up) or the given `phases`, one bar per model (and phase). Runs
  named `<name>_s<k>` are averaged (error bar: standard deviation over seeds) unless
  `aggregate_seeds=False`. A model with the same value in every run (a shared frozen teacher)
  is a dashed line instead of repeated bars."""
  runs = _runs(runs, labels)
  metric = metric or default_metric(runs)
  if isinstance(phases, str):
    phases = [phases]
  groups = _group_seeds(runs, aggregate_seeds)
  series: dict[tuple[str, str], list] = {}  # (phase or "", model) -> per group (mean, std, n)
  phase_names = sorted({p for r in runs for p in _phases_of(r, phases)},
                       key=lambda p: PHASES.index(p) if p in PHASES else len(PHASES))
  for model in models:  # bars side by side: a model's phases next to each other
    for phase_key in ([""] if not phases else phase_names):
      cells = []
      for _, members in groups:
        values = []
        for run in members:
          ph = phase_key or run.main_phase()
          value = run.phase_metrics(ph, model, split).get(metric) if ph else None
          values.append(value)
        cells.append(_mean_std(values))
      if any(not math.isnan(m) for m, _, _ in cells):
        series[(phase_key, model)] = cells
  if not series:
    raise ValueError(f"no {split} {metric} in runs " + ", ".join(r.name for r in runs))
  bars = {k: v for k, v in series.items()
          if not (len(groups) > 1 and _constant([m for m, _, _ in v]))}
  lines = {k: v for k, v in series.items() if k not in bars}
  keep = [i for i in range(len(groups)) if not bars
          or any(not math.isnan(cells[i][0]) for cells in bars.values())]
  dropped = [groups[i][0] for i in range(len(groups)) if i not in keep]
  fig, (ax,) = _figure(1, width=max(6.0, 1.1 * len(keep) + 3), height=4.5)
  width = 0.8 / max(len(bars), 1)
  for index, ((phase_key, model), cells) in enumerate(bars.items()):
    cells = [cells[i] for i in keep]
    xs = [i + (index - (len(bars) - 1) / 2) * width for i in range(len(keep))]
    errs = [s if s > 0 else math.nan for _, s, _ in cells]
    label = model + (f", {PHASE_TITLES.get(phase_key, phase_key)}" if phase_key else "")
    drawn = ax.bar(xs, [m for m, _, _ in cells], width, label=label, capsize=3,
                   yerr=errs if any(not math.isnan(e) for e in errs) else None,
                   color=COLORS.get(model, f"C{index + 2}"), edgecolor="white",
                   hatch=_HATCHES.get(phase_key, ""))
    ax.bar_label(drawn, fmt="%.4f", fontsize=7, padding=2)
  for (phase_key, model), cells in lines.items():
    value = next(m for m, _, _ in cells if not math.isnan(m))
    where = f", {PHASE_TITLES.get(phase_key, phase_key)}" if phase_key else ""
    ax.axhline(value, color=COLORS.get(model, "grey"), linestyle="--",
               label=f"{model}{where} (same in every run): {value:.4f}")
  counts = [max([c[i][2] for c in bars.values()] or [1]) for i in keep]
  _run_ticks(ax, [_label(groups[i][0], n) for i, n in zip(keep, counts)])
  ax.set_ylabel(f"{split} {metric}")
  which = ("at the end of each run's distillation (or only) phase" if not phases
           else "phases: " + ", ".join(PHASE_TITLES.get(p, p) for p in phase_names))
  ax.set_title(f"{split} {metric} by run ({which})", fontsize=10)
  ax.set_xlabel("run" + (" (mean ± std over seeds)" if max(counts or [1]) > 1 else "")
                + (f"\nnot shown (no bar value): {', '.join(dropped)}" if dropped else ""))
  ax.margins(y=0.15)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _finish(fig, out)


def _run_ticks(ax: Axes, labels: list[str]) -> None:
  """Run names under the bars, slanted (anchored at their end) when there are many."""
  slant = len(labels) > 4 or max((len(x) for x in labels), default=0) > 14
  ax.set_xticks(range(len(labels)), labels, rotation=30 if slant else 0,
                ha="right" if slant else "center", rotation_mode="anchor")


def _constant(values: list) -> bool:
  """Whether every value is recorded and they are all equal."""
  present = [v for v in values if not math.isnan(v)]
  return len(present) == len(values) and max(present) - min(present) <= 1e-12


def seconds_per_epoch(run: Run, phase: Optional[str] = None) -> Optional[float]:
  """Median seconds per epoch of `phase` (default: the main phase) over its training lines
  (they include the periodic validation and refreshes), else its seconds / epochs."""
  phase = phase or run.main_phase() or (run.phases() or [None])[-1]
  if phase is None:
    return None
  lines = [r["seconds_per_epoch"] for r in run.training(phase)]
  if lines:
    return float(statistics.median(lines))
  info = run.phase_info(phase)
  if info.get("seconds") and info.get("epochs"):
    return float(info["seconds"]) / float(info["epochs"])
  return None


def speed(runs: Iterable[RunLike], phase: Optional[str] = None,
          labels: Optional[Sequence[str]] = None, aggregate_seeds: bool = True,
          out: Optional[str] = None) -> Figure:
  """Bar chart of seconds per epoch across runs (`seconds_per_epoch`; seeds averaged; a log
  scale when they span more than 20x). Runs without timing are named under the axis."""
  runs = _runs(runs, labels)
  groups = _group_seeds(runs, aggregate_seeds)
  cells = [_mean_std([seconds_per_epoch(r, phase) for r in members]) for _, members in groups]
  keep = [i for i, (m, _, _) in enumerate(cells) if not math.isnan(m)]
  if not keep:
    raise ValueError("no timing in runs " + ", ".join(r.name for r in runs))
  dropped = [groups[i][0] for i in range(len(groups)) if i not in keep]
  means = [cells[i][0] for i in keep]
  errs = [cells[i][1] if cells[i][1] > 0 else math.nan for i in keep]
  log = min(means) > 0 and max(means) / min(means) > 20
  fig, (ax,) = _figure(1, width=max(6.0, 0.9 * len(keep) + 3), height=4.5)
  drawn = ax.bar(range(len(keep)), means, 0.6, color="C2", capsize=3,
                 yerr=errs if any(not math.isnan(e) for e in errs) else None)
  ax.bar_label(drawn, fmt="%.2f", fontsize=7, padding=2)
  _run_ticks(ax, [_label(groups[i][0], cells[i][2]) for i in keep])
  if log:
    ax.set_yscale("log")
  ax.set_ylabel("seconds per epoch" + (" (log scale)" if log else ""))
  ax.set_title("training speed by run: median seconds per epoch, validation included\n"
               + (f"({PHASE_TITLES.get(phase, phase)})" if phase else
                  "(each run's distillation, or only, phase)"), fontsize=10)
  ax.set_xlabel("run" + (f"\nno timing (not shown): {', '.join(dropped)}" if dropped else ""))
  ax.margins(y=0.15)
  ax.grid(alpha=0.3, axis="y", which="both")
  return _finish(fig, out)


def group_ks(run: Run, split: str = "test", model: str = "student",
             phase: Optional[str] = None) -> list[int]:
  """The K of the popularity-group metrics (`Recall@K/g0`) `model` has in `phase`."""
  phase = phase or run.main_phase()
  names = run.phase_metrics(phase, model, split) if phase else {}
  return sorted({_k_of(n) for n in names if re.fullmatch(r"Recall@\d+/g0", n)})


def popularity_groups(runs: Iterable[RunLike], k: Optional[int] = None, split: str = "test",
                      model: str = "student", phase: Optional[str] = None,
                      labels: Optional[Sequence[str]] = None, aggregate_seeds: bool = True,
                      out: Optional[str] = None) -> Figure:
  """Per popularity group (g0 the most popular items; groups of equal training interactions):
  `model`'s Recall@K over the held-out items in the group and the group's share of the top-K
  lists, one bar per run (seeds averaged). `k` defaults to 20 where present."""
  runs = _runs(runs, labels)
  with_groups = [r for r in runs if group_ks(r, split, model, phase)]
  if not with_groups:
    raise ValueError(f"no popularity-group metrics ({model}, {split}) in runs "
                     + ", ".join(r.name for r in runs))
  ks = set.intersection(*[set(group_ks(r, split, model, phase)) for r in with_groups])
  if k is None:
    if not ks:
      raise ValueError("the runs have no popularity-group K in common")
    k = 20 if 20 in ks else max(ks)
  num = 0
  for run in with_groups:
    names = run.phase_metrics(phase or run.main_phase(), model, split)
    num = max(num, len([n for n in names if n.startswith(f"Recall@{k}/g")]))
  if not num:
    raise ValueError(f"no Recall@{k}/g* in runs " + ", ".join(r.name for r in with_groups))
  groups = _group_seeds(with_groups, aggregate_seeds)
  fig, axes = _figure(2, width=max(5.0, 0.3 * num * len(groups) + 2.5), height=4.5)
  width = 0.8 / len(groups)
  infos = [(r.results.get("popularity_groups") or {}).get("items") for r in with_groups]
  items = infos[0] if all(i == infos[0] for i in infos) and infos[0] else []
  ticks = [f"g{g}" + (f"\n{items[g]} items" if g < len(items) else "")
           + ("\n(most popular)" if g == 0 else "\n(least popular)" if g == num - 1 else "")
           for g in range(num)]
  for ax, (stat, ylabel) in zip(axes, (
      ("Recall", f"{split} Recall@{k} within the group"),
      ("Share", f"share of the top-{k} lists in the group"))):
    for index, (name, members) in enumerate(groups):
      cells = []
      for g in range(num):
        cells.append(_mean_std([r.phase_metrics(phase or r.main_phase(), model, split)
                                .get(f"{stat}@{k}/g{g}") for r in members]))
      xs = [g + (index - (len(groups) - 1) / 2) * width for g in range(num)]
      errs = [s if s > 0 else math.nan for _, s, _ in cells]
      ax.bar(xs, [m for m, _, _ in cells], width, label=_label(name, max(c[2] for c in cells)),
             yerr=errs if any(not math.isnan(e) for e in errs) else None, capsize=2)
    ax.set_xticks(range(num), ticks, fontsize=8)
    ax.set_xlabel("item popularity group")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{stat}@{k} per popularity group ({model})", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
  axes[1].axhline(1.0 / num, color="grey", linestyle=":", linewidth=1,
                  label=f"1/{num} (equal shares)")
  axes[1].legend(fontsize=8)
  fig.suptitle(f"Popularity bias: {model}, {split} split, "
               + (PHASE_TITLES.get(phase, phase) if phase else "each run's main phase"))
  return _finish(fig, out)


# ----------------------------------------------------------------------------------------------
# iBD refreshes and the student-beats-teacher observation
# ----------------------------------------------------------------------------------------------

REFRESH_COUNTS = ("sampled", "corrected", "reselected", "boosted")
_COUNT_LABELS = {"sampled": "sampled last round", "corrected": "corrected (d <= delta)",
                 "reselected": "re-selected (still d > delta)", "boosted": "up-weighted"}
_COUNT_STYLES = ("o-", "s-", "^-", "x--")
_ARROWS = {"student": "teacher → student", "teacher": "student → teacher"}
DIRECTIONS = {"student": "teacher → student (items the teacher ranks higher)",
              "teacher": "student → teacher (items the student ranks higher)"}


def refresh_statistics(run: RunLike, phase: Optional[str] = None,
                       out: Optional[str] = None) -> Figure:
  """iBD's per-round statistics from the `refresh` lines: per direction, the items per user
  sampled in the previous round, how many of them were corrected (discrepancy <= delta),
  re-selected and up-weighted, and the mean rank discrepancy of the sampled items.

  When the refresh lines carry 'd_hist' (the counts of the sampled items' discrepancies in the
  bins of 'd_hist_edges'), a fourth panel shows that histogram at the last refresh,
  per direction, as a share of the sampled items. Rounds before the feedback starts (the shallow
  stage) are shaded."""
  run = _runs(run)[0]
  lines = run.refreshes(phase)
  if not lines:
    raise ValueError(f"{run.name}: no 'refresh' statistics in metrics.jsonl (iBD writes them)")
  lines = [r for r in lines if r["refresh"].get("round", 1)]  # round 0: no previous round
  if not lines:
    raise ValueError(f"{run.name}: only round 0 in the 'refresh' lines (no previous round yet)")
  rounds = [int(r["refresh"].get("round", i + 1)) for i, r in enumerate(lines)]
  hist = {d: lines[-1]["refresh"].get(d, {}).get("d_hist") for d in DIRECTIONS}
  hist = {d: h for d, h in hist.items() if h}
  fig, axes = _figure(4 if hist else 3, width=4.8, height=4.0)
  shallow = [x for x, r in zip(rounds, lines) if not r["refresh"].get("feedback", 1)]
  for ax in axes:
    if shallow:
      ax.axvspan(min(shallow) - 0.5, max(shallow) + 0.5, color="grey", alpha=0.15,
                 label="shallow stage (plain BD)")
  for ax, direction in zip(axes, DIRECTIONS):
    for index, count in enumerate(REFRESH_COUNTS):
      values = [r["refresh"].get(direction, {}).get(count) for r in lines]
      points = [(x, v) for x, v in zip(rounds, values) if v is not None]
      if points:
        ax.plot(*zip(*points), _COUNT_STYLES[index], markersize=5, color=f"C{index}",
                label=_COUNT_LABELS[count])
    ax.set_title(DIRECTIONS[direction], fontsize=9)
    ax.set_xlabel("round (refresh period)")
    ax.set_ylabel("items per user (mean over users)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if hist:
    _discrepancy_histogram(axes[3], hist, lines[-1]["refresh"]["d_hist_edges"], rounds[-1])
  ax = axes[2]
  for direction in DIRECTIONS:
    for key, style in (("mean_d", "o-"), ("mean_d_prev", "s--")):
      points = [(x, r["refresh"].get(direction, {}).get(key)) for x, r in zip(rounds, lines)]
      points = [(x, v) for x, v in points if v is not None]
      if points:
        ax.plot(*zip(*points), style, markersize=4, color=COLORS[direction],
                label=_ARROWS[direction] + (", at the refresh" if key == "mean_d"
                                            else ", when sampled"))
  ax.axhline(0.0, color="black", linewidth=0.8)
  from matplotlib.ticker import MaxNLocator
  for each in axes:
    each.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_title("mean rank discrepancy of the sampled items", fontsize=9)
  ax.set_xlabel("round (refresh period)")
  ax.set_ylabel("learner's rank − guide's rank (positions)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.suptitle(f"{run.name}: iBD refresh statistics per round", fontsize=11)
  return _finish(fig, out)


def _discrepancy_histogram(ax, hist: dict, edges, round_: int) -> None:
  """Bars of the sampled items' discrepancy histogram (shares per bin), one colour a direction;
  `edges`: the inner bin edges (the outer bins are open)."""
  edges = ("-inf", *[int(e) for e in edges], "inf")
  labels = [f"[{lo}, {hi})" for lo, hi in zip(edges[:-1], edges[1:])]
  x = np.arange(len(labels))
  width = 0.8 / max(len(hist), 1)
  for i, (direction, counts) in enumerate(hist.items()):
    counts = np.asarray(counts, np.float64)
    share = counts / counts.sum() if counts.sum() else counts
    ax.bar(x + (i - (len(hist) - 1) / 2) * width, share, width, color=COLORS[direction],
           label=_ARROWS[direction])
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
  ax.set_title(f"discrepancy of the items sampled in round {round_ - 1}, at round {round_}",
               fontsize=9)
  ax.set_xlabel("learner's rank − guide's rank (positions)")
  ax.set_ylabel("share of the sampled items")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)


def beats_records(run: Run) -> dict:
  """{phase: the phase's 'student_beats_teacher' record} (results.json, else the final lines)."""
  found = {}
  for phase in run.phases():
    record = run.phase_info(phase).get("student_beats_teacher")
    if record:
      found[phase] = record
  return found


def _range_label(lo: int, hi: int, last: bool) -> str:
  """An activity bin [lo, hi) (the last one [lo, hi]) as `lo–top`, in interactions."""
  top = hi if last else hi - 1
  return f"{lo}" if top <= lo else f"{lo}–{top}"


def student_beats_teacher(run: RunLike, phases: Optional[Sequence[str]] = None,
                          out: Optional[str] = None) -> Figure:
  """BD's motivating observation, measured: per user-activity bin (training interactions), the
  share of test users whose held-out item the student ranks strictly above the teacher, one bar
  per phase; the dashed lines are each phase's share over all users."""
  run = _runs(run)[0]
  records = beats_records(run)
  if phases:
    records = {p: records[p] for p in phases if p in records}
  if not records:
    raise ValueError(f"{run.name}: no 'student_beats_teacher' in results.json (phases that "
                     "evaluate both models record it)")
  ranges = []
  for record in records.values():
    for b in record.get("by_activity", []):
      if tuple(b["range"]) not in ranges:
        ranges.append(tuple(b["range"]))
  ranges.sort()
  users = {}
  for record in records.values():
    for b in record.get("by_activity", []):
      users.setdefault(tuple(b["range"]), b.get("users"))
  fig, (ax,) = _figure(1, width=max(6.0, 1.4 * len(ranges) + 2), height=4.5)
  width = 0.8 / len(records)
  top = 0.0
  for index, (phase, record) in enumerate(records.items()):
    color = f"C{PHASES.index(phase) + 2 if phase in PHASES else index + 2}"
    shares = {tuple(b["range"]): b["share"] for b in record.get("by_activity", [])}
    xs = [i + (index - (len(records) - 1) / 2) * width for i in range(len(ranges))]
    values = [shares.get(r, math.nan) for r in ranges]
    drawn = ax.bar(xs, values, width, color=color,
                   label=f"after {PHASE_TITLES.get(phase, phase)}")
    ax.bar_label(drawn, fmt="%.2f", fontsize=7, padding=2)
    overall = record.get("overall")
    if overall is not None:
      ax.axhline(overall, color=color, linestyle="--", linewidth=1.2,
                 label=f"all users, after {PHASE_TITLES.get(phase, phase)}: {overall:.3f}")
      top = max(top, overall)
    top = max([top] + [v for v in values if not math.isnan(v)])
  ticks = [_range_label(lo, hi, i == len(ranges) - 1)
           + (f"\n{users[(lo, hi)]} users" if users.get((lo, hi)) is not None else "")
           for i, (lo, hi) in enumerate(ranges)]
  ax.set_xticks(range(len(ranges)), ticks, fontsize=8)
  ax.set_xlabel("user activity (training interactions)")
  ax.set_ylabel("share of test users")
  ax.set_ylim(0, min(1.0, max(top * 1.3, 0.05)))
  ax.set_title(f"{run.name}: test users for whom the student ranks the held-out item\n"
               "strictly above the teacher (best held-out rank), by user activity", fontsize=10)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)
  return _finish(fig, out)


# ----------------------------------------------------------------------------------------------
# tables (markdown, for notebooks and READMEs; pandas is not a dependency)
# ----------------------------------------------------------------------------------------------

def _fmt(value: Optional[float]) -> str:
  """A table cell: 4 decimals, or a dash for a missing value."""
  return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
      else f"{value:.4f}"


def phase_table(run: RunLike, metrics: Optional[Sequence[str]] = None, split: str = "test",
                models: Sequence[str] = MODELS) -> str:
  """Markdown: one row per model, one column per finished phase (after warm-up, after
  distillation, control), cells `metric1 / metric2 ...` on `split` (default HR@50 / NDCG@50
  where the run has them, else the default metric)."""
  run = _runs(run)[0]
  names = _metric_names(run)
  if metrics is None:
    metrics = [m for m in ("HR@50", "NDCG@50") if m in names] or [default_metric(run)]
  phases = [p for p in run.phases() if p in run.results.get("phases", {})]
  if not phases:
    raise ValueError(f"{run.name}: no finished phase in results.json")
  heads = {"warmup": "after warm-up", "distill": f"after {run.method_label or 'distillation'}",
           "control": "control (no distillation)"}
  lines = [f"| model ({split} {' / '.join(metrics)}) | "
           + " | ".join(heads.get(p, p) for p in phases) + " |",
           "|---" * (len(phases) + 1) + "|"]
  for model in models:
    cells = []
    for phase in phases:
      values = run.phase_metrics(phase, model, split)
      cells.append(" / ".join(_fmt(values.get(m)) for m in metrics) if values else "—")
    if any(c != "—" for c in cells):
      lines.append(f"| {model} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def runs_table(runs: Iterable[RunLike], metrics: Optional[Sequence[str]] = None,
               split: str = "test", model: str = "student", phase: Optional[str] = None,
               labels: Optional[Sequence[str]] = None) -> str:
  """Markdown: one row per run, `model`'s `split` metrics at the end of `phase` (default: each
  run's main phase; a teacher-only run shows its teacher), epochs, best epoch and seconds per
  epoch."""
  runs = _runs(runs, labels)
  if metrics is None:
    common = set.intersection(*[_metric_names(r) for r in runs])
    metrics = [m for m in ("Recall@10", "NDCG@10", "Recall@20", "NDCG@20") if m in common] \
        or [default_metric(runs)]
  lines = ["| run | model | " + " | ".join(f"{split} {m}" for m in metrics)
           + " | epochs | best epoch | s/epoch |",
           "|---" * (len(metrics) + 5) + "|"]
  for run in runs:
    ph = phase or run.main_phase()
    shown = model
    values = run.phase_metrics(ph, model, split) if ph else {}
    if not values and ph:
      others = [m for m in MODELS if run.phase_metrics(ph, m, split)]
      shown = others[0] if others else model
      values = run.phase_metrics(ph, shown, split)
    info = run.phase_info(ph) if ph else {}
    sec = seconds_per_epoch(run, ph) if ph else None
    lines.append(f"| {run.name} | {shown} | " + " | ".join(_fmt(values.get(m)) for m in metrics)
                 + f" | {info.get('epochs', '—')} | {info.get('best_epoch', '—')} | "
                 + (f"{sec:.2f}" if sec is not None else "—") + " |")
  return "\n".join(lines)
