"""Several runs as one compiled program: seeds and hyperparameter grids on a leading run axis.

`config.runs.seeds` (e.g. (0, 1, 2)) and `config.runs.grid`, nested as the config ({'method':
{'lambda_kd': (0.1, 0.5)}}, on the command line `--config.runs.grid.method.lambda_kd=0.1,0.5`),
ask for the runs of their product. Runs that differ only in their seed and in the method's traced
hyperparameters (`Method.hparams`) share every shape, so they train as one program: the
learners' params and optimizer states, the per-refresh state, the keys (hence each run's data
order and draws) and the traced hyperparameters carry a leading axis of size N, and
`jax.vmap` runs them together; the frozen teachers, their prepared lists and the data are shared,
not copied N times. Grid values of other keys (a list size, a model's width) change the program,
so their runs form groups trained one after another in the same process. Each run stops at its
own patience; from then on the program trains and refreshes only the runs still going (their
slice of the stacked state, written back in place; the epoch and refresh compile once more per
number of live runs), so a stopped run costs no more epochs (its state stays in memory and in the
checkpoints).

Each run writes the folder of a single run (`results.json`, `metrics.jsonl`, `config.json`) under
the workdir, named `s<seed>` or `<key><value>_..._s<seed>`; the group's checkpoints hold the
stacked state, so a killed sweep resumes as a single run does.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import schedule
from kdrec_jax.progress import duration


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a multi-run workdir: its folder name, seed and grid values."""
  name: str
  seed: int
  values: tuple  # ((dotted key, value), ...)


def requested(config) -> bool:
  """Whether `config` asks for several runs (`config.runs` with seeds or a grid)."""
  runs = config.get("runs", None)
  return bool(runs) and bool(runs.get("seeds", ()) or runs.get("grid", {}))


def _short(key: str, value) -> str:
  text = f"{key.rsplit('.', 1)[-1]}{value}"
  return re.sub(r"[^A-Za-z0-9._=-]", "", text)


def expand(config) -> list[Run]:
  """The runs `config.runs` asks for: every grid combination (in key order) times every seed."""
  runs = config.runs
  seeds = tuple(int(s) for s in (runs.get("seeds", ()) or (config.seed,)))
  grid = _flat_grid(runs.get("grid", {}) or {})
  keys = sorted(grid)
  for k in keys:
    get(config, k)  # a clear error for a key the config does not have
  out = []
  for combo in itertools.product(*(tuple(grid[k]) for k in keys)):
    values = tuple(zip(keys, combo))
    prefix = "_".join(_short(k, v) for k, v in values)
    for seed in seeds:
      out.append(Run(name=f"{prefix}_s{seed}" if prefix else f"s{seed}", seed=seed,
                     values=values))
  if len({r.name for r in out}) != len(out):
    raise ValueError(f"runs: the run names repeat ({[r.name for r in out]})")
  return out


