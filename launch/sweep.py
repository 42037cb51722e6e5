r"""Runs a protocol's arms and seeds one after another, each in its own workdir; resumable.

  python -m launch.sweep --config configs/ibd_citeulike.py --root runs/ibd
  python -m launch.sweep --config configs/kd_citeulike.py --arms rrd,dcd --seeds 0,1,2 \
      --root runs/kd
  python -m launch.sweep --config configs/kd_citeulike.py --quick --root /tmp/kd_quick
  python -m launch.sweep --config configs/td_citeulike.py --root runs/td --dry_run   # the plan

What a protocol runs lives in its config file: `sweep_arms(quick)` returns the arms, each a dict

  id      'rrd', 'bpr:b1', 'ftd:10', ... (parts separated by ':')
  config  the config file and argument, e.g. 'configs/kd_citeulike.py:rrd' (',quick' included
          when `quick`)
  folder  the workdir's name under --root, with '{seed}' for arms run once per seed, e.g.
          'rrd_s{seed}' (the names `benchmarks.kd_table` reads)
  seeds   the seeds it runs by default (arms with '{seed}' in their folder)
  set     config overrides {dotted key: value}, e.g. {'distill.patience': 100}
  fixed   overrides the user's --set does not change: what makes the run what it is (a teacher's
          or a shared warm-up's {'distill.epochs': 0})
  needs   {config key: arm id}: the key is set to that arm's workdir, which runs first (added to
          the sweep when not selected), e.g. {'teacher_init': 'teacher'}
  default False: run only when --arms names it (e.g. a run too slow for the recorded sweep)

--arms takes arm ids or parts of them, comma-separated: `rrd` (kd), `bpr` (every BPR-MF arm of
iBD), `b1` (the beta = 1 arm of every model), `bpr:b1` (one arm), `10` (every d = 10 student of
the topology protocol). Default: every arm with `default` unset. --seeds replaces the seeds of
every seeded arm.

Overrides: `--set key=value` (repeatable; `--config.key=value` alike) reaches every run, the
teachers and warm-ups it needs included; `--set <arm>:key=value` only the runs of that arm (an id
or part, as in --arms), e.g. `--set ml1m:data.path=~/data/ml-1m.inter`. They apply after the arm's
own `set` (not its `fixed`). The seed is the sweep's (--seeds), not an override.

Each run is `python -m launch.train --config <config> --workdir <root>/<folder> --config.<key>=...`
in a subprocess, its output appended to `<workdir>/train.log`: a crash (or an out-of-memory kill)
of one run is reported with the end of its log, the runs that need it are skipped, and the sweep
goes on; separate processes also free each run's device memory and compilation caches. A run
whose results.json already holds every phase its config schedules is skipped; any other is run
by the same command, which resumes its workdir from the last checkpoint (and refuses a workdir
whose recorded config differs). A run that others need (a teacher, a shared warm-up) is not run
when every run of the sweep that needs it is already finished, unless --arms names it. The
summary lists each run as finished, skipped (finished before), not needed, failed, unfinished
(stopped by max_epochs_per_run) or blocked (a run it needs did not finish); the exit status is 0
only when every run is finished, skipped or not needed.
"""
from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # the config modules import `configs` and `kdrec_jax`
  sys.path.insert(0, REPO_ROOT)

from launch.flags_util import RUN_KEYS  # noqa: E402

ARM_KEYS = ("id", "config", "folder", "seeds", "set", "fixed", "needs", "default")


@dataclasses.dataclass
class Run:
  """One workdir of the sweep: an arm at a seed (None for arms run once)."""
  name: str                 # the folder under --root
  arm: dict
  seed: int | None
  workdir: str
  overrides: dict           # dotted key -> value (Python value, or the user's text)
  needs: list               # names of the runs that must finish first
  config: object = None     # the resolved ConfigDict (overrides applied)
  named: bool = False       # selected by --arms (not only needed by a selected run)
  seeds: tuple = ()         # --vmap_seeds: the seeds run as one program, in <workdir>/s<seed>


def resolve_path(path: str) -> str:
  """`path` as given when it exists, else relative to the repository root."""
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
    return os.path.join(REPO_ROOT, path)
  return path


