"""The one train step where teacher and student meet, the epoch around it, and the run schedule.

`make_train_step` returns per-device code with pmap semantics (local batch, local sampling,
`lax.pmean` of gradients); `shard` wraps it as `jax.jit(jax.shard_map(...))` over a 1-D `data`
mesh with the state donated, which is what `jax.pmap` lowers to in current JAX. An epoch is one
jitted `lax.scan` over steps. Warm-up, distillation and the keep-training control are the same
step with different static switches (which models learn, whether the method's loss is on).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from kdrec_jax import ranking, sparse

MODELS = ("teacher", "student")
AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Phase:
  """Static switches of one training phase."""
  name: str
  train: tuple[str, ...]  # which models learn ('teacher', 'student')
  distill: bool           # whether the method's loss (and sampler) is on


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay (decay added to the gradient, as torch's Adam does)."""
  adam = optax.adam(opt_cfg.lr)
  if opt_cfg.weight_decay:
    return optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay), adam)
  return adam


def init_state(key, models, optimizers) -> dict:
  """The train state: both models' params and optimizer states, the step, and method slots."""
  state = {"step": jnp.zeros((), jnp.int32), "snapshot": {}, "method": {}}
  for name, k in zip(MODELS, jax.random.split(key)):
    params = models[name].init(k)
    state[name] = {"params": params, "opt": optimizers[name].init(params)}
  return state


def batching_of(models) -> str:
  """The batching ('pairs' or 'users') that teacher and student share; a clear error if not."""
  kinds = {models[m].batching for m in MODELS}
  if len(kinds) != 1:
    raise ValueError("teacher and student must train on the same batches; got "
                     + ", ".join(f"{m} {models[m].name!r} ({models[m].batching})" for m in MODELS))
  return kinds.pop()


def make_train_step(phase: Phase, models, method, optimizers, train_csr: sparse.DeviceCSR,
                    num_items: int):
  """Per-device `train_step(state, batch, key) -> (state, metrics)`.

  batch: {'user' (int32 [B]), 'pos' (int32 [B], pair batching only), 'index' (int32 [B],
  position in the epoch, for per-example keys), 'weight' (float32 [B], 0 for padding)}.
  Losses are sums over the global batch.
  """
  by_users = batching_of(models) == "users"

  def negatives(m, keys, users, pos_mask):
    if not by_users:  # one uniform unobserved item per pair
      return ranking.uniform_negatives(keys, users, train_csr, num_items)
    # num_negatives draws per positive, uniform over the unobserved items, as a 0/1 mask.
    return ranking.draws_mask(keys, (~pos_mask).astype(jnp.float32),
                              models[m].num_negatives * train_csr.row_lengths[users])[0]

  def train_step(state, batch, key):
    key = jax.random.fold_in(key, state["step"])
    users, weight = batch["user"], batch["weight"]
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, batch["index"])
    k_neg_t, k_neg_s, k_method = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 3))(keys),
                                              1, 0)
    k_neg, k_fwd, pos_mask = {"teacher": k_neg_t, "student": k_neg_s}, {}, None
    if by_users:
      pos_mask = sparse.row_mask(train_csr, users, num_items)
      for m in MODELS:
        k_neg[m], k_fwd[m] = jnp.moveaxis(jax.vmap(jax.random.split)(k_neg[m]), 1, 0)
    negs = {m: negatives(m, k_neg[m], users, pos_mask) for m in MODELS}
    samples = method.sample(state["method"], users, k_method) if phase.distill else None
    if phase.distill and method.cf_negatives is not None:
      negs = method.cf_negatives(samples, negs)
    # Materialise the sampled ids: fused into the embedding gathers, their binary searches would
    # be recomputed for every embedding column.
    negs, samples = jax.lax.optimization_barrier((negs, samples))
    # Per-device sums scaled by the device count: their pmean is the global-batch sum.
    scale = jax.lax.axis_size(AXIS)

    def loss_fn(params):
      # What the losses read: the params (pair models) or one training-mode forward per user.
      out = ({m: models[m].forward(params[m], users, k_fwd[m]) for m in MODELS} if by_users
             else params)
      losses, aux = {}, {}
      for m in MODELS:
        if by_users:
          losses[m] = models[m].cf_loss(out[m], pos_mask, negs[m], weight)
        else:
          losses[m] = models[m].cf_loss(out[m], users, batch["pos"], negs[m], weight)
        aux[f"cf_{m}"] = losses[m]
      if phase.distill:
        kd, kd_aux = method.loss(out, users, weight, samples)
        aux.update(kd_aux)
        for m in MODELS:
          losses[m] = losses[m] + kd[m]
      total = sum(losses[m] for m in phase.train)
      aux.update({f"loss_{m}": losses[m] for m in MODELS})
      return scale * total, aux

    params = {m: state[m]["params"] if m in phase.train
              else jax.lax.stop_gradient(state[m]["params"]) for m in MODELS}
    grads, aux = jax.grad(loss_fn, has_aux=True)(params)
    new_state = dict(state, step=state["step"] + 1)
    # pmean across devices (skipped on one device, where XLA would still copy the tables).
    reduce = (lambda f, x: f(x, AXIS)) if scale > 1 else (lambda f, x: x)
    for m in phase.train:
      g = reduce(jax.lax.pmean, grads[m])
      updates, opt = optimizers[m].update(g, state[m]["opt"], state[m]["params"])
      new_state[m] = {"params": optax.apply_updates(state[m]["params"], updates), "opt": opt}
    metrics = reduce(jax.lax.psum, dict(aux, examples=jnp.sum(weight)))
    return new_state, metrics

  return train_step


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def shard(train_step, mesh):
  """The per-device step as one data-parallel program (pmap semantics)."""
  return jax.shard_map(train_step, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                       out_specs=(P(), P()), check_vma=False)