def _flat_grid(grid, prefix: str = "") -> dict:
  """{dotted key: values} of a grid nested as the config ({'method': {'lambda_kd': (...)}})."""
  out = {}
  for k, v in (grid.items() if hasattr(grid, "items") else ()):
    if hasattr(v, "items"):
      out.update(_flat_grid(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = tuple(v)
  return out


def get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise ValueError(f"runs.grid: the config has no key {dotted!r}")
    node = node[part]
  return node


def run_config(config, run: Run):
  """The single run's config: its seed and grid values set, `runs` removed."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if "runs" in c:
      del c["runs"]
    c.seed = run.seed
    for key, value in run.values:
      *parents, leaf = key.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  return c


def groups(config, runs: list[Run], traced: set[str]) -> list[list[Run]]:
  """The runs in groups that share one program: equal values of every grid key outside
  `traced` (the dotted keys whose values reach the step as traced data), in first-seen order."""
  out: dict[tuple, list[Run]] = {}
  for run in runs:
    static = tuple((k, v) for k, v in run.values if k not in traced)
    out.setdefault(static, []).append(run)
  return list(out.values())


def traced_keys(method) -> set[str]:
  """The config keys a grid may vary inside one program: the method's traced hyperparameters."""
  return {f"method.{k}" for k in method.hparams}


def stack(trees: list):
  """The trees stacked on a new leading axis (leaf by leaf)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def take(tree, axes, i: int):
  """Run i of a stacked tree: leaves with axis 0 indexed, leaves with axis None as they are
  (`axes` a prefix of `tree`)."""
  return jax.tree.map(lambda a, x: x if a is None else jax.tree.map(lambda y: y[i], x), axes,
                      tree, is_leaf=lambda a: a is None)


# Rows `idx` of every leaf of `full` set from `sub`, in place: `full` is donated.
_set_rows = jax.jit(lambda full, idx, sub: jax.tree.map(lambda u, v: u.at[idx].set(v), full, sub),
                    donate_argnums=0)


def put(tree, axes, idx, sub):
  """`tree` with the runs `idx` [k] replaced by `sub` (those k runs, stacked): the inverse of
  `take(tree, axes, idx)`. The runs' own leaves of `tree` are donated (updated in place: do not
  use `tree` afterwards); leaves with axis None (shared by the runs) come from `sub`, as a step
  that donated its input returns them as new buffers."""
  is_leaf = lambda a: a is None  # noqa: E731
  runs_part = lambda t: jax.tree.map(  # noqa: E731
      lambda a, x: None if a is None else x, axes, t, is_leaf=is_leaf)
  merged = _set_rows(runs_part(tree), idx, runs_part(sub))
  return jax.tree.map(lambda a, x, y: y if a is None else x, axes, merged, sub, is_leaf=is_leaf)


def _scatter(tree, idx, n: int, into=None):
  """Per-run outputs `tree` of the runs `idx` [k] spread to all n runs: into `into` (a tree of
  n runs, donated) where it has their structure, else zeros for the others (e.g. a refresh's
  first cache after a resume)."""
  if into is None or jax.tree.structure(into) != jax.tree.structure(tree):
    into = jax.tree.map(lambda x: jnp.zeros((n, *x.shape[1:]), x.dtype), tree)
  return put(into, 0, idx, tree)


def keys_for(seeds) -> jax.Array:
  """The runs' root keys, stacked: run r's key is `jax.random.key(seed_r)`, a single run's."""
  return jnp.stack([jax.random.key(int(s)) for s in seeds])


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def check_fits(per_run_bytes: int, n: int, available_mb: float, budget_mb: float) -> None:
  """Refuses (ValueError) N runs whose per-run state does not fit in `budget_mb` and half the
  memory available."""
  need = per_run_bytes * n / 2**20
  limit = min(float(budget_mb), available_mb / 2)
  if need > limit:
    raise ValueError(
        f"runs: {n} runs need about {need:.0f} MiB of per-run state ({per_run_bytes / 2**20:.1f} "
        f"MiB each: the learners' params and optimizer states and the per-refresh state), more "
        f"than {limit:.0f} MiB (runs.budget_mb, or half the memory available); run fewer at a "
        "time (fewer seeds or grid values) or raise runs.budget_mb")



# ---------------------------------------------------------------------------------------------
# A phase of N runs: the program, its early stopping and its loop.
# ---------------------------------------------------------------------------------------------

def state_axes(params_keys, phase, shared: set, static_shared: bool):
  """The vmap axes of a stacked `TrainState`: the run axis (0) everywhere but on the params of
  shared models that do not learn in this phase (a loaded, frozen teacher) and, when they only
  come from shared models, the method's constants."""
  from kdrec_jax.step import TrainState
  params = {m: None if (m in shared and m not in phase.train) else 0 for m in params_keys}
  return TrainState(step=0, epoch=0, params=params, opt=0, hparams=0,
                    static=None if static_shared else 0, cache=0, carry=0, snapshot=0)


def _vmap_fold_in(keys, data):
  return jax.vmap(jax.random.fold_in, (0, None))(keys, data)


class RunsProgram:
  """A phase of N runs as one program: `schedule.PhaseProgram`'s pieces with a run axis.

  program: the single-run `PhaseProgram` of the group's first run (its step, mesh, optimizers);
  keys: the runs' root keys [N]; hparams: {name: [N]} the runs' traced hyperparameters; shared:
  the models whose params are shared by every run (loaded from outside the workdir)."""

  def __init__(self, program, keys, hparams: dict, shared: set):
    from kdrec_jax.step import make_epoch
    self.base, self.exp, self.phase = program, program.exp, program.phase
    self.method, self.optimizers, self.mesh = program.method, program.optimizers, program.mesh
    self.keys, self.hparams, self.shared = keys, hparams, set(shared)
    self.num_runs = int(keys.shape[0])
    frozen_shared = all(m in self.shared for m in self._frozen_models())
    has_method = self.phase.distill and self.method.init is not None
    names = ("teacher", "student") + (("method",) if has_method else ())
    self.axes = state_axes(names, self.phase, self.shared, frozen_shared)
    self.epoch, self.steps = make_epoch(program.step, program.mesh, self.exp.num_examples,
                                        self.exp.config.batch_size, run_axes=self.axes)
    self._prepare = jax.jit(jax.vmap(self.method.prepare)) if (
        self.method.prepare and not frozen_shared) else None
    self._refresh = None
    # The runs still training (set by the loop from the early stopping; None: all). A run that
    # has stopped keeps its state and is left out of the epochs and refreshes that follow.
    self.live = None

  def _live(self):
    """The indices of the live runs when some have stopped, else None."""
    if self.live is None or np.all(self.live):
      return None
    return jnp.asarray(np.flatnonzero(self.live))

  def _frozen_models(self):
    return [m for m in ("teacher", "student") if m not in self.phase.train]

  @property
  def uses_refresh(self) -> bool:
    return self.base.uses_refresh

  def initial_state(self, starts=None, frozen=None):
    """The N runs' starting state (see `PhaseProgram.initial_state`): fresh params from each
    run's key; `starts` ({model: params}, stacked for per-run models, one copy for the shared
    ones, broadcast to every run where they learn)."""
    from kdrec_jax.step import init_state
    exp, n = self.exp, self.num_runs
    method = self.method if self.phase.distill else None
    state = jax.vmap(lambda k: init_state(k, exp.models, {}, method))(self.keys)
    params = dict(state.params)
    for m, p in (starts or {}).items():
      if m in self.shared and m in self.phase.train:  # one start, N runs learning from it
        p = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), p)
      params[m] = jax.tree.map(jnp.array, p)
    opt = {x: jax.vmap(o.init)(params[x]) for x, o in self.optimizers.items()}
    state = state.replace(params=params, opt=opt)
    if self.phase.distill:
      frozen = {"teacher": params["teacher"], **(frozen or {})}
      from kdrec_jax import ranking
      if self._prepare is None:
        static = exp.prepare(frozen)
      else:
        with ranking.x64():
          static = self._prepare(frozen)
      state = state.replace(hparams=self.hparams, static=static)
    if self.uses_refresh and self.method.refresh_every != 1:
      state = state.replace(snapshot=self._snapshot(state))
    return state

  def _snapshot(self, state, copy: bool = False):
    f = (lambda t: jax.tree.map(jnp.copy, t)) if copy else (lambda t: t)
    snap = {m: f(state.params[m]) for m in self.method.refresh_reads if m in self.phase.train}
    if state.carry:
      snap["carry"] = f(state.carry)
    return snap

  def refresh(self, state, keys, epoch: int, resume: bool = False):
    """`PhaseProgram.refresh` for every run (`keys`: the runs' refresh keys [N])."""
    from kdrec_jax import ranking
    if resume:
      snap = state.snapshot
    else:
      snap = self._snapshot(state, copy=True)
      state = state.replace(snapshot=snap if self.method.refresh_every != 1 else {})
    reads = self.method.refresh_reads
    params = {m: snap[m] if m in snap else state.params[m] for m in reads}
    axes = {m: 0 if m in snap else self.axes.params[m] for m in reads}
    if self._refresh is None:
      self._refresh = jax.jit(jax.vmap(self.method.refresh,
                                       in_axes=(self.axes.static, axes, 0, 0, None)))
    args = (state.static, params, snap.get("carry", state.carry), _vmap_fold_in(keys, epoch))
    live = self._live()
    if live is not None:
      args = tuple(take(x, a, live) for x, a in zip(args, (self.axes.static, axes, 0, 0)))
    with ranking.x64():
      cache, carry = self._refresh(*args, jnp.int32(epoch))
    stats = cache.pop("metrics", None)
    if live is not None:
      n = self.num_runs
      cache = _scatter(cache, live, n, state.cache)
      carry = None if resume else _scatter(carry, live, n, state.carry)
      stats = None if stats is None else _scatter(stats, live, n)
    state = state.replace(cache=cache)
    if not resume:
      state = state.replace(carry=carry)
    return state, stats

  def replicate(self, state):
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.device_put(state, NamedSharding(self.mesh, P()))

  def run_epoch(self, state, keys, epoch: int = 0):
    """One epoch of the live runs (`keys` [N]); the metrics of the others are zeros."""
    live = self._live()
    if live is None:
      return self.epoch(state, self.exp.examples, keys, epoch)
    sub, metrics = self.epoch(self.replicate(take(state, self.axes, live)), self.exp.examples,
                              keys[live], epoch)
    return put(state, self.axes, live, sub), _scatter(metrics, live, self.num_runs)

  def params_of(self, state, r: int) -> dict:
    """Run r's params ({model: params})."""
    return take(state.params, self.axes.params, r)