def load_module(path: str):
  """The config file at `path` as a module."""
  path = resolve_path(path)
  if not os.path.isfile(path):
    raise SystemExit(f"error: config file {path!r} does not exist")
  name = "_sweep_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def protocol_arms(module, quick: bool) -> list[dict]:
  """The module's `sweep_arms(quick)`, checked."""
  if not hasattr(module, "sweep_arms"):
    raise SystemExit(f"error: {module.__file__} has no sweep_arms(): not a protocol config")
  arms = module.sweep_arms(quick)
  ids = [a["id"] for a in arms]
  dup = [i for i, n in collections.Counter(ids).items() if n > 1]
  if dup:
    raise SystemExit(f"error: sweep_arms(): arm ids {dup} repeat")
  for a in arms:
    unknown = set(a) - set(ARM_KEYS)
    missing = {"id", "config", "folder"} - set(a)
    bad_need = [n for n in a.get("needs", {}).values() if n not in ids]
    if unknown or missing or bad_need:
      raise SystemExit(f"error: sweep_arms(): arm {a.get('id')!r}: unknown keys {sorted(unknown)}"
                       f", missing {sorted(missing)}, needs unknown arms {bad_need}")
  return arms


def matches(selector: str, arm_id: str) -> bool:
  """Whether an --arms / --set selector names the arm: its id, or some of its ':' parts."""
  parts = arm_id.split(":")
  return selector == arm_id or all(p in parts for p in selector.split(":"))


def select(arms: list[dict], selectors: list[str] | None) -> list[dict]:
  if not selectors:
    return [a for a in arms if a.get("default", True)]
  chosen = []
  for s in selectors:
    hit = [a for a in arms if matches(s, a["id"])]
    if not hit:
      raise SystemExit(f"error: --arms {s!r} names no arm; arms: "
                       f"{', '.join(a['id'] for a in arms)}")
    chosen += [a for a in hit if a not in chosen]
  return [a for a in arms if a in chosen]  # in the protocol's order


def parse_overrides(texts: list[str]) -> list[tuple[str | None, str, str]]:
  """[(selector or None, dotted key, value text)] from 'key=value' / '<arm>:key=value'."""
  out = []
  for text in texts:
    lhs, eq, value = text.partition("=")
    if not eq or not lhs:
      raise SystemExit(f"error: --set {text!r}: expected key=value or <arm>:key=value")
    selector, _, key = lhs.rpartition(":")
    if key == "seed":
      raise SystemExit("error: the seed is the sweep's: use --seeds, not --set seed=...")
    out.append((selector or None, key, value))
  return out


def _parse_value(current, text: str):
  """The override text as the type of the config's current value (as config_flags does)."""
  if isinstance(current, bool):
    if text.strip().lower() in ("true", "1", "yes"):
      return True
    if text.strip().lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected True or False, got {text!r}")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config, key: str, value, where: str):
  """Sets the dotted `key` of `config` (user text parsed to the current value's type)."""
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if not hasattr(node, "keys") or p not in node:
      raise SystemExit(f"error: {where}: unknown config key {key!r}")
    node = node[p]
  if leaf not in node:
    if key in RUN_KEYS:  # run-control keys a config need not declare (launch.train adds them)
      return
    raise SystemExit(f"error: {where}: unknown config key {key!r}")
  if isinstance(value, str) and not isinstance(node[leaf], str):
    try:
      value = _parse_value(node[leaf], value)
    except ValueError as e:
      raise SystemExit(f"error: {where}: {key}={value}: {e}") from None
  with node.ignore_type():
    node[leaf] = value


def scheduled_phases(config) -> list[str]:
  """The phases `launch.train` runs for `config` (the schedule of kdrec_jax.train)."""
  phases = ["warmup"]
  if config.distill.epochs:
    phases.append("distill")
    if config.get("control", False):
      phases.append("control")
  return phases


def finished(run: Run) -> bool:
  """Whether the run's results.json holds every phase its config schedules (every seed's, for
  seeds run as one program)."""
  if run.seeds:
    return all(finished(dataclasses.replace(run, seeds=(), workdir=os.path.join(
        run.workdir, f"s{s}"))) for s in run.seeds)
  path = os.path.join(run.workdir, "results.json")
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      phases = json.load(f).get("phases", {})
  except (OSError, ValueError):
    return False
  return all(p in phases for p in scheduled_phases(run.config))


