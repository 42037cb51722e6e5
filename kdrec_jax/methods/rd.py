"""RD — Ranking Distillation (Tang & Wang, KDD'18), for pair-batched recommenders.

As the authors' code (graytowne/rank_distill `distill_caser.py::DistilledRecommender.fit` and
`losses.py::weighted_sigmoid_log_loss`) does it, on pair-batched recommenders: the frozen
teacher's top-K unobserved items of each user, pi_0, ..., pi_{K-1} (best first, training
positives excluded), become extra positives for the student. Every training pair (u, i) of a
batch adds to the student's own loss

  L_RD(u) = lambda_kd * sum_c w[c] * -log sigma(z_S(u, pi_c)),      c = 0..K-1,

lambda_kd being the authors' `teach_alpha` (default 1.0: "equal weight for ranking loss and
distillation loss"; L = L_own + teach_alpha L_RD), with w = w_a * w_b NOT renormalised (the
authors set `_weight_renormalize = False`; `renormalize_weights=True` L1-renormalises each row,
as the UnKD and KDs reimplementations do and this library did before the switch existed, a row
whose weights are all 0 staying 0):

  w_a[c] ∝ exp(-(c + 1) / position_temperature), summing to 1   (position importance)
  w_b[c] = max(tanh(mu * (r_hat[c] - c)), 0)                    (dynamic: the student ranks pi_c
                                                                 below the teacher)

where r_hat[c] = floor((N - 1) * #{j : z_S(u, j) > z_S(u, pi_c)} / eps) estimates the student's
0-based rank of pi_c among the N items from eps = `num_dynamic_samples` items j drawn uniformly
with replacement from u's unobserved items (per example, from its key). Before epoch
`dynamic_start_epoch` of the phase (and always when eps = 0) w_b = 1. The weights are constants
for the student (stop-gradient); the teacher is frozen and never read by the loss.

Where this differs from the authors' code: it is written for sequential Caser, whose teacher list
per training instance drops only that instance's targets; here (collaborative filtering) every
training item of the user is excluded, as the UnKD/KDs reimplementations do. The authors average
over the batch; this library sums (its losses are sums over the global batch). The RD paper's
text beyond the abstract was not available to check; its `teach_alpha` and weights are the
code's.

The top-K lists come from `ranking.TopLists`: under `lists_budget_mb`, `prepare` stores them for
all users (U x K ids); over it, `prepare` keeps the teacher's params and each step ranks its
batch's users (memory O(batch x items)). Both give identical rows.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kdrec_jax import losses, methods, ranking, sparse
from kdrec_jax.methods import Method

LABEL = "RD"
PAPER = "Tang & Wang, Ranking Distillation, KDD'18"
# The authors' code (graytowne/rank_distill distill_caser.py): teach_alpha 1, K 10, lamda 1,
# mu 0.1, 100 dynamic samples from epoch 10, weights not renormalised.
DEFAULTS = dict(lambda_kd=1.0, top_k=10, position_temperature=1.0, mu=0.1,
                num_dynamic_samples=100, dynamic_start_epoch=10, renormalize_weights=False)


def position_weights(k: int, temperature: float) -> jax.Array:
  """float32 [k]: exp(-r / temperature) for ranks r = 1..k, normalised to sum 1."""
  r = jnp.arange(k, dtype=jnp.float32)  # r - 1: the same weights after normalising, no underflow
  w = jnp.exp(-r / jnp.float32(temperature))
  return w / jnp.sum(w)


def estimated_ranks(top_scores: jax.Array, sample_scores: jax.Array, num_items: int
                    ) -> jax.Array:
  """The student's estimated 0-based ranks of the listed items: int32 [B, K].

  top_scores [B, K]: the student's scores of the teacher's items; sample_scores [B, eps]: its
  scores of eps uniform unobserved items. r_hat = floor((N - 1) * #{j : s_j > top} / eps), in
  exact integer arithmetic (no overflow: (N - 1) = q * eps + rem, so the floor is
  q * n + (rem * n) // eps with rem * n < eps^2).
  """
  eps = sample_scores.shape[-1]
  above = jnp.sum(sample_scores[:, None, :] > top_scores[:, :, None], axis=-1, dtype=jnp.int32)
  q, rem = divmod(num_items - 1, eps)
  return q * above + (rem * above) // eps


def dynamic_weights(ranks: jax.Array, mu: float) -> jax.Array:
  """float32 [B, K]: max(tanh(mu * (r_hat[c] - c)), 0) for the estimated 0-based ranks [B, K]."""
  c = jnp.arange(ranks.shape[-1], dtype=jnp.float32)
  return jnp.maximum(jnp.tanh(jnp.float32(mu) * (ranks.astype(jnp.float32) - c)), 0.0)


def combine_weights(w_a: jax.Array, w_b: jax.Array, valid: jax.Array, renormalize: bool = False
                    ) -> jax.Array:
  """float32 [B, K]: w_a [K] * w_b [B, K], 0 in invalid slots, L1-renormalised per row when
  `renormalize` (rows summing to 0 stay 0)."""
  w = jnp.where(valid, w_a * w_b, 0.0)
  if renormalize:
    total = jnp.sum(w, axis=-1, keepdims=True)
    w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
  return w


def rd_weights(top_scores: jax.Array, sample_scores: Optional[jax.Array], valid: jax.Array,
               dynamic, *, num_items: int, temperature: float, mu: float,
               renormalize: bool = False) -> jax.Array:
  """RD's per-slot weights [B, K] (stop-gradient).

  top_scores [B, K]: the student's scores of the teacher's top-K items; sample_scores [B, eps]
  (or None: no dynamic weights): its scores of the uniform unobserved samples; valid bool
  [B, K]: the list slots that hold an item; dynamic: bool (traced or not), whether the dynamic
  weights are on (else w_b = 1).
  """
  top_scores = jax.lax.stop_gradient(top_scores)
  w_a = position_weights(top_scores.shape[-1], temperature)
  w_b = jnp.ones(top_scores.shape, jnp.float32)
  if sample_scores is not None:
    ranks = estimated_ranks(top_scores, jax.lax.stop_gradient(sample_scores), num_items)
    w_b = jnp.where(dynamic, dynamic_weights(ranks, mu), w_b)
  return jax.lax.stop_gradient(combine_weights(w_a, w_b, valid, renormalize))


def rd_loss(top_scores: jax.Array, weights: jax.Array, row_weight: jax.Array) -> jax.Array:
  """sum_b row_weight[b] * sum_c weights[b, c] * -log sigma(top_scores[b, c]); scalar.

  top_scores, weights [B, K]; row_weight [B] (0 for padding).
  """
  return losses.log_sigmoid_loss(top_scores, weights=row_weight[:, None] * weights)


def make(cfg, models, data) -> Method:
  """RD for `models` = {'teacher': Model, 'student': Model} (pair-batched) on `data`.

  cfg: lambda_kd (the authors' teach_alpha), top_k (K), position_temperature (their lamda), mu,
  num_dynamic_samples (epsilon; 0: no dynamic weights), dynamic_start_epoch (0-based: the
  dynamic weights from this epoch of the phase on; the authors' 1-based `epoch_num >
  dynamic_start_epoch`), lists_budget_mb (2048), list_chunk (256), renormalize_weights (False).
  """
  methods.require_pairs("rd", models)
  if "renormalize" in cfg:
    raise ValueError("rd: 'renormalize' was renamed 'renormalize_weights' (default False, the "
                     "authors'); set that instead")
  num_users, num_items = data.num_users, data.num_items
  k, eps = int(cfg.top_k), int(cfg.num_dynamic_samples)
  start_epoch = int(cfg.dynamic_start_epoch)
  temperature, mu = float(cfg.position_temperature), float(cfg.mu)
  renormalize = bool(cfg.get("renormalize_weights", False))
  if temperature <= 0:
    raise ValueError(f"rd: position_temperature must be > 0, got {temperature}")
  if eps < 0 or mu < 0:
    raise ValueError(f"rd: num_dynamic_samples and mu must be >= 0, got {eps} and {mu}")
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  lists = ranking.TopLists(models["teacher"].score_all, train, num_users, num_items, k,
                           budget_mb=cfg.get("lists_budget_mb", 2048),
                           chunk=cfg.get("list_chunk", 256))

  def prepare(frozen):
    """{'items' [U, K], 'valid' [U, K]} under the budget, else {'teacher': params}."""
    teacher_params = frozen["teacher"]
    return lists.build(teacher_params) if lists.stored else {"teacher": teacher_params}

  def sample(view, batch, keys, key):
    """{'items' [B, K], 'valid' [B, K]: the teacher's lists, 'dynamic' [B, eps]: uniform
    unobserved items (when eps > 0)}."""
    del key
    static, users = view["static"], batch["user"]
    if lists.stored:
      items, valid = lists.rows(static, None, users)
    else:
      items, valid = lists.rows({}, static["teacher"], users)
    out = {"items": items, "valid": valid}
    if eps:
      out["dynamic"] = ranking.uniform_unobserved(keys, users, train, num_items, eps)
    return out

  def loss(outputs, batch, samples, hp):
    users, student = batch["user"], models["student"]
    z_top = student.score(outputs["student"], users, samples["items"])
    z_dyn = student.score(outputs["student"], users, samples["dynamic"]) if eps else None
    w = rd_weights(z_top, z_dyn, samples["valid"], hp["epoch"] >= start_epoch,
                   num_items=num_items, temperature=temperature, mu=mu, renormalize=renormalize)
    term = rd_loss(z_top, w, batch["weight"])
    return {"student": hp["lambda_kd"] * term}, {"rd": term}

  return Method(name="rd", loss=loss, learners=("student",), sample=sample, prepare=prepare,
                hparams={"lambda_kd": float(cfg.lambda_kd)})