class RunsEarlyStop:
  """`schedule.EarlyStop` per run: each run keeps its own best validation epoch and state and
  stops counting when its patience runs out; the phase ends when every run has stopped."""

  def __init__(self, early, num_runs: int):
    self.early, self.n = early, num_runs
    self.patience, self.metric, self.model = early.patience, early.metric, early.model

  @property
  def on(self) -> bool:
    return self.early.on

  def init(self, state, phase) -> dict:
    if not self.on:
      return {}
    n = self.n
    return {"params": {x: jax.tree.map(jnp.copy, state.params[x]) for x in phase.train},
            "epoch": jnp.zeros(n, jnp.int32), "value": jnp.full(n, -np.inf, jnp.float32),
            "bad": jnp.zeros(n, jnp.int32), "stopped_at": jnp.zeros(n, jnp.int32)}

  def active(self, best) -> np.ndarray:
    return np.asarray(best["bad"]) < self.patience

  def update(self, best: dict, values, state, phase, epoch: int) -> dict:
    """`values` [N]: the runs' validation metric at `epoch`."""
    active = self.active(best)
    values = np.asarray(values, np.float32)
    better = active & (values > np.asarray(best["value"]))
    bad = np.where(active & ~better, np.asarray(best["bad"]) + 1, np.where(better, 0,
                                                                           best["bad"]))
    stopped_at = np.where(active & (bad >= self.patience), epoch, best["stopped_at"])
    pick = jnp.asarray(better)

    def choose(new, old):
      return jnp.where(pick.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    params = {x: jax.tree.map(choose, state.params[x], best["params"][x]) for x in phase.train}
    return {"params": params,
            "epoch": jnp.asarray(np.where(better, epoch, best["epoch"]), jnp.int32),
            "value": jnp.asarray(np.where(better, values, best["value"]), jnp.float32),
            "bad": jnp.asarray(bad, jnp.int32), "stopped_at": jnp.asarray(stopped_at, jnp.int32)}

  def stopped(self, best: dict) -> bool:
    return self.on and not self.active(best).any()


class RunsWriter:
  """One `MetricWriter` per run; `write` gives run r its slice [r] of every array leaf. Runs in
  `mute` (those that stopped early; they train no further) get no further lines, so that each
  run's metrics.jsonl reads as a single run's."""

  def __init__(self, writers):
    self.writers = writers
    self.mute = np.zeros(len(writers), bool)

  def write(self, **record) -> None:
    for r, w in enumerate(self.writers):
      if not self.mute[r]:
        w.write(**jax.tree.map(lambda x: x[r] if np.ndim(x) else x, record))

  def each(self, records) -> None:
    for r, (w, record) in enumerate(zip(self.writers, records)):
      if not self.mute[r]:
        w.write(**record)


class RunsPhaseRun(schedule.PhaseRun):
  """The loop of a phase of N runs (`schedule.PhaseRun` with a run axis); `run` returns the
  runs' final evaluations (a list), or None when the epoch budget ran out."""

  def __init__(self, program: RunsProgram, pcfg, ckpt, writers, budget, phase_keys, evaluated):
    super().__init__(program, pcfg, ckpt, RunsWriter(writers), budget, phase_keys, evaluated)
    self.early = RunsEarlyStop(self.early, program.num_runs)
    self.n = program.num_runs

  key_of = staticmethod(_vmap_fold_in)

  def _evaluate(self, state, r, params=None, **kw):
    params = self.program.params_of(state, r) if params is None else params
    return self.exp.evaluate(params, key=jax.random.fold_in(self.program.keys[r], 7), **kw)

  def _untrained(self, state):
    out = [dict(self._evaluate(state, r, models=self.evaluated, bias=True), seconds=0.0,
                epochs=0) for r in range(self.n)]
    self.writer.each([dict(phase=self.phase.name, epoch=0, final=True, eval=o) for o in out])
    return out

  def _log(self, epoch, metrics, clock, progress):
    if not (epoch % self.config.log_every == 0 or epoch == self.pcfg.epochs):
      progress.update(epoch)
      return
    metrics = jax.device_get(metrics)
    dt = (time.time() - clock["t"]) / (epoch - clock["epoch"])
    clock.update(t=time.time(), epoch=epoch)
    records, live = [], ~self.writer.mute
    for r in range(self.n):
      if not live[r]:  # stopped: not trained, no line
        records.append(None)
        continue
      n = float(metrics["examples"][r])
      losses = {k: float(v[r]) / n for k, v in metrics.items() if k != "examples"}
      if not all(np.isfinite(v) for v in losses.values()):
        raise FloatingPointError(
            f"[{self.phase.name}] run {r}, epoch {epoch}: non-finite loss {losses}; the last "
            f"good checkpoint is epoch {self.ckpt.latest_epoch()} in {self.ckpt.directory}")
      records.append(dict(phase=self.phase.name, epoch=epoch, seconds_per_epoch=dt,
                          examples_per_s=n * live.sum() / dt, **losses))
    self.writer.each(records)
    progress.clear()
    logging.info("[%s] epoch %d/%d  %d of %d runs training  %.2f s/epoch  ~%s left",
                 self.phase.name, epoch, self.pcfg.epochs, live.sum(), self.n, dt,
                 duration(dt * (self.pcfg.epochs - epoch)))
    progress.update(epoch, f"{live.sum()} of {self.n} runs")

  def _set_mute(self, best):
    """Runs that stopped early write no more lines and train no further (`RunsProgram.live`)."""
    self.writer.mute = ~self.early.active(best)
    self.program.live = ~self.writer.mute

  def _loop(self, state, epoch, best):
    if self.early.on:  # runs that stopped before a resume stay silent
      self._set_mute(best)
    return super()._loop(state, epoch, best)

  def _validate(self, state, epoch, best, progress):
    """Validates the runs still counting (a stopped run's best is fixed: it is not evaluated)."""
    models = tuple(m for m in ("teacher", "student") if m in self.phase.train)
    live = ~self.writer.mute
    vals = [self._evaluate(state, r, splits=("val",), models=models) if live[r] else None
            for r in range(self.n)]
    if self.early.on:
      values = [v[self.early.model]["val"][self.early.metric] if v else -np.inf for v in vals]
      best = self.early.update(best, values, state, self.phase, epoch)
    self.writer.each([dict(phase=self.phase.name, epoch=epoch, eval=v) for v in vals])
    if self.early.on:
      self._set_mute(best)
    progress.update(epoch)
    return best

  def _final(self, state, r, epoch, best, t_phase) -> dict:
    params = self.program.params_of(state, r)
    extra = {"epochs": epoch}
    if self.early.on:
      params = dict(params, **{x: take(best["params"][x], 0, r) for x in self.phase.train})
      stopped = int(best["stopped_at"][r])
      extra.update(best_epoch=int(best["epoch"][r]), stopped_early=stopped > 0,
                   stop_metric=f"{self.early.model} val {self.early.metric}",
                   epochs=stopped or epoch)
    evals = self._evaluate(state, r, params=params, models=self.evaluated, bias=True)
    if {"teacher", "student"} <= set(self.evaluated):
      evals.update(self.exp.report(params))
    return dict(evals, **extra, seconds=time.time() - t_phase)

  def _finish(self, state, epoch, best, t_phase):
    out = [self._final(state, r, epoch, best, t_phase) for r in range(self.n)]
    self.writer.mute[:] = False  # every run's final line
    self.writer.each([dict(phase=self.phase.name, epoch=o["epochs"], final=True, eval=o)
                      for o in out])
    logging.info("[%s] %d runs done after %d epochs", self.phase.name, self.n, epoch)
    return out


# ---------------------------------------------------------------------------------------------
# A multi-run workdir.
# ---------------------------------------------------------------------------------------------

def _hparams(method, runs: list[Run]) -> dict:
  """{name: float32 [N]}: each run's traced hyperparameters (its grid values where it has
  them)."""
  out = {}
  for k, v in method.hparams.items():
    out[k] = jnp.asarray([dict(r.values).get(f"method.{k}", v) for r in runs], jnp.float32)
  return out


def per_run_bytes(exp, program) -> int:
  """Bytes of one run's own state: its learners' params and optimizer states (from their
  shapes) and the method's per-refresh state (from `refresh`'s output shapes)."""
  from kdrec_jax.step import init_state
  method = program.method if program.phase.distill else None
  shapes = jax.eval_shape(lambda k: init_state(k, exp.models, program.optimizers, method),
                          jax.random.key(0))
  total = nbytes({x: shapes.params[x] for x in program.phase.train}) + nbytes(shapes.opt)
  if program.uses_refresh:
    reads = {m: shapes.params[m] for m in program.method.refresh_reads}
    try:
      static = jax.eval_shape(program.method.prepare, {"teacher": shapes.params["teacher"]}
                              ) if program.method.prepare else {}
      cache, _ = jax.eval_shape(program.method.refresh, static, reads, shapes.carry,
                                jax.random.key(0), jnp.int32(0))
      total += nbytes(cache)
    except Exception:  # noqa: BLE001 - a refresh that needs more than shapes: params only
      pass
  return total


def train_and_evaluate_runs(config, workdir: str) -> dict:
  """The runs `config.runs` asks for, in `workdir` (module docstring); returns {run name:
  results}. Resumable as a single run: the groups' checkpoints hold the stacked state."""
  from kdrec_jax import train as ktrain
  from kdrec_jax import workdir as wd
  from kdrec_jax.experiment import Experiment
  all_runs = expand(config)
  os.makedirs(workdir, exist_ok=True)
  probe = Experiment(run_config(config, all_runs[0]))
  wd.check_config(workdir, config, probe.data)
  out = {}
  grouped = groups(config, all_runs, traced_keys(probe.method))
  for gi, group in enumerate(grouped):
    root = workdir if len(grouped) == 1 else os.path.join(workdir, f"group{gi}")
    out.update(_train_group(config, workdir, root, group))
    if any(not set(ktrain.scheduled_phases(run_config(config, r), probe.method))
           <= set(out[r.name]["phases"]) for r in group):
      break  # the epoch budget ran out: rerun to resume
  return out


def _records(config, workdir: str, exp, group: list[Run]):
  """Each run's folder (its config recorded and checked), results record and metrics writer."""
  from kdrec_jax import train as ktrain
  from kdrec_jax import workdir as wd
  dirs = {r.name: os.path.join(workdir, r.name) for r in group}
  results = {}
  for r in group:
    os.makedirs(dirs[r.name], exist_ok=True)
    wd.check_config(dirs[r.name], run_config(config, r), exp.data)
    results[r.name] = ktrain._open_results(exp, dirs[r.name], [])
    results[r.name]["config"] = run_config(config, r).to_dict()
  return dirs, results, [wd.MetricWriter(dirs[r.name]) for r in group]


def _starts(exp, root: str, phase, loaded: dict) -> dict:
  """{model: params} the runs start a phase from (`train._phase_starts`, stacked where the
  warm-up was the runs')."""
  from kdrec_jax import workdir as wd
  starts = {m: p for m, (p, _) in loaded.items()}
  if phase.name != "warmup" and not exp.config.get("warmup_from"):
    trained = schedule.warmup_models(exp.config, exp.method)
    if trained:
      params = wd.phase_result_params(root, "warmup")
      starts.update({m: params[m] for m in trained})
  return starts


def _record_teachers(program, state, group, dirs, results, sources, frozen, root, loaded):
  from kdrec_jax import workdir as wd
  sources = dict(sources, teacher=loaded.get("teacher", (None, f"{root} (warm-up)"))[1])
  for i, r in enumerate(group):
    teacher = program.params_of(state, i)["teacher"]
    results[r.name]["teacher"] = wd.check_teachers(dirs[r.name], sources,
                                                   {"teacher": teacher, **frozen})


def _train_group(config, workdir: str, root: str, group: list[Run]) -> dict:
  """One group's runs as one program: the schedule of `train._run` with a run axis."""
  from kdrec_jax import train as ktrain
  from kdrec_jax import workdir as wd
  from kdrec_jax.experiment import Experiment
  from kdrec_jax.methods.bd import available_mb
  exp = Experiment(run_config(config, group[0]))
  dirs, results, writers = _records(config, workdir, exp, group)
  keys, hparams = keys_for([r.seed for r in group]), _hparams(exp.method, group)
  loaded = ktrain._loaded_models(exp, root, results[group[0].name])
  if ktrain.trajectory_names(exp.config) and not ktrain.teacher_init(exp.config):
    raise ValueError("runs: trajectory checkpoints of a teacher trained in this workdir are not "
                     "supported with several runs; train the teacher first (teacher_init)")
  budget = [config.get("max_epochs_per_run", 0) or None]
  logging.info("%s; %d runs as one program: %s", exp.data, len(group),
               ", ".join(r.name for r in group))
  t_call = time.time()
  for phase_index, (phase, pcfg) in enumerate(schedule.phases_for(exp.config, exp.method)):
    if all(phase.name in results[r.name]["phases"] for r in group):
      continue
    program = RunsProgram(schedule.build_phase(exp, phase), keys, hparams, set(loaded))
    check_fits(per_run_bytes(exp, program), program.num_runs, available_mb(),
               float((config.get("runs", {}) or {}).get("budget_mb", 8192)))
    frozen, sources = ktrain._frozen_extras(exp, root) if phase.distill else ({}, {})
    starts = _starts(exp, root, phase, loaded)
    state = program.initial_state(starts, frozen)
    if phase.name != "warmup" and "teacher" not in phase.train:
      _record_teachers(program, state, group, dirs, results, sources, frozen, root, loaded)
    ckpt = wd.phase_checkpoints(root, phase.name, max_to_keep=exp.config.checkpoint_keep,
                                keep_epochs=pcfg.get("keep_epochs", ()) or ())
    evaluated = tuple(m for m in ("teacher", "student") if m in phase.train or m in starts)
    finished = RunsPhaseRun(program, pcfg, ckpt, writers, budget,
                            _vmap_fold_in(keys, phase_index), evaluated).run(state)
    seconds, t_call = time.time() - t_call, time.time()
    for i, r in enumerate(group):
      if finished:
        results[r.name]["phases"][phase.name] = finished[i]
      results[r.name]["wall_seconds"] = results[r.name].get("wall_seconds", 0.0) + seconds
      wd.write_json_atomic(os.path.join(dirs[r.name], "results.json"), results[r.name])
    if not finished:
      logging.info("Stopped after max_epochs_per_run; rerun the command to resume.")
      break
  return results