def plan(module, root: str, selectors=None, seeds=None, overrides=(), quick=False,
         vmap_seeds=False) -> list[Run]:
  """The runs of a sweep in order (what a run needs comes first), configs resolved. With
  `vmap_seeds`, each seeded arm's seeds are one run (`--config.runs.seeds`, kdrec_jax.runs) in
  the folder named without its seed, each seed's results in its `s<seed>` sub-folder."""
  arms = protocol_arms(module, quick)
  by_id = {a["id"]: a for a in arms}
  chosen = select(arms, selectors)
  named = [a["id"] for a in chosen] if selectors else []
  for a in list(chosen):  # what the chosen arms need, transitively, runs too
    for need in a.get("needs", {}).values():
      if by_id[need] not in chosen:
        chosen.append(by_id[need])
  chosen = [a for a in arms if a in chosen]
  for a in chosen:
    if "{seed}" in a["folder"] and not (seeds or a.get("seeds")):
      raise SystemExit(f"error: arm {a['id']!r} runs per seed but has no seeds: pass --seeds")
    if any("{seed}" in by_id[n]["folder"] for n in a.get("needs", {}).values()):
      raise SystemExit(f"error: arm {a['id']!r} needs a per-seed arm")
  user = parse_overrides(list(overrides))
  for selector, _, _ in user:
    if selector and not any(matches(selector, a["id"]) for a in arms):
      raise SystemExit(f"error: --set {selector}:...: names no arm")

  modules = {}  # config file -> module, loaded once

  def folder(arm, seed):
    return arm["folder"].format(seed=seed)

  def make(arm, seed):
    name = folder(arm, seed)
    values = dict(arm.get("set", {}))
    for key, need in arm.get("needs", {}).items():
      values[key] = os.path.join(root, folder(by_id[need], None))
    if seed is not None:
      values["seed"] = seed
    for selector, key, value in user:
      if selector is None or matches(selector, arm["id"]):
        values.pop(key, None)  # re-inserted last: the user's value wins and comes last
        values[key] = value
    for key, value in arm.get("fixed", {}).items():
      values.pop(key, None)
      values[key] = value
    path, _, arg = arm["config"].partition(":")
    if path not in modules:
      modules[path] = load_module(path)
    config = modules[path].get_config(arg)
    for key, value in values.items():
      apply_override(config, key, value, f"arm {arm['id']}")
    return Run(name, arm, seed, os.path.join(root, name), values,
               [folder(by_id[n], None) for n in arm.get("needs", {}).values()], config,
               arm["id"] in named)

  once = [make(a, None) for a in chosen if "{seed}" not in a["folder"]]
  per_seed = [a for a in chosen if "{seed}" in a["folder"]]
  all_seeds = sorted({s for a in per_seed for s in (seeds or a["seeds"])})
  if vmap_seeds:
    runs = once + [_as_one_program(make(a, None), tuple(seeds or a["seeds"]), root)
                   for a in per_seed]
  else:
    runs = once + [make(a, s) for s in all_seeds for a in per_seed
                   if s in (seeds or a["seeds"])]
  names = [r.name for r in runs]
  dup = [n for n, k in collections.Counter(names).items() if k > 1]
  if dup:
    raise SystemExit(f"error: sweep_arms(): folders {dup} repeat")
  return runs


def _as_one_program(run: Run, seeds: tuple, root: str) -> Run:
  """A seeded arm's seeds as one run: the folder without its seed, `runs.seeds` set."""
  name = run.arm["folder"].replace("_s{seed}", "").replace("{seed}", "")
  overrides = dict(run.overrides, **{"runs.seeds": ",".join(str(s) for s in seeds)})
  return dataclasses.replace(run, name=name, workdir=os.path.join(root, name),
                             overrides=overrides, seeds=seeds)


def _flag_value(value) -> str:
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def command(run: Run) -> list[str]:
  """The `launch.train` command line of a run."""
  path, colon, arg = run.arm["config"].partition(":")
  spec = resolve_path(path) + (colon + arg if colon else "")
  return ([sys.executable, "-m", "launch.train", f"--config={spec}", f"--workdir={run.workdir}"]
          + [f"--config.{k}={_flag_value(v)}" for k, v in run.overrides.items()])


