"""The schedule of a run: its phases, a phase built as one program (`build_phase`), the method's
refreshes, early stopping, and the resumable loop that trains a phase.

`build_phase(exp, 'distill')` is the one public way to get a phase's train step, its jitted
epoch and its starting state; the run (`train.train_and_evaluate`), the tests and the
benchmarks all use it.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kdrec_jax import faults
from kdrec_jax.experiment import Experiment
from kdrec_jax.progress import Progress, duration
from kdrec_jax.step import (MODELS, Phase, TrainState, init_state, make_epoch, make_mesh,
                            make_train_step)


def teacher_init(config) -> str:
  return config.get("teacher_init", "") or ""


def warmup_models(config, method) -> tuple[str, ...]:
  """The models the warm-up trains alone: `config.warmup.models`, else both for methods that
  train the teacher (BD) and the teacher only for teacher->student methods; a teacher loaded
  with `teacher_init` is not trained."""
  models = tuple(config.warmup.get("models", ()) or
                 (("teacher",) if method.teacher_to_student else MODELS))
  if set(models) - set(MODELS):
    raise ValueError(f"warmup.models must be a subset of {MODELS}, got {models}")
  if teacher_init(config):
    models = tuple(m for m in models if m != "teacher")
  return models


def phase_named(config, method, name: str) -> Phase:
  """The phase `name` ('warmup', 'distill', 'control') of `config`'s schedule. The control
  trains the distillation phase's models from the same start without the method (for
  teacher->student methods: the student alone from scratch, i.e. the no-KD student)."""
  if name == "warmup":
    return Phase("warmup", warmup_models(config, method), False)
  if name == "distill":
    return Phase("distill", tuple(method.learners), True)
  if name == "control":
    return Phase("control", tuple(m for m in method.learners if m in MODELS), False)
  raise ValueError(f"unknown phase {name!r}; expected warmup, distill or control")


def phases_for(config, method) -> list[tuple[Phase, Any]]:
  """The schedule: (phase, its config section) in order."""
  out = [(phase_named(config, method, "warmup"), config.warmup)]
  if config.distill.epochs:
    out.append((phase_named(config, method, "distill"), config.distill))
    if config.control:
      out.append((phase_named(config, method, "control"), config.distill))
  return out


@dataclasses.dataclass
class PhaseProgram:
  """A phase as one compiled program: its per-device `step`, the jitted `epoch(state, examples,
  key, epoch_index) -> (state, metrics)` over `mesh`, its optimizers, and the method's
  per-phase pieces (`initial_state`, `prepare`, `refresh`)."""
  exp: Experiment
  phase: Phase
  optimizers: dict
  method: Any
  step: Callable
  mesh: Any
  epoch: Callable
  steps: int

  @property
  def uses_refresh(self) -> bool:
    return self.phase.distill and self.method.refresh is not None

  def initial_state(self, starts: Optional[dict] = None, frozen: Optional[dict] = None
                    ) -> TrainState:
    """The phase's starting state: fresh params from the run's key (the student of a
    teacher->student method starts from scratch), replaced by `starts` ({model: params}: a
    loaded teacher, the warm-up's results), fresh optimizer states for the learners and, in a
    distillation phase, the method's traced hyperparameters and its constants from the frozen
    teachers (`frozen`: extra frozen teachers by name, besides the state's teacher)."""
    exp = self.exp
    state = init_state(exp.key, exp.models, {}, self.method if self.phase.distill else None)
    params = dict(state.params)
    for m, p in (starts or {}).items():
      params[m] = jax.tree.map(jnp.array, p)  # copies: the epoch donates them
    opt = {learner: o.init(params[learner]) for learner, o in self.optimizers.items()}
    state = state.replace(params=params, opt=opt)
    if self.phase.distill:
      static = exp.prepare({"teacher": params["teacher"], **(frozen or {})})
      state = state.replace(hparams=exp.hparams(), static=static)
    if self.uses_refresh and self.method.refresh_every != 1:  # the structure checkpoints hold
      state = state.replace(snapshot=self._snapshot(state))
    return state

  def _snapshot(self, state: TrainState, copy: bool = False) -> dict:
    f = (lambda t: jax.tree.map(jnp.copy, t)) if copy else (lambda t: t)
    snap = {m: f(state.params[m]) for m in self.method.refresh_reads if m in self.phase.train}
    if state.carry:
      snap["carry"] = f(state.carry)
    return snap

  def refresh(self, state: TrainState, key, epoch: int, resume: bool = False):
    """The state with the method's cache for `epoch` (a refresh epoch; `key` the phase's refresh
    key), and the refresh's statistics (the cache's 'metrics', or None). On a mid-period resume
    the cache is recomputed from the checkpointed snapshot (same inputs, same tables) and the
    carry kept."""
    if resume:
      snap = state.snapshot
    else:
      snap = self._snapshot(state, copy=True)
      state = state.replace(snapshot=snap if self.method.refresh_every != 1 else {})
    params = {m: snap[m] if m in snap else state.params[m] for m in self.method.refresh_reads}
    cache, carry = self.exp.refresh(state.static, params, snap.get("carry", state.carry),
                                    jax.random.fold_in(key, epoch), epoch)
    stats = cache.pop("metrics", None)  # per-refresh statistics: logged, not carried
    state = state.replace(cache=cache)
    if not resume:
      state = state.replace(carry=carry)
    return state, stats

  def replicate(self, state: TrainState) -> TrainState:
    """`state` placed as the epoch returns it (replicated on the mesh): one compilation."""
    return jax.device_put(state, jax.sharding.NamedSharding(self.mesh, P()))

  def run_epoch(self, state: TrainState, key, epoch: int = 0):
    return self.epoch(state, self.exp.examples, key, epoch)


def build_phase(exp: Experiment, phase="distill", *, num_devices: Optional[int] = None,
                models=None, method=None, optimizers=None,
                wrap_step: Optional[Callable] = None) -> PhaseProgram:
  """The phase `phase` (a name of the config's schedule or a `Phase`) of `exp` as a program.

  num_devices: the mesh's size (default: `exp`'s mesh). models, method, optimizers: replace
  `exp`'s (tests: a model variant, a method whose carry logs more); wrap_step: applied to the
  per-device step before it is scanned (e.g. `chex.assert_max_traces`).
  """
  if isinstance(phase, str):
    phase = phase_named(exp.config, exp.method, phase)
  method = method or exp.method
  pcfg = exp.config.warmup if phase.name == "warmup" else exp.config.distill
  optimizers = optimizers or exp.optimizers(pcfg, phase.train)
  step = make_train_step(phase, models or exp.models, method, optimizers, exp.train_csr,
                         exp.data.num_items)
  mesh = exp.mesh if num_devices is None else make_mesh(num_devices)
  epoch, steps = make_epoch(wrap_step(step) if wrap_step else step, mesh, exp.num_examples,
                            exp.config.batch_size)
  return PhaseProgram(exp=exp, phase=phase, optimizers=optimizers, method=method, step=step,
                      mesh=mesh, epoch=epoch, steps=steps)


# ---------------------------------------------------------------------------------------------
# Early stopping: evaluation every `eval_every` epochs, best state kept, test at the best epoch.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EarlyStop:
  """Stops a phase after `patience` validations without improvement of `metric` of `model`.
  Its record ('best': the best params, epoch, value, and validations since) is checkpointed."""
  patience: int
  metric: str
  model: str

  @classmethod
  def of(cls, pcfg, phase: Phase, config) -> "EarlyStop":
    patience = int(pcfg.get("patience", 0) or 0)
    model = pcfg.get("stop_model", "") or ("student" if "student" in phase.train else "teacher")
    if patience and not config.eval_every:
      raise ValueError(f"[{phase.name}] early stopping (patience {patience}) needs eval_every > 0")
    return cls(patience, pcfg.get("stop_metric", "NDCG@10"), model)

  @property
  def on(self) -> bool:
    return self.patience > 0

  def init(self, state: TrainState, phase: Phase) -> dict:
    if not self.on:
      return {}
    return {"params": {x: jax.tree.map(jnp.copy, state.params[x]) for x in phase.train},
            "epoch": jnp.int32(0), "value": jnp.float32(-np.inf), "bad": jnp.int32(0)}

  def update(self, best: dict, val: dict, state: TrainState, phase: Phase, epoch: int) -> dict:
    value = val[self.model]["val"][self.metric]
    if value > float(best["value"]):
      return {"params": {x: jax.tree.map(jnp.copy, state.params[x]) for x in phase.train},
              "epoch": jnp.int32(epoch), "value": jnp.float32(value), "bad": jnp.int32(0)}
    return dict(best, bad=best["bad"] + 1)

  def stopped(self, best: dict) -> bool:
    return self.on and int(best["bad"]) >= self.patience


def saved(state: TrainState, phase: Phase, best: dict) -> dict:
  """What a phase's checkpoint holds: the step, its learners (params and optimizer states), the
  snapshot and carry if any, and the early-stopping record. Frozen models are left out; the
  method's static lists and cache are rebuilt from the teachers and the snapshot."""
  out = {"step": state.step}
  out.update({x: {"params": state.params[x], "opt": state.opt[x]} for x in phase.train})
  for k in ("snapshot", "carry"):
    if getattr(state, k):
      out[k] = getattr(state, k)
  if best:
    out["best"] = best
  return out


def restored(state: TrainState, phase: Phase, tree: dict) -> TrainState:
  """`state` with what `saved` wrote (less 'best')."""
  params, opt = dict(state.params), dict(state.opt)
  for x in phase.train:
    params[x], opt[x] = tree[x]["params"], tree[x]["opt"]
  return state.replace(step=tree["step"], params=params, opt=opt,
                       snapshot=tree.get("snapshot", state.snapshot),
                       carry=tree.get("carry", state.carry))


# ---------------------------------------------------------------------------------------------
# The resumable loop of one phase.
# ---------------------------------------------------------------------------------------------

class PhaseRun:
  """Trains one phase from its latest checkpoint (or the program's initial state), with
  refreshes, logging, validation, early stopping and checkpoints."""

  def __init__(self, program: PhaseProgram, pcfg, ckpt, writer, budget: list, phase_key,
               evaluated=MODELS):
    self.program, self.exp, self.phase = program, program.exp, program.phase
    self.config, self.pcfg = program.exp.config, pcfg
    self.ckpt, self.writer, self.budget = ckpt, writer, budget
    self.phase_key, self.evaluated = phase_key, evaluated
    self.early = EarlyStop.of(pcfg, self.phase, self.config)
    self.every = program.method.refresh_every
    self.refresh_key = self.key_of(phase_key, 1 << 30)
    self.keep_epochs = frozenset(int(e) for e in pcfg.get("keep_epochs", ()) or ())

  @staticmethod
  def key_of(key, data: int):
    return jax.random.fold_in(key, data)

  def epoch_key(self, epoch: int):
    return self.key_of(self.phase_key, epoch)

  def refresh_due(self, epoch: int) -> bool:
    return epoch % self.every == 0 if self.every else epoch == 0

  def run(self, state: TrainState) -> Optional[dict]:
    """The phase's final evaluation of the `evaluated` models, or None if the epoch budget ran
    out first (after checkpointing)."""
    best = self.early.init(state, self.phase)
    epoch, tree = self.ckpt.restore_latest(saved(state, self.phase, best))
    if tree is None:
      epoch = 0
    else:
      best = tree.pop("best", best)
      state = restored(state, self.phase, tree)
      logging.info("[%s] resumed at epoch %d from %s", self.phase.name, epoch,
                   self.ckpt.directory)
    if not self.phase.train:  # nothing to train (e.g. the warm-up of a loaded teacher)
      return self._untrained(state)
    if (self.program.uses_refresh and epoch < self.pcfg.epochs
        and not self.refresh_due(epoch)):
      last = epoch - epoch % self.every if self.every else 0
      state, _ = self.program.refresh(state, self.refresh_key, last, resume=True)
    state = self.program.replicate(state)
    out = self._loop(state, epoch, best)
    if out is None:
      return None
    return self._finish(*out)

  def _untrained(self, state) -> dict:
    evals = self.exp.evaluate(state.params, models=self.evaluated, bias=True)
    self.writer.write(phase=self.phase.name, epoch=0, final=True, eval=evals)
    return dict(evals, seconds=0.0, epochs=0)

  def _loop(self, state, epoch, best):
    t_phase = time.time()
    clock = {"t": t_phase, "epoch": epoch}
    progress = Progress(self.phase.name, self.pcfg.epochs, epoch)
    while epoch < self.pcfg.epochs and not self.early.stopped(best):
      if self.budget[0] is not None and self.budget[0] <= 0:
        progress.clear()
        self.ckpt.save(epoch, saved(state, self.phase, best))
        return None
      if self.program.uses_refresh and self.refresh_due(epoch):
        state, stats = self.program.refresh(state, self.refresh_key, epoch)
        if stats is not None:
          self.writer.write(phase=self.phase.name, epoch=epoch, refresh=jax.device_get(stats))
        state = self.program.replicate(state)
      state, metrics = self.program.run_epoch(state, self.epoch_key(epoch), epoch)
      faults.point("epoch")  # the epoch is dispatched and running
      epoch += 1
      if self.budget[0] is not None:
        self.budget[0] -= 1
      self._log(epoch, metrics, clock, progress)
      if self.config.eval_every and epoch % self.config.eval_every == 0 and (
          epoch < self.pcfg.epochs or self.early.on):
        best = self._validate(state, epoch, best, progress)
      if (epoch % self.config.checkpoint_every == 0 or epoch == self.pcfg.epochs
          or epoch in self.keep_epochs or self.early.stopped(best)):
        self.ckpt.save(epoch, saved(state, self.phase, best))
    progress.clear()
    if self.pcfg.epochs == 0:
      self.ckpt.save(0, saved(state, self.phase, best))
    return state, epoch, best, t_phase

  def _log(self, epoch: int, metrics, clock: dict, progress: Progress) -> None:
    """Every `log_every` epochs: the losses per example, seconds per epoch and examples/s to
    metrics.jsonl and the log; a non-finite loss stops the run naming the last checkpoint."""
    if not (epoch % self.config.log_every == 0 or epoch == self.pcfg.epochs):
      progress.update(epoch)
      return
    metrics = jax.device_get(metrics)  # waits for the queued epochs
    dt = (time.time() - clock["t"]) / (epoch - clock["epoch"])
    clock.update(t=time.time(), epoch=epoch)
    n = float(metrics["examples"])
    losses = {k: float(v) / n for k, v in metrics.items() if k != "examples"}
    if not all(np.isfinite(v) for v in losses.values()):
      last = self.ckpt.latest_epoch()
      raise FloatingPointError(
          f"[{self.phase.name}] epoch {epoch}: non-finite loss {losses}; the last good "
          "checkpoint is " + (os.path.join(self.ckpt.directory, str(last)) if last is not None
                              else "none (the phase has not saved one yet)"))
    self.writer.write(phase=self.phase.name, epoch=epoch, seconds_per_epoch=dt,
                      examples_per_s=n / dt, **losses)
    loss_text = " ".join(f"{x[0].upper()} {losses[f'loss_{x}']:.4f}" for x in self.phase.train
                         if f"loss_{x}" in losses)
    progress.clear()
    logging.info("[%s] epoch %d/%d  loss %s  %.2f s/epoch  %.0f ex/s  ~%s left",
                 self.phase.name, epoch, self.pcfg.epochs, loss_text, dt, n / dt,
                 duration(dt * (self.pcfg.epochs - epoch)))
    progress.update(epoch, f"loss {loss_text}  {n / dt:.0f} ex/s")

  def _validate(self, state, epoch: int, best: dict, progress: Progress) -> dict:
    val = self.exp.evaluate(state.params, splits=("val",),
                            models=tuple(m for m in MODELS if m in self.phase.train))
    faults.point("eval")
    if self.early.on:
      best = self.early.update(best, val, state, self.phase, epoch)
    self.writer.write(phase=self.phase.name, epoch=epoch, eval=val)
    progress.clear()
    logging.info("[%s] epoch %d val %s", self.phase.name, epoch, summary(val, "val"))
    progress.update(epoch)
    return best

  def _finish(self, state, epoch: int, best: dict, t_phase: float) -> dict:
    extra = {"epochs": epoch}
    params = state.params
    if self.early.on:
      params = dict(params, **best["params"])
      extra.update(best_epoch=int(best["epoch"]), stopped_early=self.early.stopped(best),
                   stop_metric=f"{self.early.model} val {self.early.metric}")
    evals = self.exp.evaluate(params, models=self.evaluated, bias=True)
    if set(MODELS) <= set(self.evaluated):
      evals.update(self.exp.report(params))
    evals.update(extra, seconds=time.time() - t_phase)
    self.writer.write(phase=self.phase.name, epoch=epoch, final=True, eval=evals)
    logging.info("[%s] done after %d epochs%s: test %s", self.phase.name, epoch,
                 f" (best epoch {extra['best_epoch']})" if self.early.on else "",
                 summary(evals, "test"))
    return evals


def summary(evals, split, keys=("HR@50", "NDCG@50", "Recall@20", "NDCG@20")) -> str:
  return "  ".join(f"{m[0].upper()} " + " ".join(f"{k} {evals[m][split][k]:.4f}" for k in keys
                                                   if k in evals[m][split])
                   for m in MODELS if m in evals)
