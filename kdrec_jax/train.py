"""The one train step where teacher and student meet, the epoch around it, and the run schedule.

`make_train_step` returns per-device code with pmap semantics (local batch, local sampling,
`lax.pmean` of gradients); `shard` wraps it as `jax.jit(jax.shard_map(...))` over a 1-D `data`
mesh with the state donated, which is what `jax.pmap` lowers to in current JAX. An epoch is one
jitted `lax.scan` over steps. Warm-up, distillation and the control are the same step with
different static switches: which learners train ('teacher', 'student', 'method') and whether the
method's loss (and sampler) is on. Models that do not learn in a phase are frozen: replicated,
never updated, their own loss not computed, and left out of that phase's checkpoints.

The state is a pytree:
  {'step', 'epoch' (int32), 'hparams' (the method's traced hyperparameters),
   'teacher' | 'student' | 'method': {'params', 'opt' (learners only)},
   'static' (per-phase constants from the frozen teacher), 'cache' (per-refresh tables),
   'carry' (state the step writes), 'snapshot' (params at the last refresh)}
The epoch reaches the step as traced data (`state['epoch']`), so nothing recompiles per epoch.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
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

from kdrec_jax import faults, ranking, sparse
from kdrec_jax.parallel import AXIS

MODELS = ("teacher", "student")


@dataclasses.dataclass(frozen=True)
class Phase:
  """Static switches of one training phase."""
  name: str
  train: tuple[str, ...]  # which learners learn ('teacher', 'student', 'method')
  distill: bool           # whether the method's loss (and sampler) is on


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay (decay added to the gradient, as torch's Adam does)."""
  adam = optax.adam(opt_cfg.lr)
  if opt_cfg.weight_decay:
    return optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay), adam)
  return adam