def run_subprocess(run: Run) -> int:
  """Runs `command(run)`, its output appended to <workdir>/train.log; the exit status."""
  os.makedirs(run.workdir, exist_ok=True)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  with open(os.path.join(run.workdir, "train.log"), "a") as log:
    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command(run))}\n")
    log.flush()
    return subprocess.run(command(run), stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def execute(runs: list[Run], runner=run_subprocess, out=sys.stdout) -> dict:
  """Runs the runs in order; {name: status}. `runner(run)` returns an exit status."""
  status = {}
  dependents = {r.name: [d for d in runs if r.name in d.needs] for r in runs}
  for i, run in enumerate(runs, 1):
    head = f"[{i}/{len(runs)}] {run.name}"
    if finished(run):
      status[run.name] = "skipped"
      print(f"{head}: finished before, skipped", file=out)
      continue
    if not run.named and dependents[run.name] and all(map(finished, dependents[run.name])):
      status[run.name] = "not needed"  # e.g. a warm-up whose runs are all finished (archives)
      print(f"{head}: not needed (every run that needs it is finished), skipped", file=out)
      continue
    blocked = [n for n in run.needs if status.get(n) not in ("finished", "skipped")]
    if blocked:
      status[run.name] = "blocked"
      print(f"{head}: blocked ({', '.join(blocked)} did not finish)", file=out)
      continue
    print(f"{head}: running ({os.path.join(run.workdir, 'train.log')})", file=out, flush=True)
    start = time.time()
    try:
      rc = runner(run)
    except KeyboardInterrupt:
      status[run.name] = "interrupted"
      print(f"{head}: interrupted", file=out)
      break
    took = f"{(time.time() - start) / 60:.1f} min"
    if finished(run):
      status[run.name] = "finished"
      print(f"{head}: finished in {took}", file=out)
    elif rc:
      status[run.name] = "failed"
      print(f"{head}: FAILED (exit {rc}) after {took}; the end of its log:\n"
            + _tail(os.path.join(run.workdir, "train.log")), file=out)
    else:
      status[run.name] = "unfinished"
      print(f"{head}: stopped unfinished after {took} (rerun to resume)", file=out)
  for run in runs[len(status):]:
    status[run.name] = "not run"
  return status


def summary(status: dict) -> str:
  counts = collections.Counter(status.values())
  order = ("finished", "skipped", "not needed", "failed", "unfinished", "blocked", "interrupted",
           "not run")
  lines = ["sweep: " + ", ".join(f"{counts[k]} {k}" for k in order if counts[k])]
  for key in order[3:]:
    names = [n for n, s in status.items() if s == key]
    if names:
      lines.append(f"  {key}: {', '.join(names)}")
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m launch.sweep", allow_abbrev=False,
      description="Runs a protocol's arms x seeds, one workdir each, resumable (see the module "
                  "docstring).")
  parser.add_argument("--config", required=True, help="A protocol config with sweep_arms().")
  parser.add_argument("--root", required=True, help="Folder of the run folders.")
  parser.add_argument("--arms", default="", help="Comma-separated arm ids or parts of them "
                      "(default: the protocol's arms).")
  parser.add_argument("--seeds", default="", help="Comma-separated seeds for the seeded arms "
                      "(default: each arm's).")
  parser.add_argument("--set", action="append", default=[], metavar="[ARM:]KEY=VALUE",
                      help="A config override (repeatable).")
  parser.add_argument("--quick", action="store_true", help="Each arm's ',quick' config.")
  parser.add_argument("--vmap_seeds", action="store_true", help="Each seeded arm's seeds as "
                      "one vmapped program (kdrec_jax.runs), in <folder>/s<seed>.")
  parser.add_argument("--dry_run", action="store_true", help="Print the plan; run nothing.")
  args, rest = parser.parse_known_args(argv)
  for extra in rest:  # ml_collections-style overrides, as launch.train takes them
    if extra.startswith("--config.") and "=" in extra:
      args.set.append(extra[len("--config."):])
    else:
      parser.error(f"unrecognized argument {extra!r}")
  return args


def main(argv=None, runner=run_subprocess, out=sys.stdout) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or None
  except ValueError:
    raise SystemExit(f"error: --seeds {args.seeds!r}: expected comma-separated integers") from None
  runs = plan(load_module(args.config.partition(":")[0]), args.root,
              [s for s in args.arms.split(",") if s.strip()] or None, seeds, args.set,
              args.quick, args.vmap_seeds)
  if args.dry_run:
    for run in runs:
      state = "finished" if finished(run) else "to run"
      print(f"{run.name} ({state}): {' '.join(command(run)[1:])}", file=out)
    return 0
  status = execute(runs, runner, out)
  print(summary(status), file=out)
  return 0 if all(s in ("finished", "skipped", "not needed") for s in status.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
