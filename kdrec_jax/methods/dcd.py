"""DCD — Dual Correction Distillation (Lee & Kim, "Dual Correction Strategy for Ranking
Distillation in Top-N Recommender System", CIKM'21).

Every `refresh_every` epochs the student re-ranks the teacher's top-M unobserved items: with
r_T = 0..M-1 the teacher's positions and r_S the student's 0-based ranks of those items among
all items, per user

  under-estimated:  p(i) ∝ max(tanh(max((r_S - r_T) / T, 0)), 1e-5)
  over-estimated:   p(i) ∝ max(tanh(max((r_T - r_S) / T, 0)), 1e-5)

and K items are drawn from each without replacement (kept in draw order, as the KDs
reimplementation does). The student then learns, with RRD's relaxed ranking loss summed over
the global batch's unique users, the under-estimated items in order above the over-estimated
ones: L = L_own + lambda * L_DCD.

The student's ranks come from its top-`rank_cap` list (cap = M + 10 ceil(T)): beyond it both
weights are exactly their saturated float32 values (tanh(x) rounds to 1 for x > 10, and the
over-estimation weight is the floor), so the capped ranks give the full ranking's weights
without sorting all items. `mask_positives` (default False, as KDs) excludes the user's
training items from the student's ranking.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kdrec_jax import ranking, sparse
from kdrec_jax.methods import Method, require_pairs
from kdrec_jax.methods.rrd import listwise_loss, unique_user_rows
from kdrec_jax import parallel


def correction_weights(rank_s: jax.Array, rank_t: jax.Array, temperature) -> tuple:
  """(under-estimated, over-estimated) sampling weights from 0-based ranks."""
  d = (rank_s - rank_t).astype(jnp.float32) / temperature
  under = jnp.maximum(jnp.tanh(jnp.maximum(d, 0.0)), 1e-5)
  over = jnp.maximum(jnp.tanh(jnp.maximum(-d, 0.0)), 1e-5)
  return under, over


def capped_ranks(scores: jax.Array, items: jax.Array, cap: int) -> jax.Array:
  """0-based ranks (ties: lower id first) of `items` [C, M] in each row of `scores` [C, N],
  exact below `cap` and `cap` for the items ranked at or beyond it."""
  top = ranking.top_k_keys(ranking.order_key(scores), cap)
  rows = jnp.arange(scores.shape[0])[:, None]
  position = jnp.full(scores.shape, cap, jnp.int32).at[rows, top].set(
      jnp.arange(cap, dtype=jnp.int32))
  return jnp.take_along_axis(position, items, axis=-1)


def make(cfg, models, data) -> Method:
  require_pairs("dcd", models)
  num_users, num_items = data.num_users, data.num_items
  m = min(int(cfg.top_m), num_items)
  k = int(cfg.num_samples)
  if not 1 <= k <= m:
    raise ValueError(f"dcd: num_samples must be in [1, top_m], got {k}")
  temperature = float(cfg.temperature)
  cap = min(num_items, m + 10 * math.ceil(temperature))
  mask_positives = bool(cfg.get("mask_positives", False))
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  lists = ranking.TopLists(models["teacher"].score_all, train, num_users, num_items, m,
                           budget_mb=cfg.get("lists_budget_mb", 2048),
                           chunk=cfg.get("list_chunk", 256))
  rank_t = jnp.arange(m, dtype=jnp.int32)

  def draw(key, student, users, items, valid):
    scores = models["student"].score_all(student, users)
    if mask_positives:
      scores = jnp.where(sparse.row_mask(train, users, num_items), -jnp.inf, scores)
    under, over = correction_weights(capped_ranks(scores, items, cap), rank_t, temperature)
    out = {}
    for name, w, kk in zip(("under", "over"), (under, over), jax.random.split(key)):
      pos = ranking.gumbel_top_k_rows(ranking.per_user_keys(kk, users),
                                      jnp.where(valid, jnp.log(w), -jnp.inf), k)
      out[name] = jnp.take_along_axis(items, pos, axis=-1)
      out[name + "_valid"] = jnp.take_along_axis(valid, pos, axis=-1)
    return out

  def refresh(static, params, carry, key, epoch):
    del epoch
    return lists.all_rows(static, params["teacher"],
                          lambda u, it, va: draw(key, params["student"], u, it, va)), carry

  def sample(view, batch, keys, key):
    del keys, key
    return unique_user_rows(view["cache"], batch, num_users)

  def loss(outputs, batch, samples, hp):
    share, _ = listwise_loss(models, outputs, samples, "under", "over")
    return ({"student": hp["lambda_kd"] * share},
            {"dcd": share, "dcd_users": parallel.replicated_share(jnp.sum(samples["mask"]))})

  return Method(name="dcd", loss=loss, learners=("student",), sample=sample,
                prepare=lists.build, refresh=refresh,
                refresh_every=int(cfg.get("refresh_every", 1)),
                refresh_reads=("teacher", "student"), hparams={"lambda_kd": cfg.lambda_kd})