def init_state(key, models, optimizers, method=None) -> dict:
  """A fresh train state: both models' params (from `key`), optimizer states for the learners in
  `optimizers`, the method's own params if it has any, and empty method slots."""
  state = {"step": jnp.zeros((), jnp.int32), "epoch": jnp.zeros((), jnp.int32), "hparams": {},
           "static": {}, "cache": {}, "carry": {}, "snapshot": {}}
  for name, k in zip(MODELS, jax.random.split(key)):
    state[name] = {"params": models[name].init(k)}
  if method is not None and method.init is not None:
    state["method"] = {"params": method.init(jax.random.fold_in(key, 1))}
  if method is not None and method.init_carry is not None:
    state["carry"] = method.init_carry()
  for name, opt in optimizers.items():
    if name in state:
      state[name]["opt"] = opt.init(state[name]["params"])
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
  position in the epoch, for per-example keys), 'example' (int32 [B], the example's id, optional:
  what BD's pre-drawn samples are indexed by), 'weight' (float32 [B], 0 for padding)}.
  Losses are sums over the global batch.
  """
  by_users = batching_of(models) == "users"
  own = tuple(m for m in MODELS if m in phase.train)  # models whose own loss is computed
  # Models whose outputs a loss reads (user batches run a training-mode forward for each).
  needed = MODELS if phase.distill else own

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
    negs = {m: negatives(m, k_neg[m], users, pos_mask) for m in own}
    ctx = {"user": users, "weight": weight, "neg": negs}
    if not by_users:
      ctx["pos"] = batch["pos"]
    if "example" in batch:
      ctx["example"] = batch["example"]
    samples = None
    if phase.distill and method.sample is not None:
      view = {k: state[k] for k in ("static", "cache", "carry", "hparams", "epoch")}
      samples = method.sample(view, ctx, k_method, jax.random.fold_in(key, 1 << 30))
      if method.cf_negatives is not None:
        negs = method.cf_negatives(samples, negs)
    # Materialise the sampled ids: fused into the embedding gathers, their binary searches would
    # be recomputed for every embedding column.
    negs, samples = jax.lax.optimization_barrier((negs, samples))
    ctx["neg"] = negs
    hp = dict(state["hparams"], epoch=state["epoch"])
    # Per-device sums scaled by the device count: their pmean is the global-batch sum.
    scale = jax.lax.axis_size(AXIS)

    def loss_fn(params):
      # What the losses read: the params, prepared once (pair models; LightGCN: propagated once
      # for all its losses), or one training-mode forward per user.
      out = dict(params)
      if by_users:
        out.update({m: models[m].forward(params[m], users, k_fwd[m]) for m in needed})
      else:
        out.update({m: models[m].prepare(params[m]) for m in needed if m in params})
      losses, aux = {}, {}
      for m in own:
        if by_users:
          losses[m] = models[m].cf_loss(out[m], pos_mask, negs[m], weight)
        else:
          losses[m] = models[m].cf_loss(out[m], users, batch["pos"], negs[m], weight)
        aux[f"cf_{m}"] = losses[m]
      if phase.distill:
        kd, kd_aux = method.loss(out, ctx, samples, hp)
        aux.update(kd_aux)
        for learner, term in kd.items():
          losses[learner] = losses[learner] + term if learner in losses else term
      total = sum(losses[learner] for learner in phase.train if learner in losses)
      aux.update({f"loss_{learner}": losses[learner] for learner in phase.train
                  if learner in losses})
      return scale * total, aux

    frozen = {m: jax.lax.stop_gradient(state[m]["params"])
              for m in (*MODELS, "method") if m in state and m not in phase.train}
    trainable = {learner: state[learner]["params"] for learner in phase.train}
    grads, aux = jax.grad(lambda p: loss_fn({**frozen, **p}), has_aux=True)(trainable)
    new_state = dict(state, step=state["step"] + 1)
    # pmean across devices (skipped on one device, where XLA would still copy the tables).
    reduce = (lambda f, x: f(x, AXIS)) if scale > 1 else (lambda f, x: x)
    for learner in phase.train:
      g = reduce(jax.lax.pmean, grads[learner])
      updates, opt = optimizers[learner].update(g, state[learner]["opt"],
                                                state[learner]["params"])
      new_state[learner] = {"params": optax.apply_updates(state[learner]["params"], updates),
                            "opt": opt}
    if phase.distill and method.update_carry is not None:
      new_state["carry"] = method.update_carry(state["carry"], ctx, samples)
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
  """`epoch(state, examples, key, epoch_index=0) -> (state, metrics)`: a shuffled pass over all
  `num_train` training examples (`examples`: {field: [num_train]}, e.g. {'user', 'pos'} for pairs
  or {'user'} for user batches) as one jitted `lax.scan` of the sharded step. The last batch is
  padded (weight 0). `epoch_index` (traced) becomes `state['epoch']` for the step."""
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
  def epoch(state, examples, key, epoch_index=0):
    state = dict(state, epoch=jnp.asarray(epoch_index, jnp.int32))
    k_perm, k_steps = jax.random.split(key)
    perm = jax.random.permutation(k_perm, num_train)
    pad = steps * batch_size - num_train
    idx = jnp.concatenate([perm, jnp.zeros(pad, perm.dtype)]).astype(jnp.int32)
    batches = {k: v[idx].reshape(steps, batch_size) for k, v in examples.items()}
    batches.update({
        "index": jnp.arange(steps * batch_size, dtype=jnp.int32).reshape(steps, batch_size),
        "example": idx.reshape(steps, batch_size),
        "weight": (jnp.arange(steps * batch_size) < num_train).astype(jnp.float32
                                                                      ).reshape(steps, batch_size),
    })
    state, metrics = sharded_scan(state, batches, k_steps)
    return state, jax.tree.map(jnp.sum, metrics)

  return epoch, steps


# ----------------------------------------------------------------------------------------------
# The run: warm-up, then distillation and the control, each resumable, with early stopping.
# ----------------------------------------------------------------------------------------------

def _jsonable(tree):
  """Plain JSON values: arrays as lists, NaN (an undefined mean, e.g. a popularity group without
  held-out items) as null."""
  def leaf(x):
    if isinstance(x, (str, bool, int)) or x is None:
      return x
    if np.ndim(x) == 0:
      x = float(x)
      return None if np.isnan(x) else x
    return [None if isinstance(v, float) and np.isnan(v) else v
            for v in np.asarray(x).tolist()]
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
  """Writes `obj` to `path` via a temporary file and a rename (process 0 only: in a multi-host
  run the others compute the same values and only read)."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_jsonable(obj), f, indent=2, sort_keys=True, allow_nan=False)
  faults.point("results")  # written, not yet in place
  os.replace(tmp, path)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
  """A live progress line for a phase: rewritten in place on a terminal, an updating line in a
  notebook, nothing when stderr is piped to a file (the log lines say it all there)."""

  def __init__(self, phase: str, total: int, start: int):
    import sys
    self.phase, self.total, self.start, self.t0 = phase, total, start, time.time()
    self.text, self.handle, self.stream = "", None, sys.stderr
    self.mode = "tty" if getattr(sys.stderr, "isatty", lambda: False)() else None
    if self.mode is None and "ipykernel" in sys.modules:
      try:  # only inside a running kernel (ipykernel may merely be imported)
        from IPython import display, get_ipython
        if getattr(get_ipython(), "kernel", None) is not None:
          self.handle = display.display(display.Pretty(""), display_id=True)
          self.mode = "notebook" if self.handle is not None else None
      except Exception:  # noqa: BLE001 - no display: no progress line
        self.mode = None

  def eta(self, epoch: int) -> float:
    done = epoch - self.start
    return (time.time() - self.t0) / done * (self.total - epoch) if done > 0 else float("nan")

  def update(self, epoch: int, text: str | None = None) -> None:
    if text is not None:
      self.text = text
    if self.mode is None:
      return
    frac = epoch / max(self.total, 1)
    bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
    eta = self.eta(epoch)
    line = (f"[{self.phase}] {bar} {epoch}/{self.total} epochs  {self.text}"
            + (f"  {_duration(eta)} left" if np.isfinite(eta) else ""))
    if self.mode == "tty":
      self.stream.write("\r" + line + "\x1b[K")
      self.stream.flush()
    else:
      from IPython import display
      self.handle.update(display.Pretty(line))

  def clear(self) -> None:
    """Before a log line: the terminal's progress line is erased (it is redrawn after)."""
    if self.mode == "tty":
      self.stream.write("\r\x1b[K")
      self.stream.flush()


def params_hash(tree) -> str:
  """sha256 of a params pytree's leaves (dtype, shape and bytes, in tree order)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    a = np.ascontiguousarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def warmup_models(config, method) -> tuple[str, ...]:
  """The models the warm-up trains alone: `config.warmup.models`, else both for methods that
  train the teacher (BD) and the teacher only for teacher->student methods; a teacher loaded
  with `teacher_init` is not trained."""
  models = tuple(config.warmup.get("models", ()) or
                 (("teacher",) if method.teacher_to_student else MODELS))
  if set(models) - set(MODELS):
    raise ValueError(f"warmup.models must be a subset of {MODELS}, got {models}")
  if _teacher_init(config):
    models = tuple(m for m in models if m != "teacher")
  return models


def phases_for(config, method) -> list[tuple[Phase, Any]]:
  """The schedule: (phase, its config section) in order. The control trains the distillation
  phase's models from the same start without the method (for teacher->student methods: the
  student alone from scratch, i.e. the no-KD student)."""
  out = [(Phase("warmup", warmup_models(config, method), False), config.warmup)]
  if config.distill.epochs:
    out.append((Phase("distill", tuple(method.learners), True), config.distill))
    if config.control:
      out.append((Phase("control", tuple(m for m in method.learners if m in MODELS), False),
                  config.distill))
  return out


def _teacher_init(config) -> str:
  return config.get("teacher_init", "") or ""


class Experiment:
  """Everything a run needs that does not change between phases: data, models, method, mesh,
  evaluators and the device copies of the training examples."""

  def __init__(self, config, data=None):
    """`data`: an `Interactions` to use instead of loading `config.data` (benchmarks)."""
    from kdrec_jax import data as kdata
    from kdrec_jax import methods as kmethods
    from kdrec_jax import metrics as kmetrics
    from kdrec_jax import models as kmodels
    self.config = config
    self.data = kdata.load(config.data) if data is None else data
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
    # Popularity groups for the phase-end bias metrics (eval.popularity_groups, 0 = off).
    self.item_groups = None
    num_groups = int(ev.get("popularity_groups", 4) or 0)
    if num_groups and ev.protocol == "full":
      self.item_groups = kmetrics.popularity_groups(*d.split("train"), d.num_items, num_groups)
    elif num_groups:
      logging.warning("eval.popularity_groups: bias metrics need the full protocol; off.")
    self.evaluators = {
        split: kmetrics.Evaluator(d, split=split, ks=tuple(ev.ks), chunk_size=ev.chunk_size,
                                  protocol=ev.protocol, num_negatives=ev.num_negatives,
                                  exclude_other=ev.get("exclude_other", True),
                                  average=ev.get("average", "heldout"),
                                  item_groups=self.item_groups)
        for split in ("val", "test")}
    self.key = jax.random.key(config.seed)
    self._refresh = jax.jit(self.method.refresh) if self.method.refresh else None
    self._prepare = jax.jit(self.method.prepare) if self.method.prepare else None

  def evaluate(self, state, splits=("val", "test"), models=MODELS, bias: bool = False) -> dict:
    """{model: {split: metrics}}; `bias` adds the per-popularity-group metrics (phase ends)."""
    from kdrec_jax import metrics as kmetrics  # as in __init__
    key = jax.random.fold_in(self.key, 7)  # the sampled protocol's negatives: fixed per run
    evaluators = {s: self.evaluators[s] for s in splits}  # scored once for all splits
    return {m: kmetrics.evaluate_splits(evaluators, self.models[m].score_all,
                                        state[m]["params"], key, bias=bias) for m in models}

  def student_beats_teacher(self, state, num_bins: int = 4) -> dict:
    """BD's motivating observation, measured: the share of test users whose held-out item the
    student ranks strictly above the teacher does (best held-out rank, i.e. per-user MRR), over
    all users and by user activity (`num_bins` quantile bins of training interactions)."""
    ev = self.evaluators["test"]
    key = jax.random.fold_in(self.key, 7)
    mrr = {m: ev.per_user(self.models[m].score_all, state[m]["params"], key)["MRR"]
           for m in MODELS}
    better = mrr["student"] > mrr["teacher"]
    activity = np.diff(self.data.split("train")[0])[ev.users]
    edges = np.unique(np.quantile(activity, np.linspace(0, 1, num_bins + 1)).round())
    bins = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
      last = i == len(edges) - 2
      sel = (activity >= lo) & ((activity <= hi) if last else (activity < hi))
      if sel.any():
        bins.append({"range": [int(lo), int(hi)], "share": float(better[sel].mean()),
                     "users": int(sel.sum())})
    return {"overall": float(better.mean()), "ties": float((mrr["student"] == mrr["teacher"]
                                                              ).mean()),
            "users": int(len(better)), "by_activity": bins}

  def group_summary(self) -> dict | None:
    """The popularity groups of the bias metrics: counts of items and training interactions."""
    if self.item_groups is None:
      return None
    g = self.item_groups
    n = int(g.max()) + 1
    pop = self.data.item_popularity
    return {"asked": int(self.config.eval.get("popularity_groups", 4)), "num_groups": n,
            "items": np.bincount(g[g >= 0], minlength=n).tolist(),
            "interactions": np.bincount(g[g >= 0], weights=pop[g >= 0],
                                        minlength=n).astype(int).tolist()}

  def refresh(self, static, params, carry, key, epoch):
    """The method's (cache, carry) for `epoch` (jitted, traced epoch)."""
    with ranking.x64():
      return self._refresh(static, params, carry, key, jnp.int32(epoch))

  def prepare(self, teacher_params):
    if self._prepare is None:
      return {}
    with ranking.x64():
      return self._prepare(teacher_params)

  def hparams(self) -> dict:
    return {k: jnp.float32(v) for k, v in self.method.hparams.items()}

  def optimizers(self, phase_cfg, learners=(*MODELS, "method")):
    """Optimizers for `learners` (the method's own networks use `phase_cfg.method`, default the
    student's settings)."""
    def cfg(learner):
      if learner == "method":
        return phase_cfg.get("method", None) or phase_cfg.student
      return phase_cfg[learner]
    return {learner: make_optimizer(cfg(learner)) for learner in learners}


