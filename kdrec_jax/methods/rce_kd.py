"""RCE-KD — Rejuvenated Cross-Entropy for Knowledge Distillation (Zhu & Zhang, "Rejuvenating
Cross-Entropy Loss in Knowledge Distillation for Recommender Systems", arXiv 2509.20989).

The paper shows that a softmax cross-entropy between teacher and student on an item subset J_u
bounds the student's NDCG on J_u only if J_u is closed under the student's ranking (every item the
student ranks above a member is a member). The teacher's top items are not closed in that sense,
so RCE-KD splits the work in two and mixes the two losses per user. As the authors' code
(woriazzc/RCEKD `modeling/KD/playground.py::RCEKD`, identical to woriazzc/KDs `MKD`) does it:

  once: Q^T_u = the teacher's top-K items over all items (training items included);
  every epoch, from the student's current scores:
    R^S_u = the student's top-M items (all items), S_u = its first K (the student's top-K);
    c_j = the number of items of Q^T_u at student positions >= j of R^S_u (j = 0..M-1),
    I_u = L positions of R^S_u drawn without replacement with p(j) ∝ exp((min(c_j, cap) + 1) / T)
          (items the student ranks above many of the teacher's top items: the 'closure' sample);
  per (user, positive) row of the batch, with z / tau the models' logits:
    L_S = CE(softmax(z^T / tau) over S_u,  softmax(z^S / tau) over S_u)
    L_T = CE over C_u = I_u ∪ (Q^T_u \\ I_u \\ S_u)   (both softmaxes over C_u)
    w_u = exp(-beta |Q^T_u ∩ I_u| / K)
    L_RCE = sum_rows [(1 - w_u) L_S + w_u L_T],   L = L_BPR + lambda L_RCE.

CE(p, q) = -sum_i p_i log q_i. The teacher's probabilities and w_u are constants (the teacher is
frozen); its logits of S_u, I_u and Q^T_u are computed once per user in the refresh, not per row
(a batch row would otherwise gather 150 d=400 teacher item vectors: 2x the step time on CPU).

Their CiteULike BPR-MF -> BPR-MF settings (configs/citeulike/bpr/rcekd.yaml, section 'bpr'):
lambda 500, tau 1, K 50, L 50, T 10, M 200, beta 3, student weight decay 1e-5; cap = 50 is
hard-coded in their code (it only binds when K > 50).

Where we differ (none changes the loss): the softmaxes use log-sum-exps instead of exp() and
division; the draw without replacement is a Gumbel top-L (exactly torch.multinomial's successive
sampling without replacement); `mask_positives=True` (not theirs; default False) takes both top
lists over unobserved items only; ties in the top lists go to the lower item id.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import ranking, sparse
from kdrec_jax.methods import Method, require_pairs
from kdrec_jax.methods.rrd import contains_sorted

LABEL = "RCE-KD"
PAPER = "RCE-KD, arXiv 2509.20989"
# The RCE-KD CiteULike config (configs/citeulike/bpr/rcekd.yaml, section bpr): lmbda 500,
# mkd_tau 1, mkd_K 50, mkd_L 50, mkd_T 10, mkd_mxK 200, mkd_beta 3; the count cap 50 is in their
# code. Top lists over all items (training items included), as theirs.
DEFAULTS = dict(lambda_kd=500.0, tau=1.0, top_k=50, num_interesting=50, sample_temperature=10.0,
                top_m=200, beta=3.0, count_cap=50, mask_positives=False)

_NEG = -1e9  # masked logits: exp() is 0, gradients stay finite


def closure_log_weights(hits: jax.Array, valid: jax.Array, temperature, cap) -> jax.Array:
  """Log sampling weights of the student's top-M positions: (min(c_j, cap) + 1) / T, with c_j the
  number of hits (teacher top-K items) at positions >= j; -inf at invalid positions.

  hits, valid: bool [C, M] over the student's list, best first.
  """
  h = (hits & valid).astype(jnp.int32)
  counts = jnp.flip(jnp.cumsum(jnp.flip(h, -1), axis=-1), -1)
  logw = (jnp.minimum(counts, cap) + 1).astype(jnp.float32) / temperature
  return jnp.where(valid, logw, -jnp.inf)


def member(items: jax.Array, pool: jax.Array, pool_valid: jax.Array) -> jax.Array:
  """bool [C, A]: whether items[c, a] is one of the valid entries of pool[c] ([C, P])."""
  eq = (items[:, :, None] == pool[:, None, :]) & pool_valid[:, None, :]
  return jnp.any(eq, axis=-1)


def soft_cross_entropy(teacher: jax.Array, student: jax.Array, valid: jax.Array) -> jax.Array:
  """Per row: -sum_i softmax(teacher)_i log softmax(student)_i over the valid slots (0 if none)."""
  t = jnp.where(valid, jax.lax.stop_gradient(teacher), _NEG)
  s = jnp.where(valid, student, _NEG)
  p = jax.nn.softmax(t, axis=-1)
  log_q = s - jax.nn.logsumexp(s, axis=-1, keepdims=True)
  return -jnp.sum(jnp.where(valid, p * log_q, 0.0), axis=-1)


def rce_loss(zt_s, zs_s, s_valid, zt_c, zs_c, c_valid, overlap, beta, k) -> jax.Array:
  """Per row: (1 - w) CE over S + w CE over C with w = exp(-beta overlap / k) (a constant)."""
  w = jax.lax.stop_gradient(jnp.exp(-beta * overlap / k))
  return ((1.0 - w) * soft_cross_entropy(zt_s, zs_s, s_valid)
          + w * soft_cross_entropy(zt_c, zs_c, c_valid))


def _all_items_csr(num_users: int) -> sparse.DeviceCSR:
  """A CSR with empty rows: top lists over all items (nothing excluded)."""
  return sparse.DeviceCSR.from_numpy(np.zeros(num_users + 1, np.int64), np.zeros(0, np.int32))


def make(cfg, models, data) -> Method:
  require_pairs("rce_kd", models)
  num_users, num_items = data.num_users, data.num_items
  k = int(cfg.top_k)
  m = min(int(cfg.top_m), num_items)
  n_int = int(cfg.num_interesting)
  if not 1 <= k <= m:
    raise ValueError(f"rce_kd: top_k must be in [1, top_m], got {k} (top_m {m})")
  if not 1 <= n_int <= m:
    raise ValueError(f"rce_kd: num_interesting must be in [1, top_m], got {n_int}")
  temperature = float(cfg.sample_temperature)
  cap = int(cfg.get("count_cap", 50))
  excluded = (sparse.DeviceCSR.from_numpy(*data.split("train"))
              if cfg.get("mask_positives", False) else _all_items_csr(num_users))
  chunk = cfg.get("list_chunk", 256)
  teacher_lists = ranking.TopLists(models["teacher"].score_all, excluded, num_users, num_items,
                                   k, budget_mb=float("inf"), chunk=chunk)
  student_lists = ranking.TopLists(models["student"].score_all, excluded, num_users, num_items,
                                   m, budget_mb=0, chunk=chunk)

  def prepare(frozen):
    """The teacher's top-K per user, once: {'items', 'valid'} [U, K]."""
    return teacher_lists.build(models["teacher"].prepare(frozen["teacher"]))

  def draw(key, static, teacher, users, items, valid):
    """A chunk's student top-K, closure sample I_u, the teacher list's split and the teacher's
    logits of [S_u, I_u, Q^T_u]."""
    # Materialise the student's list: with several consumers XLA otherwise recomputes the top-M
    # search in their fusions (50 s instead of 2 s per refresh on CiteULike, 2-core CPU).
    items, valid = jax.lax.optimization_barrier((items, valid))
    t_items, t_valid = static["items"][users], static["valid"][users]
    t_sorted = jnp.sort(jnp.where(t_valid, t_items, num_items), axis=-1)
    hits = contains_sorted(t_sorted, items)
    logw = closure_log_weights(hits, valid, temperature, cap)
    pos = ranking.gumbel_top_k_rows(ranking.per_user_keys(key, users), logw, n_int)
    inter = jnp.take_along_axis(items, pos, axis=-1)
    inter_valid = jnp.take_along_axis(valid, pos, axis=-1)
    s_items, s_valid = items[:, :k], valid[:, :k]
    in_int = member(t_items, inter, inter_valid) & t_valid
    in_s = member(t_items, s_items, s_valid)
    z_t = models["teacher"].score(teacher, users, jnp.concatenate([s_items, inter, t_items], -1))
    return {"student_top": s_items, "student_top_valid": s_valid, "teacher_logits": z_t,
            "interesting": inter, "interesting_valid": inter_valid,
            "teacher_keep": t_valid & ~in_int & ~in_s,
            "overlap": jnp.sum(in_int, axis=-1).astype(jnp.float32)}

  def refresh(static, params, carry, key, epoch):
    del epoch
    student = models["student"].prepare(params["student"])
    teacher = models["teacher"].prepare(params["teacher"])
    cache = student_lists.all_rows({}, student,
                                   lambda u, it, va: draw(key, static, teacher, u, it, va))
    return cache, carry

  def sample(view, batch, keys, key):
    del keys, key
    users = batch["user"]
    rows = {name: v[users] for name, v in view["cache"].items()}
    rows["teacher_top"] = view["static"]["items"][users]
    rows["teacher_top_valid"] = view["static"]["valid"][users]
    return rows

  def loss(outputs, batch, samples, hp):
    users, weight = batch["user"], batch["weight"]
    r = samples
    items = jnp.concatenate([r["student_top"], r["interesting"], r["teacher_top"]], axis=-1)
    zs = models["student"].score(outputs["student"], users, items) / hp["tau"]
    zt = r["teacher_logits"] / hp["tau"]  # the frozen teacher's, from the refresh
    c_valid = jnp.concatenate([r["interesting_valid"], r["teacher_keep"]], axis=-1)
    per_row = rce_loss(zt[:, :k], zs[:, :k], r["student_top_valid"], zt[:, k:], zs[:, k:],
                       c_valid, r["overlap"], hp["beta"], float(k))
    total = jnp.sum(weight * per_row)
    w = jnp.exp(-hp["beta"] * r["overlap"] / k)
    return ({"student": hp["lambda_kd"] * total},
            {"rce": total, "rce_weight": jnp.sum(weight * w),
             "rce_overlap": jnp.sum(weight * r["overlap"])})

  return Method(name="rce_kd", loss=loss, learners=("student",), sample=sample,
                prepare=prepare, refresh=refresh, refresh_every=1,
                refresh_reads=("student", "teacher"),
                hparams={"lambda_kd": cfg.lambda_kd, "tau": cfg.tau, "beta": cfg.beta})
