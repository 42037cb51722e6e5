"""A whole run: warm-up, then distillation and the control, each resumable, in one workdir.

`train_and_evaluate(config, workdir)` is what `python -m launch.train` and a notebook cell call.
The pieces live in rooms of their own: the train step, epoch and mesh in `kdrec_jax.step`; the
data, models, method and evaluators in `kdrec_jax.experiment`; phases, refreshes, early
stopping and the phase loop in `kdrec_jax.schedule` (`build_phase` is the public way to get a
phase's program); the workdir's lock, config fingerprint, teacher record, provenance and
writers in `kdrec_jax.workdir`; the progress line in `kdrec_jax.progress`.
"""
from __future__ import annotations

import os
import time

from absl import logging
import jax

from kdrec_jax import workdir as wd
from kdrec_jax.experiment import Experiment, extra_teachers, trajectory_names
from kdrec_jax.schedule import (PhaseRun, build_phase, phases_for, teacher_init,
                                warmup_models)
from kdrec_jax.step import MODELS, TrainState
from kdrec_jax.workdir import WorkdirError

__all__ = ["train_and_evaluate", "Experiment", "build_phase", "TrainState", "WorkdirError",
           "MODELS"]


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the whole schedule in `workdir`, resuming from its checkpoints; returns the results.

  The workdir is locked for the call (a second run on it is refused) and its config checked
  against the one that started it (`workdir.check_config`).

  Results (also written to `<workdir>/results.json`): for each finished phase ('warmup',
  'distill', 'control'), the validation and test metrics of its models at the phase's end (at
  the best validation epoch when the phase stops early), with the popularity-bias metrics
  (`metrics.group_metrics`: Recall@K/g, NDCG@K/g, Share@K/g for the `eval.popularity_groups`
  groups of `data.popularity.groups`, described under 'popularity_groups'); the per-epoch
  validations leave them out. `config.max_epochs_per_run` > 0 stops (checkpointed) after that
  many epochs in this call.

  `config.runs` (seeds and/or a grid) trains several runs as one program and returns {run name:
  results}, each run in its own folder under `workdir` (`kdrec_jax.runs`).
  """
  from kdrec_jax import runs
  run = runs.train_and_evaluate_runs if runs.requested(config) else _run
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:  # multi-host: process 0 holds the lock and writes for all
    return run(config, workdir)
  with wd.WorkdirLock(workdir):
    return run(config, workdir)


def scheduled_phases(config, method) -> tuple[str, ...]:
  """The names of the phases `config` schedules."""
  return tuple(phase.name for phase, _ in phases_for(config, method))


def _open_results(exp: Experiment, workdir: str, forced: list) -> dict:
  """The results record: this call's header, with what earlier calls finished."""
  results = {"dataset": repr(exp.data), "config": exp.config.to_dict(), "phases": {},
             "provenance": wd.provenance(exp)}
  if exp.item_groups is not None:
    results["popularity_groups"] = exp.group_summary()
  old = wd.read_results(workdir)
  results["phases"] = old.get("phases", {})
  for key in ("teacher", "forced_resumes", "wall_seconds"):
    if key in old:
      results[key] = old[key]
  if forced:
    results.setdefault("forced_resumes", []).append(forced)
  return results


def _loaded_models(exp: Experiment, workdir: str, results: dict) -> dict:
  """{model: (params, source)} from outside this workdir's warm-up: a `teacher_init` teacher, or
  another workdir's finished warm-up (`warmup_from`, whose results this run then reports)."""
  config, loaded = exp.config, {}
  path = teacher_init(config)
  if path:
    like = exp.models["teacher"].init(jax.random.key(0))
    loaded["teacher"] = (wd.load_teacher(path, like), path)
    logging.info("Teacher loaded from %s.", path)
  if config.get("warmup_from"):  # another workdir's finished warm-up replaces this one's
    params, warm_results = wd.finished_warmup(config.warmup_from, config.warmup.epochs)
    for m, p in params.items():
      if m in MODELS:
        loaded.setdefault(m, (p, f"{config.warmup_from} (warm-up)"))
    if "warmup" not in results["phases"]:
      results["phases"]["warmup"] = warm_results
      wd.write_json_atomic(os.path.join(workdir, "results.json"), results)
  return loaded