# ---------------------------------------------------------------------------------------------
# Early stopping: evaluation every `eval_every` epochs, best state kept, test at the best epoch.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EarlyStop:
  """Stops a phase after `patience` validations without improvement of `metric` of `model`."""
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

  def init(self, state, phase: Phase) -> dict:
    if not self.on:
      return {}
    return {"params": {x: jax.tree.map(jnp.copy, state[x]["params"]) for x in phase.train},
            "epoch": jnp.int32(0), "value": jnp.float32(-np.inf), "bad": jnp.int32(0)}

  def update(self, best: dict, val: dict, state, phase: Phase, epoch: int) -> dict:
    value = val[self.model]["val"][self.metric]
    if value > float(best["value"]):
      return {"params": {x: jax.tree.map(jnp.copy, state[x]["params"]) for x in phase.train},
              "epoch": jnp.int32(epoch), "value": jnp.float32(value), "bad": jnp.int32(0)}
    return dict(best, bad=best["bad"] + 1)

  def stopped(self, best: dict) -> bool:
    return self.on and int(best["bad"]) >= self.patience


def _saved(state, phase: Phase, best: dict) -> dict:
  """What a phase's checkpoint holds: the step, its learners (params and optimizer states), the
  snapshot and carry if any, and the early-stopping record. Frozen models are left out; the
  method's static lists and cache are rebuilt from the teacher and the snapshot."""
  out = {"step": state["step"]}
  out.update({learner: state[learner] for learner in phase.train})
  for k in ("snapshot", "carry"):
    if state.get(k):
      out[k] = state[k]
  if best:
    out["best"] = best
  return out