def p_train_step(train_step, mesh):
  """`jax.jit(jax.shard_map(train_step))` with the state donated: one step on all devices."""
  return jax.jit(shard(train_step, mesh), donate_argnums=0)


def make_epoch(train_step, mesh, num_train: int, batch_size: int):
  """`epoch(state, examples, key) -> (state, metrics)`: a shuffled pass over all `num_train`
  training examples (`examples`: {field: [num_train]}, e.g. {'user', 'pos'} for pairs or {'user'}
  for user batches) as one jitted `lax.scan` of the sharded step. The last batch is padded
  (weight 0)."""
  n_dev = mesh.devices.size
  if batch_size % n_dev:
    raise ValueError(f"batch_size {batch_size} is not divisible by {n_dev} devices")
  steps = -(-num_train // batch_size)

  def scan_steps(state, batches, key):  # per device: this device's slice of every batch
    def body(state, xs):
      batch, t = xs
      return train_step(state, batch, jax.random.fold_in(key, t))
    return jax.lax.scan(body, state, (batches, jnp.arange(steps)))

  sharded_scan = jax.shard_map(scan_steps, mesh=mesh, in_specs=(P(), P(None, AXIS), P()),
                               out_specs=(P(), P()), check_vma=False)

  @functools.partial(jax.jit, donate_argnums=0)
  def epoch(state, examples, key):
    k_perm, k_steps = jax.random.split(key)
    perm = jax.random.permutation(k_perm, num_train)
    pad = steps * batch_size - num_train
    idx = jnp.concatenate([perm, jnp.zeros(pad, perm.dtype)]).astype(jnp.int32)
    batches = {k: v[idx].reshape(steps, batch_size) for k, v in examples.items()}
    batches.update({
        "index": jnp.arange(steps * batch_size, dtype=jnp.int32).reshape(steps, batch_size),
        "weight": (jnp.arange(steps * batch_size) < num_train).astype(jnp.float32
                                                                      ).reshape(steps, batch_size),
    })
    state, metrics = sharded_scan(state, batches, k_steps)
    return state, jax.tree.map(jnp.sum, metrics)

  return epoch, steps


# ----------------------------------------------------------------------------------------------
# The run: warm-up, then distillation and the keep-training control, each resumable.
# ----------------------------------------------------------------------------------------------

def _jsonable(tree):
  def leaf(x):
    if isinstance(x, (str, bool, int, float)) or x is None:
      return x
    return float(x) if np.ndim(x) == 0 else np.asarray(x).tolist()
  return jax.tree.map(leaf, tree)


class MetricWriter:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, **record) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")


