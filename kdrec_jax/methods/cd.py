"""CD — Collaborative Distillation (Lee, Choi, Lee & Shim, "Collaborative Distillation for Top-N
Recommendation", ICDM'19).

The student learns, besides its own loss, the teacher's soft labels for a few unobserved items
per user, sampled by rank from a guiding model's top-P pool:

  L = L_own(S) + lambda * sum_{(u, i) in batch} sum_{k in S_u} BCE(sg(sigma((z^T_uk + t2) / t1)),
                                                                  sigma(z^S_uk))

summed over the batch's (user, positive) rows (a user counts once per training pair), with
S_u = `num_samples` distinct items drawn from the guide's top-P unobserved items:
'teacher' guide: the frozen teacher's pool, built once, and S_u drawn ONCE, at the start of the
  phase, and kept for every epoch, as the published reimplementations do (woriazzc/KDs
  `cf/baseline.py::CD.__init__` calls `get_rank_sample` once and `do_something_in_each_epoch`
  redraws only for the student guide; chengang95/UnKD `sample.py::CD.__init__` draws once from
  the teacher and its per-epoch redraw is commented out). `redraw_every_epoch=True` redraws S_u
  from the fixed pool every epoch instead (this library's behaviour before the switch existed);
'student' guide: the student's pool, rebuilt every epoch from its current parameters, and S_u
  drawn from it every epoch (as KDs; `redraw_every_epoch` must then be left unset or True).

Rank-aware sampling, as the published reimplementations (UnKD, RCE-KD/KDs) do it: repeatedly draw
two pool positions a, b iid from q(r) ∝ exp(-r / (P T)), r = 1..P, keep the better-ranked one,
min(a, b), until n distinct items are collected. Each kept draw has the closed-form probability
p(r) = S(r)^2 - S(r+1)^2 with S(r) = sum_{j >= r} q(j), and "repeat until n distinct" is
successive sampling without replacement ∝ p; so a Gumbel top-n on log p over the pool is its
exact vectorised form (`sampler='tournament'`). `sampler='direct'` draws ∝ q itself.
(KDs collects the kept items in a Python set of 0-d tensors, which hash by identity, so its
"until n distinct" is in fact "n draws", with replacement; at the RCE-KD setting, P = 3000 nearly
uniform positions and n = 2, a repeat has probability ~1e-3 per user.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import losses, ranking, sparse
from kdrec_jax.methods import Method, require_pairs

LABEL = "CD"
PAPER = "Lee, Choi, Lee & Shim, Collaborative Distillation for Top-N Recommendation, ICDM'19"
# The RCE-KD / KDs CiteULike config (configs/citeulike/bpr/cd.yaml there): student-guided.
DEFAULTS = dict(lambda_kd=0.5, guide="student", pool_size=3000, rank_temperature=20.0,
                num_samples=2, t1=2.0, t2=0.0, sampler="tournament")

GUIDES = ("teacher", "student")
SAMPLERS = ("tournament", "direct")


def rank_log_probs(pool_size: int, temperature: float, sampler: str = "tournament"
                   ) -> np.ndarray:
  """log-probability of drawing pool position r = 1..P (float32 [P]) in one kept draw."""
  r = np.arange(1, pool_size + 1, dtype=np.float64)
  q = np.exp(-(r - 1) / (pool_size * temperature))
  q /= q.sum()
  if sampler == "direct":
    return np.log(q).astype(np.float32)
  if sampler != "tournament":
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  tail = np.cumsum(q[::-1])[::-1]  # S(r) = P(a >= r)
  nxt = np.append(tail[1:], 0.0)
  return np.log(tail ** 2 - nxt ** 2).astype(np.float32)


def soft_labels(teacher_logits: jax.Array, t1, t2) -> jax.Array:
  """The teacher's soft label for missing feedback, sigma((sg(z_T) + t2) / t1)."""
  return jax.nn.sigmoid((jax.lax.stop_gradient(teacher_logits) + t2) / t1)


def soft_label_bce(student_logits: jax.Array, teacher_logits: jax.Array, t1, t2) -> jax.Array:
  """Elementwise BCE of sigma(z_S) against the stop-gradient soft label sigma((z_T + t2) / t1)."""
  return losses.sigmoid_cross_entropy(student_logits, soft_labels(teacher_logits, t1, t2),
                                      reduce_fn=None)


def draw_positions(key: jax.Array, users: jax.Array, valid: jax.Array, log_probs: jax.Array,
                   n: int) -> jax.Array:
  """n distinct pool positions per user (valid [C, P]: the pool's usable slots), without
  replacement ∝ exp(log_probs[position]), in draw order; one key per user id: int32 [C, n]."""
  logits = jnp.where(valid, log_probs, -jnp.inf)
  return ranking.gumbel_top_k_rows(ranking.per_user_keys(key, users), logits, n)


def make(cfg, models, data) -> Method:
  require_pairs("cd", models)
  guide = cfg.get("guide", "teacher")
  if guide not in GUIDES:
    raise ValueError(f"cd: guide must be one of {GUIDES}, got {guide!r}")
  num_users, num_items = data.num_users, data.num_items
  n = int(cfg.num_samples)
  pool_size = min(int(cfg.pool_size), num_items)
  if not 1 <= n <= pool_size:
    raise ValueError(f"cd: num_samples must be in [1, pool_size], got {n}")
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  lists = ranking.TopLists(models[guide].score_all, train, num_users, num_items, pool_size,
                           budget_mb=cfg.get("lists_budget_mb", 2048),
                           chunk=cfg.get("list_chunk", 256))
  log_probs = jnp.asarray(rank_log_probs(pool_size, cfg.rank_temperature,
                                         cfg.get("sampler", "tournament")))
  redraw = cfg.get("redraw_every_epoch", None)
  if redraw is None:
    redraw = guide == "student"
  elif guide == "student" and not redraw:
    raise ValueError("cd: the student-guided pool is rebuilt from the student every epoch, so "
                     "its items are redrawn every epoch; leave redraw_every_epoch unset or True")
  redraw = bool(redraw)

  def prepare(frozen):
    """The teacher's pool, once (teacher guide, under the memory budget)."""
    teacher_params = frozen["teacher"]
    return lists.build(teacher_params) if guide == "teacher" else {}

  def refresh(static, params, carry, key, epoch):
    """S_u for every user: {'items', 'valid'} [U, n]; every epoch (student guide, or
    `redraw_every_epoch`), else once, at epoch 0 of the phase."""
    del epoch
    items, valid = lists.at_positions(
        static, params[guide], lambda u, va: draw_positions(key, u, va, log_probs, n))
    return {"items": items, "valid": valid}, carry

  def sample(view, batch, keys, key):
    del keys, key
    users = batch["user"]
    return view["cache"]["items"][users], view["cache"]["valid"][users]

  def loss(outputs, batch, samples, hp):
    users, weight = batch["user"], batch["weight"]
    items, valid = samples
    z_s = models["student"].score(outputs["student"], users, items)
    z_t = models["teacher"].score(outputs["teacher"], users, items)
    w = weight[:, None] * valid
    bce = losses.sigmoid_cross_entropy(z_s, soft_labels(z_t, hp["t1"], hp["t2"]), weights=w)
    return {"student": hp["lambda_kd"] * bce}, {"cd": bce, "cd_items": jnp.sum(w)}

  return Method(name="cd", loss=loss, learners=("student",), sample=sample, prepare=prepare,
                refresh=refresh, refresh_every=1 if redraw else 0, refresh_reads=(guide,),
                hparams={"lambda_kd": cfg.lambda_kd, "t1": cfg.t1, "t2": cfg.t2})