def _phase_result_params(path: str, phase: str) -> dict:
  """{learner: params} a finished phase in workdir `path` ended with (its best state when it
  stopped early), read from its latest checkpoint as saved."""
  from kdrec_jax.checkpoint import PhaseCheckpoints
  ckpt = PhaseCheckpoints(os.path.join(path, "checkpoints"), phase)
  raw = ckpt.restore_raw()
  if "best" in raw:
    return dict(raw["best"]["params"])
  return {k: v["params"] for k, v in raw.items() if isinstance(v, dict) and "params" in v}


def _finished_phases(path: str) -> dict:
  results_path = os.path.join(path, "results.json")
  if not os.path.exists(results_path):
    return {}
  with open(results_path) as f:
    return json.load(f).get("phases", {})


def _finished_warmup(path: str, epochs: int):
  """(params, results) of the finished `epochs`-epoch warm-up in the workdir `path`."""
  from kdrec_jax.checkpoint import PhaseCheckpoints
  ckpt = PhaseCheckpoints(os.path.join(path, "checkpoints"), "warmup")
  phases = _finished_phases(path)
  done = "warmup" in phases and (ckpt.latest_epoch() == epochs
                                 or phases["warmup"].get("stopped_early"))
  if not done:
    raise FileNotFoundError(f"warmup_from: {path} holds no finished {epochs}-epoch warm-up "
                            f"(results.json phases {sorted(phases)}, latest warm-up checkpoint "
                            f"{ckpt.latest_epoch()})")
  logging.info("Starting from the warm-up in %s.", path)
  return _phase_result_params(path, "warmup"), phases["warmup"]