def _write_json_atomic(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def phases_for(config) -> list[tuple[Phase, Any]]:
  """The schedule: (phase, its config section) in order."""
  out = [(Phase("warmup", MODELS, False), config.warmup)]
  if config.distill.epochs:
    out.append((Phase("distill", MODELS, True), config.distill))
    if config.control:
      out.append((Phase("control", MODELS, False), config.distill))
  return out


class Experiment:
  """Everything a run needs that does not change between phases: data, models, method, mesh,
  evaluators and the device copies of the training pairs."""

  def __init__(self, config):
    from kdrec_jax import data as kdata
    from kdrec_jax import methods as kmethods
    from kdrec_jax import metrics as kmetrics
    from kdrec_jax import models as kmodels
    self.config = config
    self.data = kdata.load(config.data)
    d = self.data
    self.models = {m: kmodels.make(config[m], d.num_users, d.num_items, data=d) for m in MODELS}
    self.method = kmethods.make(config.method, self.models, d)
    self.mesh = make_mesh(config.num_devices)
    self.train_csr = sparse.DeviceCSR.from_numpy(*d.split("train"))
    if batching_of(self.models) == "users":  # every user with a training row, once per epoch
      users = np.flatnonzero(np.diff(d.split("train")[0])).astype(np.int32)
      self.examples = {"user": jnp.asarray(users)}
    else:
      users, items = d.train_pairs()
      self.examples = {"user": jnp.asarray(users), "pos": jnp.asarray(items)}
    self.num_examples = len(self.examples["user"])
    ev = config.eval
    self.evaluators = {
        split: kmetrics.Evaluator(d, split=split, ks=tuple(ev.ks), chunk_size=ev.chunk_size,
                                  protocol=ev.protocol, num_negatives=ev.num_negatives)
        for split in ("val", "test")}
    self.key = jax.random.key(config.seed)
    self._refresh = jax.jit(self.method.refresh)

  def evaluate(self, state, splits=("val", "test")) -> dict:
    key = jax.random.fold_in(self.key, 7)  # the sampled protocol's negatives: fixed per run
    return {m: {s: self.evaluators[s](self.models[m].score_all, state[m]["params"], key)
                for s in splits} for m in MODELS}

  def refresh(self, snapshot):
    with ranking.x64():
      return self._refresh(snapshot)

  def optimizers(self, phase_cfg):
    return {m: make_optimizer(phase_cfg[m]) for m in MODELS}


def _snapshot(state):
  """Copies of both models' params (copies: the step donates the live ones)."""
  return {m: jax.tree.map(jnp.copy, state[m]["params"]) for m in MODELS}


def _saved(state):
  """The part of the state a checkpoint holds (the method's tables are rebuilt from 'snapshot')."""
  return {k: v for k, v in state.items() if k != "method" and not (k == "snapshot" and not v)}


def _load_teacher(exp: Experiment, state, path: str):
  from kdrec_jax.checkpoint import PhaseCheckpoints
  ckpt = PhaseCheckpoints(os.path.join(path, "checkpoints"), "warmup")
  if ckpt.latest_epoch() is None:
    raise FileNotFoundError(f"teacher_checkpoint: no warm-up checkpoint under {path}/checkpoints")
  like = {"teacher": state["teacher"], "student": state["student"], "step": state["step"]}
  restored = ckpt.restore(like)
  logging.info("Loaded the teacher from %s (warm-up epoch %d).", ckpt.directory,
               ckpt.latest_epoch())
  return restored["teacher"]["params"]


def _finished_warmup(path: str, epochs: int):
  """(checkpoints, results) of the finished `epochs`-epoch warm-up in the workdir `path`."""
  from kdrec_jax.checkpoint import PhaseCheckpoints
  ckpt = PhaseCheckpoints(os.path.join(path, "checkpoints"), "warmup")
  results_path = os.path.join(path, "results.json")
  phases = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      phases = json.load(f).get("phases", {})
  if "warmup" not in phases or ckpt.latest_epoch() != epochs:
    raise FileNotFoundError(f"warmup_from: {path} holds no finished {epochs}-epoch warm-up "
                            f"(results.json phases {sorted(phases)}, latest warm-up checkpoint "
                            f"{ckpt.latest_epoch()})")
  logging.info("Starting from the warm-up in %s (both models).", path)
  return ckpt, phases["warmup"]


def _initial_state(exp: Experiment, phase: Phase, opts, warm_ckpt):
  """A phase's starting state and the models it trains: fresh for the warm-up (with a loaded
  teacher if configured), else the end of warm-up with fresh optimizer states."""
  config = exp.config
  state = init_state(exp.key, exp.models, opts)
  train_models = phase.train
  if phase.name == "warmup" and config.teacher_checkpoint:
    params = _load_teacher(exp, state, config.teacher_checkpoint)
    state["teacher"] = {"params": params, "opt": opts["teacher"].init(params)}
    train_models = ("student",)
  elif phase.name != "warmup":
    like = _saved(init_state(exp.key, exp.models, exp.optimizers(config.warmup)))
    start = warm_ckpt.restore(like, epoch=config.warmup.epochs)
    for m in MODELS:
      state[m] = {"params": start[m]["params"], "opt": opts[m].init(start[m]["params"])}
  if phase.distill:
    state["snapshot"] = _snapshot(state)
  return state, dataclasses.replace(phase, train=train_models)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the whole schedule in `workdir`, resuming from its checkpoints; returns the results.

  Results (also written to `<workdir>/results.json`): for each finished phase ('warmup',
  'distill', 'control'), each model's validation and test metrics at the phase's end.
  `config.max_epochs_per_run` > 0 stops (checkpointed) after that many epochs in this call.
  """
  from kdrec_jax.checkpoint import PhaseCheckpoints
  os.makedirs(workdir, exist_ok=True)
  exp = Experiment(config)
  writer = MetricWriter(workdir)
  results_path = os.path.join(workdir, "results.json")
  results = {"dataset": repr(exp.data), "config": config.to_dict(), "phases": {}}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results["phases"] = json.load(f).get("phases", {})
  logging.info("%s; %d device(s); method %s", exp.data, exp.mesh.devices.size, exp.method.name)
  budget = [config.get("max_epochs_per_run", 0) or None]  # epochs left in this call
  ckpt_root = os.path.join(workdir, "checkpoints")
  if config.get("warmup_from"):  # another workdir's finished warm-up replaces this one's
    warm_ckpt, warm_results = _finished_warmup(config.warmup_from, config.warmup.epochs)
    if "warmup" not in results["phases"]:
      results["phases"]["warmup"] = warm_results
      _write_json_atomic(results_path, results)
  else:
    warm_ckpt = PhaseCheckpoints(ckpt_root, "warmup")

  for phase_index, (phase, pcfg) in enumerate(phases_for(config)):
    if phase.name in results["phases"]:
      continue
    opts = exp.optimizers(pcfg)
    ckpt = PhaseCheckpoints(ckpt_root, phase.name, max_to_keep=config.checkpoint_keep)
    state, phase = _initial_state(exp, phase, opts, warm_ckpt)
    finished = _run_phase(exp, phase, pcfg, opts, state, ckpt, writer, budget,
                          jax.random.fold_in(exp.key, phase_index))
    if not finished:
      logging.info("Stopped after max_epochs_per_run; rerun the command to resume.")
      break
    results["phases"][phase.name] = finished
    _write_json_atomic(results_path, results)
  return results


def _run_phase(exp: Experiment, phase: Phase, pcfg, opts, state, ckpt, writer, budget,
               phase_key):
  """Trains one phase from its latest checkpoint (or `state`); returns its final evaluation, or
  None if the epoch budget ran out first (after checkpointing)."""
  config = exp.config
  epoch = 0
  if ckpt.latest_epoch() is not None:
    epoch = ckpt.latest_epoch()
    state.update(ckpt.restore(_saved(state)))
    logging.info("[%s] resumed at epoch %d from %s", phase.name, epoch, ckpt.directory)
  every = exp.method.refresh_every
  refresh_due = lambda e: e % every == 0 if every else e == 0  # noqa: E731
  if phase.distill and epoch < pcfg.epochs and not refresh_due(epoch):
    state["method"] = exp.refresh(state["snapshot"])  # mid-period resume: same tables as before
  # Place the state as the epoch returns it (replicated on the mesh): one compilation per phase.
  replicated = jax.sharding.NamedSharding(exp.mesh, P())
  state = jax.device_put(state, replicated)
  step_fn = make_train_step(phase, exp.models, exp.method, opts, exp.train_csr,
                            exp.data.num_items)
  run_epoch, _ = make_epoch(step_fn, exp.mesh, exp.num_examples, config.batch_size)
  t_phase = t_log = time.time()
  logged_epoch = epoch
  while epoch < pcfg.epochs:
    if budget[0] is not None and budget[0] <= 0:
      ckpt.save(epoch, _saved(state))
      return None
    if phase.distill and refresh_due(epoch):
      state["snapshot"] = _snapshot(state)
      state["method"] = exp.refresh(state["snapshot"])
      state = jax.device_put(state, replicated)
    state, metrics = run_epoch(state, exp.examples, jax.random.fold_in(phase_key, epoch))
    epoch += 1
    if budget[0] is not None:
      budget[0] -= 1
    if epoch % config.log_every == 0 or epoch == pcfg.epochs:
      metrics = jax.device_get(metrics)  # waits for the queued epochs
      dt = (time.time() - t_log) / (epoch - logged_epoch)
      t_log, logged_epoch = time.time(), epoch
      n = float(metrics["examples"])
      losses = {k: float(v) / n for k, v in metrics.items() if k != "examples"}
      if not all(np.isfinite(v) for v in losses.values()):
        raise FloatingPointError(f"[{phase.name}] epoch {epoch}: non-finite loss {losses}")
      writer.write(phase=phase.name, epoch=epoch, seconds_per_epoch=dt, examples_per_s=n / dt,
                   **losses)
      logging.info("[%s] epoch %d/%d  loss T %.4f S %.4f  %.2f s/epoch  %.0f ex/s", phase.name,
                   epoch, pcfg.epochs, losses["loss_teacher"], losses["loss_student"], dt, n / dt)
    if config.eval_every and epoch % config.eval_every == 0 and epoch < pcfg.epochs:
      val = exp.evaluate(state, splits=("val",))
      writer.write(phase=phase.name, epoch=epoch, eval=val)
      logging.info("[%s] epoch %d val %s", phase.name, epoch, _summary(val, "val"))
    if epoch % config.checkpoint_every == 0 or epoch == pcfg.epochs:
      ckpt.save(epoch, _saved(state))
  if pcfg.epochs == 0:
    ckpt.save(0, _saved(state))
  evals = exp.evaluate(state)
  evals["seconds"] = time.time() - t_phase
  writer.write(phase=phase.name, epoch=epoch, final=True, eval=evals)
  logging.info("[%s] done: test %s", phase.name, _summary(evals, "test"))
  return evals


def _summary(evals, split, keys=("HR@50", "NDCG@50")) -> str:
  return "  ".join(f"{m[0].upper()} " + " ".join(f"{k} {evals[m][split][k]:.4f}" for k in keys
                                                   if k in evals[m][split]) for m in MODELS)
