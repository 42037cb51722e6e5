"""The one train step where teacher and student meet, the epoch around it, and the device mesh.

`make_train_step` returns per-device code with pmap semantics (local batch, local sampling,
`lax.pmean` of gradients); `shard` wraps it as `jax.jit(jax.shard_map(...))` over a 1-D `data`
mesh with the state donated, which is what `jax.pmap` lowers to in current JAX. An epoch is one
jitted `lax.scan` over steps (`make_epoch`). Warm-up, distillation and the control are the same
step with different static switches (`Phase`): which learners train ('teacher', 'student',
'method') and whether the method's loss (and sampler) is on. Models that do not learn in a phase
are frozen: their params are read under `stop_gradient`, never updated, their own loss is not
computed. What one example is (a pair, a user) is the models' business (`Model.batching`); the
step never asks.
"""
from __future__ import annotations

import dataclasses
import functools
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from kdrec_jax import parallel, sparse
from kdrec_jax.parallel import AXIS

MODELS = ("teacher", "student")


@dataclasses.dataclass(frozen=True)
class Phase:
  """Static switches of one training phase."""
  name: str
  train: tuple[str, ...]  # which learners learn ('teacher', 'student', 'method')
  distill: bool           # whether the method's loss (and sampler) is on


@flax.struct.dataclass
class TrainState:
  """The train state, one pytree, updated functionally (`state.replace(...)`).

  step, epoch: int32 scalars (the epoch reaches the step as traced data: nothing recompiles per
    epoch). params: {'teacher', 'student'[, 'method']: params}; opt: {learner: optimizer state}
    for the phase's learners only. hparams: the method's traced hyperparameters. static:
    per-phase constants from the frozen teachers (`Method.prepare`); cache: per-refresh state
    (`Method.refresh`); carry: state the step writes (`Method.update_carry`); snapshot: the
    learners' params (and carry) at the last refresh, from which the cache is rebuilt on resume.
  """
  step: jax.Array
  epoch: jax.Array
  params: dict
  opt: dict
  hparams: dict
  static: dict
  cache: dict
  carry: dict
  snapshot: dict


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay (decay added to the gradient, as torch's Adam does)."""
  adam = optax.adam(opt_cfg.lr)
  if opt_cfg.weight_decay:
    return optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay), adam)
  return adam


def init_state(key, models, optimizers, method=None) -> TrainState:
  """A fresh train state: both models' params (from `key`), optimizer states for the learners in
  `optimizers`, the method's own params if it has any, and empty method slots."""
  params = {name: models[name].init(k) for name, k in zip(MODELS, jax.random.split(key))}
  if method is not None and method.init is not None:
    params["method"] = method.init(jax.random.fold_in(key, 1))
  carry = method.init_carry() if method is not None and method.init_carry is not None else {}
  return TrainState(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
                    params=params,
                    opt={n: opt.init(params[n]) for n, opt in optimizers.items() if n in params},
                    hparams={}, static={}, cache={}, carry=carry, snapshot={})


def batching_of(models):
  """The `Batching` that teacher and student share; a clear error if they do not."""
  kinds = {models[m].batching.kind: models[m].batching for m in MODELS}
  if len(kinds) != 1:
    raise ValueError("teacher and student must train on the same batches; got "
                     + ", ".join(f"{m} {models[m].name!r} ({models[m].batching.kind})"
                                 for m in MODELS))
  return kinds.popitem()[1]


def _example_keys(key, index):
  """Per-example keys (so draws do not depend on how the batch is split over devices): the
  teacher's and student's negative-sampling keys and the method's, each [B]."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
  return jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0)


def _batch_view(batching, batch, train_csr, num_items):
  """What the losses and the method see of a batch: {'user', 'weight', 'example' (if any),
  'global' (the global-batch helpers)} plus the batching's context; the step adds 'neg'."""
  ctx = {"user": batch["user"], "weight": batch["weight"], "global": parallel.GLOBAL}
  ctx.update(batching.context(batch, train_csr, num_items))
  if "example" in batch:
    ctx["example"] = batch["example"]
  return ctx


def _total_loss(params, phase, models, method, batching, ctx, negs, fwd_keys, samples, hp,
                own, needed):
  """The sum of the phase's learners' losses (own loss + the method's terms), and the aux."""
  out = dict(params)
  out.update({m: batching.outputs(models[m], params[m], ctx, fwd_keys[m])
              for m in needed if m in params})
  losses, aux = {}, {}
  for m in own:
    losses[m] = batching.own_loss(models[m], out[m], ctx, negs[m])
    aux[f"cf_{m}"] = losses[m]
  if phase.distill:
    kd, kd_aux = method.loss(out, ctx, samples, hp)
    aux.update(kd_aux)
    for learner, term in kd.items():
      losses[learner] = losses[learner] + term if learner in losses else term
  total = sum(losses[learner] for learner in phase.train if learner in losses)
  aux.update({f"loss_{learner}": losses[learner] for learner in phase.train if learner in losses})
  return total, aux