def load_teacher(path: str, like):
  """The teacher's params from `path`: a workdir with a finished warm-up that trained the teacher
  (its best state if it stopped early), or a params directory written by
  `checkpoint.save_params`. Checked against the structure of `like`."""
  from kdrec_jax import checkpoint
  from kdrec_jax.checkpoint import PhaseCheckpoints
  if os.path.isdir(os.path.join(path, "checkpoints")):
    phases = _finished_phases(path)
    if "warmup" not in phases:
      raise FileNotFoundError(f"teacher_init: {path} has no finished warm-up (results.json "
                              f"phases {sorted(phases)})")
    trained = PhaseCheckpoints(os.path.join(path, "checkpoints"), "warmup").latest_epoch()
    params = (_phase_result_params(path, "warmup").get("teacher") if trained is not None
              else None)
    if params is None:
      raise FileNotFoundError(f"teacher_init: the warm-up in {path} did not train a teacher")
  elif checkpoint.is_params_dir(path):
    params = checkpoint.load_params(path)
  else:
    raise FileNotFoundError(f"teacher_init: {path} is neither a workdir (no checkpoints/) nor a "
                            "params directory (see kdrec_jax.checkpoint.save_params)")
  want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), like)
  got = jax.tree.map(lambda x: (tuple(np.shape(x)), str(np.asarray(x).dtype)), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ValueError(f"teacher_init: the params in {path} do not fit the configured teacher "
                     f"(expected {want}, found {got})")
  return jax.tree.map(jnp.asarray, params)


def _check_teacher(workdir: str, source: str, params) -> dict:
  """Records which frozen teacher this workdir distils from; a different one is an error."""
  record = {"source": source, "sha256": params_hash(params)}
  path = os.path.join(workdir, "teacher.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old["sha256"] != record["sha256"]:
      raise WorkdirError(f"{workdir} was distilled from the teacher {old['source']} (sha256 "
                       f"{old['sha256'][:12]}...), but this run's teacher is {source} (sha256 "
                       f"{record['sha256'][:12]}...); use a new workdir")
  else:
    _write_json_atomic(path, record)
  return record


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked: busy, or written by another config or teacher."""


# Config keys that only steer a run (how long a call runs, logging, checkpoint cadence, the
# device count, chunk sizes, where the data and teacher live); the data and the teacher are
# checked by content instead. Any other difference refuses a resume.
STEERING_KEYS = frozenset({
    "max_epochs_per_run", "num_devices", "log_every", "checkpoint_every", "checkpoint_keep",
    "eval.chunk_size", "teacher_init", "force_resume", "data.path", "data.url", "data.cache_dir",
    "data.train", "data.val", "data.test", "method.refresh_chunk", "method.list_chunk"})


def _flat(tree, prefix="") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def data_hash(data) -> str:
  """sha256 of a dataset's sizes and its three CSR splits."""
  h = hashlib.sha256(f"{data.num_users} {data.num_items}".encode())
  for split in ("train", "val", "test"):
    for a in data.split(split):
      h.update(np.ascontiguousarray(a, np.int64).tobytes())
  return h.hexdigest()


def provenance(exp) -> dict:
  """What produced a result: library, JAX and Python versions, the devices, the data's content
  hash and the source revision when it is a git checkout."""
  import importlib.metadata
  import platform
  import subprocess
  try:
    version = importlib.metadata.version("kdrec_jax")
  except importlib.metadata.PackageNotFoundError:
    version = "source"
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                            capture_output=True, text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  devices = exp.mesh.devices.flatten().tolist()
  return {"kdrec_jax": version, "git_commit": commit, "jax": jax.__version__,
          "python": platform.python_version(), "backend": jax.default_backend(),
          "devices": [d.device_kind for d in devices], "processes": jax.process_count(),
          "host": platform.node(),
          "data_sha256": data_hash(exp.data)}


def check_config(workdir: str, config, data) -> list[str]:
  """Records the config (less the steering keys) and the data's hash in `<workdir>/config.json`
  on a fresh workdir; on a resume, refuses (WorkdirError, naming the differing keys) a different
  one, unless `config.force_resume`, which records the new one and returns the differences."""
  path = os.path.join(workdir, "config.json")
  record = {"config": {k: v for k, v in _flat(config.to_dict()).items()
                       if k not in STEERING_KEYS},
            "data_sha256": data_hash(data)}
  diffs = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    # Keys in only one of the two come from a library version that added or removed them.
    keys = sorted(set(old["config"]) & set(record["config"]))
    diffs = [f"{k}: {old['config'][k]!r} -> {record['config'][k]!r}"
             for k in keys if old["config"][k] != _jsonable(record["config"][k])]
    if old["data_sha256"] != record["data_sha256"]:
      diffs.append("the data (its content hash differs)")
    if diffs and not config.get("force_resume", False):
      raise WorkdirError(f"{workdir} was written by another config ({'; '.join(diffs)}); use a "
                         "new workdir, or --config.force_resume=True to continue with this one")
    if not diffs:
      return []
    logging.warning("force_resume: continuing %s with a changed config: %s", workdir,
                    "; ".join(diffs))
  elif os.path.exists(os.path.join(workdir, "checkpoints")):
    logging.warning("%s has checkpoints but no config.json (an older workdir): resuming without "
                    "a config check", workdir)
  _write_json_atomic(path, record)
  return diffs


class _WorkdirLock:
  """An exclusive lock on `<workdir>/.lock` for one run's lifetime (released by the OS when the
  process dies, so a killed run never leaves the workdir locked)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")

  def __enter__(self):
    import fcntl
    self.file = open(self.path, "a+")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self.file.seek(0)
      owner = self.file.read().strip() or "another process"
      self.file.close()
      raise WorkdirError(f"{os.path.dirname(self.path)} is in use by a running run ({owner}); "
                         "wait for it or use another workdir") from None
    self.file.seek(0)
    self.file.truncate()
    self.file.write(f"pid {os.getpid()}\n")
    self.file.flush()
    return self

  def __exit__(self, *exc):
    self.file.close()


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the whole schedule in `workdir`, resuming from its checkpoints; returns the results.

  The workdir is locked for the call (a second run on it is refused) and its config checked
  against the one that started it (`check_config`).

  Results (also written to `<workdir>/results.json`): for each finished phase ('warmup',
  'distill', 'control'), the validation and test metrics of its models at the phase's end (at
  the best validation epoch when the phase stops early), with the popularity-bias metrics
  (`metrics.group_metrics`: Recall@K/g, NDCG@K/g, Share@K/g for the `eval.popularity_groups`
  groups of `metrics.popularity_groups`, described under 'popularity_groups'); the per-epoch
  validations leave them out. `config.max_epochs_per_run` > 0 stops (checkpointed) after that
  many epochs in this call.
  """
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:  # multi-host: process 0 holds the lock and writes for all
    return _train_and_evaluate(config, workdir)
  with _WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
  from kdrec_jax.checkpoint import PhaseCheckpoints
  exp = Experiment(config)
  forced = check_config(workdir, config, exp.data)
  writer = MetricWriter(workdir)
  results_path = os.path.join(workdir, "results.json")
  t_call = time.time()
  results = {"dataset": repr(exp.data), "config": config.to_dict(), "phases": {},
             "provenance": provenance(exp)}
  if exp.item_groups is not None:
    results["popularity_groups"] = exp.group_summary()
  if os.path.exists(results_path):
    with open(results_path) as f:
      old = json.load(f)
    results["phases"] = old.get("phases", {})
    for key in ("teacher", "forced_resumes", "wall_seconds"):
      if key in old:
        results[key] = old[key]
  if forced:
    results.setdefault("forced_resumes", []).append(forced)
  logging.info("%s; %d device(s); method %s", exp.data, exp.mesh.devices.size, exp.method.name)
  budget = [config.get("max_epochs_per_run", 0) or None]  # epochs left in this call
  ckpt_root = os.path.join(workdir, "checkpoints")
  teacher_path = _teacher_init(config)
  loaded = {}  # model -> (params, source) from outside this workdir's warm-up
  if teacher_path:
    like = exp.models["teacher"].init(jax.random.key(0))
    loaded["teacher"] = (load_teacher(teacher_path, like), teacher_path)
    logging.info("Teacher loaded from %s.", teacher_path)
  if config.get("warmup_from"):  # another workdir's finished warm-up replaces this one's
    params, warm_results = _finished_warmup(config.warmup_from, config.warmup.epochs)
    for m, p in params.items():
      if m in MODELS:
        loaded.setdefault(m, (p, f"{config.warmup_from} (warm-up)"))
    if "warmup" not in results["phases"]:
      results["phases"]["warmup"] = warm_results
      _write_json_atomic(results_path, results)

  for phase_index, (phase, pcfg) in enumerate(phases_for(config, exp.method)):
    if phase.name in results["phases"]:
      continue
    starts = {m: p for m, (p, _) in loaded.items()}
    if phase.name != "warmup" and not config.get("warmup_from"):
      trained = phases_for(config, exp.method)[0][0].train
      if trained:
        params = _phase_result_params(workdir, "warmup")
        starts.update({m: params[m] for m in trained})
    opts = exp.optimizers(pcfg, phase.train)
    state = _initial_state(exp, phase, opts, starts)
    if phase.name != "warmup" and "teacher" not in phase.train:
      source = loaded.get("teacher", (None, f"{workdir} (warm-up)"))[1]
      results["teacher"] = _check_teacher(workdir, source, state["teacher"]["params"])
    ckpt = PhaseCheckpoints(ckpt_root, phase.name, max_to_keep=config.checkpoint_keep)
    # Evaluated: the phase's models, and a teacher that is not a fresh init (for reference).
    evaluated = tuple(m for m in MODELS if m in phase.train or m in starts)
    finished = _run_phase(exp, phase, pcfg, opts, state, ckpt, writer, budget,
                          jax.random.fold_in(exp.key, phase_index), evaluated)
    if finished:
      results["phases"][phase.name] = finished
    # Wall time of all calls so far (compilation, training, evaluation, checkpoints).
    results["wall_seconds"] = results.get("wall_seconds", 0.0) + time.time() - t_call
    t_call = time.time()
    _write_json_atomic(results_path, results)
    if not finished:
      logging.info("Stopped after max_epochs_per_run; rerun the command to resume.")
      break
  return results


def _initial_state(exp: Experiment, phase: Phase, opts, starts: dict):
  """A phase's starting state: fresh params from the run's key (the student of a
  teacher->student method starts from scratch), replaced by `starts` ({model: params}: a loaded
  teacher, the warm-up's results), with fresh optimizer states for the learners."""
  state = init_state(exp.key, exp.models, {}, exp.method if phase.distill else None)
  for m, params in starts.items():
    state[m] = {"params": jax.tree.map(jnp.array, params)}  # copies: the epoch donates them
  for learner, opt in opts.items():
    state[learner]["opt"] = opt.init(state[learner]["params"])
  return state


def _refresh(exp: Experiment, phase: Phase, state, key, epoch: int, resume: bool = False):
  """Rebuilds the method's cache for `epoch` (a refresh epoch). On a mid-period resume the cache
  is recomputed from the checkpointed snapshot (same inputs, same tables) and the carry kept.
  Returns the refresh's statistics (the cache's 'metrics', taken out of it), or None."""
  method = exp.method
  if not resume:
    snap = {m: jax.tree.map(jnp.copy, state[m]["params"])
            for m in method.refresh_reads if m in phase.train}
    if state["carry"]:
      snap["carry"] = jax.tree.map(jnp.copy, state["carry"])
    state["snapshot"] = snap if method.refresh_every != 1 else {}
  else:
    snap = state["snapshot"]
  params = {m: snap[m] if m in snap else state[m]["params"] for m in method.refresh_reads}
  cache, carry = exp.refresh(state["static"], params, snap.get("carry", state["carry"]),
                             jax.random.fold_in(key, epoch), epoch)
  stats = cache.pop("metrics", None)  # per-refresh statistics: logged, not carried by the step
  state["cache"] = cache
  if not resume:
    state["carry"] = carry
  return stats


def _run_phase(exp: Experiment, phase: Phase, pcfg, opts, state, ckpt, writer, budget,
               phase_key, evaluated=MODELS):
  """Trains one phase from its latest checkpoint (or `state`); returns the final evaluation of
  the `evaluated` models, or None if the epoch budget ran out first (after checkpointing)."""
  config, method = exp.config, exp.method
  early = EarlyStop.of(pcfg, phase, config)
  best = early.init(state, phase)
  every = method.refresh_every
  uses_refresh = phase.distill and method.refresh is not None
  if uses_refresh and every != 1:  # the structure a checkpoint's snapshot has
    state["snapshot"] = {m: state[m]["params"] for m in method.refresh_reads if m in phase.train}
    if state["carry"]:
      state["snapshot"]["carry"] = state["carry"]
  epoch, restored = ckpt.restore_latest(_saved(state, phase, best))
  if restored is None:
    epoch = 0
  else:
    best = restored.pop("best", best)
    state.update(restored)
    logging.info("[%s] resumed at epoch %d from %s", phase.name, epoch, ckpt.directory)
  if not phase.train:  # nothing to train (e.g. the warm-up of a loaded teacher)
    evals = exp.evaluate(state, models=evaluated, bias=True)
    writer.write(phase=phase.name, epoch=0, final=True, eval=evals)
    return dict(evals, seconds=0.0, epochs=0)
  refresh_due = lambda e: e % every == 0 if every else e == 0  # noqa: E731
  refresh_key = jax.random.fold_in(phase_key, 1 << 30)
  if phase.distill:
    state["hparams"] = exp.hparams()
    state["static"] = exp.prepare(state["teacher"]["params"])
    if uses_refresh and epoch < pcfg.epochs and not refresh_due(epoch):
      last = epoch - epoch % every if every else 0
      _refresh(exp, phase, state, refresh_key, last, resume=True)
  # Place the state as the epoch returns it (replicated on the mesh): one compilation per phase.
  replicated = jax.sharding.NamedSharding(exp.mesh, P())
  state = jax.device_put(state, replicated)
  step_fn = make_train_step(phase, exp.models, method, opts, exp.train_csr, exp.data.num_items)
  run_epoch, _ = make_epoch(step_fn, exp.mesh, exp.num_examples, config.batch_size)
  t_phase = t_log = time.time()
  logged_epoch = epoch
  progress = Progress(phase.name, pcfg.epochs, epoch)
  while epoch < pcfg.epochs and not early.stopped(best):
    if budget[0] is not None and budget[0] <= 0:
      progress.clear()
      ckpt.save(epoch, _saved(state, phase, best))
      return None
    if uses_refresh and refresh_due(epoch):
      stats = _refresh(exp, phase, state, refresh_key, epoch)
      if stats is not None:
        writer.write(phase=phase.name, epoch=epoch, refresh=jax.device_get(stats))
      state = jax.device_put(state, replicated)
    state, metrics = run_epoch(state, exp.examples, jax.random.fold_in(phase_key, epoch), epoch)
    faults.point("epoch")  # the epoch is dispatched and running
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
        last = ckpt.latest_epoch()
        raise FloatingPointError(
            f"[{phase.name}] epoch {epoch}: non-finite loss {losses}; the last good checkpoint "
            "is " + (os.path.join(ckpt.directory, str(last)) if last is not None else
                     "none (the phase has not saved one yet)"))
      writer.write(phase=phase.name, epoch=epoch, seconds_per_epoch=dt, examples_per_s=n / dt,
                   **losses)
      loss_text = " ".join(f"{x[0].upper()} {losses[f'loss_{x}']:.4f}" for x in phase.train
                           if f"loss_{x}" in losses)
      progress.clear()
      logging.info("[%s] epoch %d/%d  loss %s  %.2f s/epoch  %.0f ex/s  ~%s left", phase.name,
                   epoch, pcfg.epochs, loss_text, dt, n / dt,
                   _duration(dt * (pcfg.epochs - epoch)))
      progress.update(epoch, f"loss {loss_text}  {n / dt:.0f} ex/s")
    else:
      progress.update(epoch)
    if config.eval_every and epoch % config.eval_every == 0 and (epoch < pcfg.epochs
                                                                 or early.on):
      val = exp.evaluate(state, splits=("val",), models=tuple(m for m in MODELS
                                                              if m in phase.train))
      faults.point("eval")
      if early.on:
        best = early.update(best, val, state, phase, epoch)
      writer.write(phase=phase.name, epoch=epoch, eval=val)
      progress.clear()
      logging.info("[%s] epoch %d val %s", phase.name, epoch, _summary(val, "val"))
      progress.update(epoch)
    if (epoch % config.checkpoint_every == 0 or epoch == pcfg.epochs
        or early.stopped(best)):
      ckpt.save(epoch, _saved(state, phase, best))
  progress.clear()
  if pcfg.epochs == 0:
    ckpt.save(0, _saved(state, phase, best))
  extra = {"epochs": epoch}
  if early.on:
    state = dict(state, **{x: {"params": best["params"][x]} for x in phase.train})
    extra.update(best_epoch=int(best["epoch"]), stopped_early=early.stopped(best),
                 stop_metric=f"{early.model} val {early.metric}")
  evals = exp.evaluate(state, models=evaluated, bias=True)
  if set(MODELS) <= set(evaluated):
    evals["student_beats_teacher"] = exp.student_beats_teacher(state)
  evals.update(extra, seconds=time.time() - t_phase)
  writer.write(phase=phase.name, epoch=epoch, final=True, eval=evals)
  logging.info("[%s] done after %d epochs%s: test %s", phase.name, epoch,
               f" (best epoch {extra['best_epoch']})" if early.on else "",
               _summary(evals, "test"))
  return evals


def _summary(evals, split, keys=("HR@50", "NDCG@50", "Recall@20", "NDCG@20")) -> str:
  return "  ".join(f"{m[0].upper()} " + " ".join(f"{k} {evals[m][split][k]:.4f}" for k in keys
                                                   if k in evals[m][split])
                   for m in MODELS if m in evals)
