"""DE — Distillation Experts (Kang, Hwang, Kweon & Yu, CIKM'20, the DE of DE-RRD).

The student learns to reconstruct the frozen teacher's representations from its own. Users and
items each get a DE module (separate parameters) of M experts, expert m an MLP
d_S -> (d_T + d_S) // 2 -> d_T (Linear, ReLU, Linear), and a selection network that reads the
teacher's representation t_e and picks one expert by a Gumbel-softmax:

  alpha_e = softmax(W t_e + b)                                       [M]
  a_e     = softmax((log(alpha_e + 1e-10) + g_e) / T),  g_e ~ Gumbel(0, 1)
  y_e     = sum_m a_em expert_m(s_e)                                 [d_T]
  loss_E  = sum_{e in E} ||t_e - y_e||^2       (t_e stop-gradient)

  L_DE = loss(unique users) + 0.5 (loss(unique positives) + loss(unique negatives))

over the global batch's unique users, positive items and the student's own BPR negatives; the
student's loss gains lambda_de L_DE, which also trains the experts (learner 'method'). The
temperature anneals per epoch, T(e) = max(T_0 (T_end / T_0)^(e / anneal_epochs), T_end), from the
traced epoch (no recompilation), so the selection becomes a hard (one-hot) choice of an expert.

Data parallelism: every device gathers the global batch's ids (`batch['global'].unique`), draws
the same Gumbel noise from the replicated key, computes the same global L_DE and contributes its
share (`batch['global'].share`), so 4 devices give the result of 1.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdrec_jax import losses, methods
from kdrec_jax.methods import Method

LABEL = "DE"
PAPER = "Kang, Hwang, Kweon & Yu, DE-RRD, CIKM'20"
# The RCE-KD / KDs CiteULike config (configs/citeulike/bpr/de.yaml there).
DEFAULTS = dict(lambda_de=0.05, num_experts=30, end_temperature=1e-10)

EPS = 1e-10  # inside log(alpha + EPS), as the authors' code
SIDES = ("user", "item")


def _torch_uniform(fan_in: int):
  """PyTorch's default `nn.Linear` initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Linear(nn.Module):
  """y = x W + b, W [d_in, features] and b [features] initialised as PyTorch's `nn.Linear`."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", _torch_uniform(fan_in), (fan_in, self.features))
    bias = self.param("bias", _torch_uniform(fan_in), (self.features,))
    return x @ kernel + bias


class Stacked(nn.Module):
  """The params of M linear layers fan_in -> features, stacked: kernel [M, fan_in, features],
  bias [M, features], each entry drawn as PyTorch's `nn.Linear` draws it."""
  num: int
  fan_in: int
  features: int

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    init = _torch_uniform(self.fan_in)
    return (self.param("kernel", init, (self.num, self.fan_in, self.features)),
            self.param("bias", init, (self.num, self.features)))


class Experts(nn.Module):
  """M experts, expert m: Linear(d_S -> hidden) -> ReLU -> Linear(hidden -> features), mixed by
  per-row weights a [n, M]:  y = sum_m a_m expert_m(s).

  The mixture is computed as one matrix product of width M * hidden,
    y = [a_1 h_1 | ... | a_M h_M] @ [W_1; ...; W_M] + a @ B,    h_m = relu(s U_m + c_m),
  which is the same sum reassociated, without materialising the M predictions [n, M, features]
  (the largest array of the loss and its backward pass): a DE epoch at the CiteULike shapes is
  1.37x faster on the 2-core CPU (benchmarks/REPORT.md).
  """
  num_experts: int
  hidden: int
  features: int

  @nn.compact
  def __call__(self, student: jax.Array, weights: jax.Array) -> jax.Array:
    """student [n, d_S], weights [n, M] -> [n, features]."""
    n, m = student.shape[0], self.num_experts
    u, c = Stacked(m, student.shape[-1], self.hidden, name="hidden")()
    w, b = Stacked(m, self.hidden, self.features, name="out")()
    h = nn.relu(jnp.einsum("nd,mdh->nmh", student, u) + c)  # [n, M, hidden]
    mixed = (weights[..., None] * h).reshape(n, m * self.hidden)
    return mixed @ w.reshape(m * self.hidden, self.features) + weights @ b


class DistillationExperts(nn.Module):
  """M experts (`Experts`, params stacked on a leading [M] axis) and the selection network
  Linear(d_T -> M) + softmax.

  Params: {'selection': {'kernel' [d_T, M], 'bias' [M]},
           'experts': {'hidden': {'kernel' [M, d_S, H], 'bias' [M, H]},
                       'out': {'kernel' [M, H, d_T], 'bias' [M, d_T]}}}.
  """
  num_experts: int
  hidden: int
  features: int  # d_T

  @nn.compact
  def __call__(self, student: jax.Array, teacher: jax.Array, gumbel: jax.Array,
               temperature) -> tuple[jax.Array, jax.Array]:
    """student [n, d_S], teacher [n, d_T], gumbel [n, M] noise, temperature (scalar) ->
    (prediction y [n, d_T], selection weights a [n, M])."""
    alpha = jax.nn.softmax(Linear(self.num_experts, name="selection")(teacher), axis=-1)
    weights = gumbel_softmax(alpha, gumbel, temperature)
    pred = Experts(self.num_experts, self.hidden, self.features, name="experts")(student, weights)
    return pred, weights