def make_train_step(phase: Phase, models, method, optimizers, train_csr: sparse.DeviceCSR,
                    num_items: int):
  """Per-device `train_step(state, batch, key) -> (state, metrics)`.

  batch: {'user' (int32 [B]), the batching's fields (e.g. 'pos'), 'index' (int32 [B], position
  in the epoch, for per-example keys), 'example' (int32 [B], the example's id, optional: what
  BD's pre-drawn samples are indexed by), 'weight' (float32 [B], 0 for padding)}.
  Losses are sums over the global batch. Build phases with `schedule.build_phase`, which calls
  this; tests and benchmarks need not.
  """
  batching = batching_of(models)
  own = tuple(m for m in MODELS if m in phase.train)  # models whose own loss is computed
  needed = MODELS if phase.distill else own  # models whose outputs a loss reads

  def train_step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    k_neg_t, k_neg_s, k_method = _example_keys(key, batch["index"])
    split = {"teacher": batching.split_key(k_neg_t), "student": batching.split_key(k_neg_s)}
    k_neg = {m: split[m][0] for m in MODELS}
    k_fwd = {m: split[m][1] for m in MODELS}
    ctx = _batch_view(batching, batch, train_csr, num_items)
    negs = {m: batching.negatives(models[m], k_neg[m], ctx, train_csr, num_items) for m in own}
    ctx["neg"] = negs
    samples = None
    if phase.distill and method.sample is not None:
      view = {"static": state.static, "cache": state.cache, "carry": state.carry,
              "hparams": state.hparams, "epoch": state.epoch}
      samples = method.sample(view, ctx, k_method, jax.random.fold_in(key, 1 << 30))
      if method.cf_negatives is not None:
        negs = method.cf_negatives(samples, negs)
    # Materialise the sampled ids: fused into the embedding gathers, their binary searches would
    # be recomputed for every embedding column.
    negs, samples = jax.lax.optimization_barrier((negs, samples))
    ctx["neg"] = negs
    hp = dict(state.hparams, epoch=state.epoch)
    # Per-device sums scaled by the device count: their pmean is the global-batch sum.
    scale = jax.lax.axis_size(AXIS)
    frozen = {m: jax.lax.stop_gradient(p) for m, p in state.params.items()
              if m not in phase.train}

    def loss_fn(trainable):
      total, aux = _total_loss({**frozen, **trainable}, phase, models, method, batching, ctx,
                               negs, k_fwd, samples, hp, own, needed)
      return scale * total, aux

    trainable = {learner: state.params[learner] for learner in phase.train}
    grads, aux = jax.grad(loss_fn, has_aux=True)(trainable)
    new_state = _apply_gradients(state, grads, optimizers, phase, scale)
    if phase.distill and method.update_carry is not None:
      new_state = new_state.replace(carry=method.update_carry(state.carry, ctx, samples))
    metrics = _reduce(jax.lax.psum, dict(aux, examples=jnp.sum(batch["weight"])), scale)
    return new_state, metrics

  return train_step


def _reduce(f, x, num_devices):
  """f(x) over the data axis (skipped on one device, where XLA would still copy the tables)."""
  return f(x, AXIS) if num_devices > 1 else x


def _apply_gradients(state: TrainState, grads, optimizers, phase: Phase, scale) -> TrainState:
  """One optimizer update of every learner with its gradient averaged over devices."""
  params, opt = dict(state.params), dict(state.opt)
  for learner in phase.train:
    g = _reduce(jax.lax.pmean, grads[learner], scale)
    updates, opt[learner] = optimizers[learner].update(g, state.opt[learner],
                                                       state.params[learner])
    params[learner] = optax.apply_updates(state.params[learner], updates)
  return state.replace(step=state.step + 1, params=params, opt=opt)


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


def make_epoch(train_step, mesh, num_train: int, batch_size: int, run_axes=None):
  """`epoch(state, examples, key, epoch_index=0) -> (state, metrics)`: a shuffled pass over all
  `num_train` training examples (`examples`: {field: [num_train]}, e.g. {'user', 'pos'} for pairs
  or {'user'} for user batches) as one jitted `lax.scan` of the sharded step. The last batch is
  padded (weight 0). `epoch_index` (traced) becomes `state.epoch` for the step. Returns the
  epoch function and the number of steps.

  `run_axes` (a `TrainState` of vmap axes: 0 on the leaves with a leading run axis, None on the
  shared ones): several runs as one program, `jax.vmap` of the epoch over the run axis of the
  state and of `key` (one key per run, so each run has its own data order and draws); the
  metrics gain the run axis."""
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

  def one_epoch(state: TrainState, examples, key, epoch_index):
    state = state.replace(epoch=jnp.asarray(epoch_index, jnp.int32))
    k_perm, k_steps = jax.random.split(key)
    batches = shuffled_batches(k_perm, examples, num_train, batch_size, steps)
    state, metrics = sharded_scan(state, batches, k_steps)
    return state, jax.tree.map(jnp.sum, metrics)

  if run_axes is not None:
    one_epoch = jax.vmap(one_epoch, in_axes=(run_axes, None, 0, None), out_axes=(run_axes, 0),
                         axis_name=parallel.RUN_AXIS)

  @functools.partial(jax.jit, donate_argnums=0)
  def epoch(state: TrainState, examples, key, epoch_index=0):
    return one_epoch(state, examples, key, epoch_index)

  return epoch, steps


def shuffled_batches(key, examples, num_train: int, batch_size: int, steps: int) -> dict:
  """One epoch's batches [steps, batch_size] of a random permutation of the examples, with each
  slot's position ('index'), example id ('example') and weight (0 for the padding)."""
  perm = jax.random.permutation(key, num_train)
  pad = steps * batch_size - num_train
  idx = jnp.concatenate([perm, jnp.zeros(pad, perm.dtype)]).astype(jnp.int32)
  batches = {k: v[idx].reshape(steps, batch_size) for k, v in examples.items()}
  batches.update({
      "index": jnp.arange(steps * batch_size, dtype=jnp.int32).reshape(steps, batch_size),
      "example": idx.reshape(steps, batch_size),
      "weight": (jnp.arange(steps * batch_size) < num_train).astype(jnp.float32
                                                                    ).reshape(steps, batch_size),
  })
  return batches