def _frozen_extras(exp: Experiment, workdir: str) -> tuple[dict, dict]:
  """({name: params}, {name: source}) of the extra frozen teachers (`config.teachers`) and of
  the trajectory checkpoints (`teacher_trajectory`, `teachers.<name>.trajectory`), each checked
  against its model's structure. A trajectory is the way to the final teacher: checkpoints at or
  after the teacher's best epoch (when its warm-up stopped early) are left out, as HetComp's
  code does."""
  config, params, sources = exp.config, {}, {}
  specs = extra_teachers(config)
  for name, spec in specs.items():
    like = exp.models[name].init(jax.random.key(0))
    params[name] = wd.load_teacher(spec.init, like, what=f"teachers.{name}.init")
    sources[name] = spec.init
  for label, (name, epoch) in trajectory_names(config).items():
    path = (specs[name].init if name != "teacher" else teacher_init(config) or workdir)
    best = wd.finished_phases(path).get("warmup", {}).get("best_epoch")
    if best is not None and epoch >= best:  # the trajectory leads to the best (final) teacher
      logging.info("%s: not part of the trajectory (the teacher's best epoch is %d).", label,
                   best)
      continue
    like = exp.models[name].init(jax.random.key(0))
    params[label] = wd.load_teacher(path, like, what=label, epoch=epoch)
    sources[label] = f"{path} (warm-up epoch {epoch})"
  return params, sources


def _phase_starts(exp: Experiment, workdir: str, phase, loaded: dict) -> dict:
  """{model: params} a phase starts from: loaded models, and after the warm-up the models this
  workdir's warm-up trained (its best state when it stopped early)."""
  starts = {m: p for m, (p, _) in loaded.items()}
  if phase.name != "warmup" and not exp.config.get("warmup_from"):
    trained = warmup_models(exp.config, exp.method)
    if trained:
      params = wd.phase_result_params(workdir, "warmup")
      starts.update({m: params[m] for m in trained})
  return starts


def _run(config, workdir: str) -> dict:
  exp = Experiment(config)
  forced = wd.check_config(workdir, config, exp.data)
  writer = wd.MetricWriter(workdir)
  results_path = os.path.join(workdir, "results.json")
  results = _open_results(exp, workdir, forced)
  t_call = time.time()
  logging.info("%s; %d device(s); method %s", exp.data, exp.mesh.devices.size, exp.method.name)
  budget = [config.get("max_epochs_per_run", 0) or None]  # epochs left in this call
  loaded = _loaded_models(exp, workdir, results)
  extras = None
  for phase_index, (phase, pcfg) in enumerate(phases_for(config, exp.method)):
    if phase.name in results["phases"]:
      continue
    starts = _phase_starts(exp, workdir, phase, loaded)
    program = build_phase(exp, phase)
    frozen, sources = {}, {}
    if phase.distill:
      extras = extras or _frozen_extras(exp, workdir)
      frozen, sources = extras
    state = program.initial_state(starts, frozen)
    if phase.name != "warmup" and "teacher" not in phase.train:
      sources = dict(sources, teacher=loaded.get("teacher", (None, f"{workdir} (warm-up)"))[1])
      results["teacher"] = wd.check_teachers(workdir, sources,
                                             {"teacher": state.params["teacher"], **frozen})
    ckpt = wd.phase_checkpoints(workdir, phase.name, max_to_keep=config.checkpoint_keep,
                                keep_epochs=pcfg.get("keep_epochs", ()) or ())
    # Evaluated: the phase's models, and a teacher that is not a fresh init (for reference).
    evaluated = tuple(m for m in MODELS if m in phase.train or m in starts)
    finished = PhaseRun(program, pcfg, ckpt, writer, budget,
                        jax.random.fold_in(exp.key, phase_index), evaluated).run(state)
    if finished:
      results["phases"][phase.name] = finished
    # Wall time of all calls so far (compilation, training, evaluation, checkpoints).
    results["wall_seconds"] = results.get("wall_seconds", 0.0) + time.time() - t_call
    t_call = time.time()
    wd.write_json_atomic(results_path, results)
    if not finished:
      logging.info("Stopped after max_epochs_per_run; rerun the command to resume.")
      break
  return results