def gumbel_softmax(alpha: jax.Array, gumbel: jax.Array, temperature) -> jax.Array:
  """softmax((log(alpha + 1e-10) + gumbel) / T) over the last axis: alpha, gumbel [..., M].

  The logits are shifted to a maximum of exactly 0 before the division: at T = 1e-10 they reach
  ~1e11, where float32 rounding (XLA computes x / T as x * (1 / T) in some fusions only) would
  otherwise leave the largest one above the softmax's own maximum and overflow its exp.
  """
  logits = jnp.log(alpha + EPS) + gumbel
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  return jax.nn.softmax(logits / temperature, axis=-1)


def temperature_at(epoch, end_temperature: float, anneal_epochs: float,
                   start_temperature: float = 1.0) -> jax.Array:
  """T(e) = max(T_0 (T_end / T_0)^(e / anneal_epochs), T_end), float32; `epoch` may be traced."""
  e = jnp.asarray(epoch, jnp.float32)
  ratio = jnp.float32(end_temperature / start_temperature)
  t = jnp.float32(start_temperature) * ratio ** (e / jnp.float32(anneal_epochs))
  return jnp.maximum(t, jnp.float32(end_temperature))


def de_loss(module: DistillationExperts, params, student: jax.Array, teacher: jax.Array,
            gumbel: jax.Array, mask: jax.Array, temperature) -> jax.Array:
  """sum_e mask_e ||sg(t_e) - y_e||^2 over slots e: student [n, d_S], teacher [n, d_T],
  gumbel [n, M], mask [n] (False: padding, contributes 0). params: `module`'s 'params'."""
  teacher = jax.lax.stop_gradient(teacher)
  pred, _ = module.apply({"params": params}, student, teacher, gumbel, temperature)
  return losses.squared_error(pred, teacher, where=mask)


def _repr_dims(model) -> tuple[int, int]:
  """(user, item) representation sizes of `model`, from shapes only."""
  ids = jnp.zeros((1,), jnp.int32)
  u, i = jax.eval_shape(lambda k: model.representations(model.init(k), ids, ids),
                        jax.random.key(0))
  return u.shape[-1], i.shape[-1]


def make(cfg, models, data) -> Method:
  """DE for `models` = {'teacher': Model, 'student': Model} (pair-batched) on `data`.

  cfg: lambda_de, num_experts, end_temperature, anneal_epochs (1000), start_temperature (1).
  """
  methods.require_pairs("de", models)
  num_users, num_items = data.num_users, data.num_items
  dims = {m: _repr_dims(models[m]) for m in ("teacher", "student")}
  # (d_T, d_S) of the user and item representations.
  sizes = {side: (dims["teacher"][j], dims["student"][j]) for j, side in enumerate(SIDES)}
  num_experts = int(cfg.num_experts)
  end_t = float(cfg.end_temperature)
  anneal = float(cfg.get("anneal_epochs", 1000))
  start_t = float(cfg.get("start_temperature", 1.0))
  modules = {side: DistillationExperts(num_experts, (d_t + d_s) // 2, d_t)
             for side, (d_t, d_s) in sizes.items()}

  def init(key) -> dict[str, Any]:
    """{'user': params, 'item': params} of the two DE modules."""
    out = {}
    for k, side in zip(jax.random.split(key), SIDES):
      d_t, d_s = sizes[side]
      out[side] = modules[side].init(k, jnp.zeros((1, d_s)), jnp.zeros((1, d_t)),
                                     jnp.zeros((1, num_experts)), 1.0)["params"]
    return out

  def sample(view, batch, keys, key):
    """The global batch's unique users, positives and student negatives (ids [S], mask [S],
    S = global batch size) with Gumbel noise [S, M], identical on every device."""
    del view, keys  # per-example keys would differ with the split: the noise uses `key`
    valid = batch["weight"] > 0
    out = {}
    for name, ids, fill, k in zip(("user", "pos", "neg"),
                                  (batch["user"], batch["pos"], batch["neg"]["student"]),
                                  (num_users, num_items, num_items), jax.random.split(key, 3)):
      unique, mask = batch["global"].unique(ids, valid, fill=fill)
      out[name] = {"ids": jnp.where(mask, unique, 0), "mask": mask,
                   "gumbel": jax.random.gumbel(k, (unique.shape[0], num_experts), jnp.float32)}
    return out

  def loss(outputs, batch, samples, hp):
    """lambda_de L_DE for the student and the experts (this device's share)."""
    temperature = temperature_at(hp["epoch"], end_t, anneal, start_t)
    users = samples["user"]["ids"]
    items = jnp.concatenate([samples["pos"]["ids"], samples["neg"]["ids"]])
    reps = {m: models[m].representations(outputs[m], users, items) for m in ("teacher", "student")}
    n_pos = samples["pos"]["ids"].shape[0]
    terms = {}
    for name, j, rows in (("user", 0, slice(None)), ("pos", 1, slice(None, n_pos)),
                          ("neg", 1, slice(n_pos, None))):
      side, s = SIDES[j], samples[name]
      terms[name] = de_loss(modules[side], outputs["method"][side], reps["student"][j][rows],
                            reps["teacher"][j][rows], s["gumbel"], s["mask"], temperature)
    de_user = terms["user"]
    de_item = 0.5 * (terms["pos"] + terms["neg"])
    term = batch["global"].share(hp["lambda_de"] * (de_user + de_item))
    aux = batch["global"].share({"de_user": de_user, "de_item": de_item})
    # The step sums the learners' terms into one loss: the student's term carries the gradient
    # for both the student and the experts; the experts' own entry only reports the value.
    return {"student": term, "method": jax.lax.stop_gradient(term)}, aux

  return Method(name="de", loss=loss, learners=("student", "method"), sample=sample,
                hparams={"lambda_de": float(cfg.lambda_de)}, init=init)
