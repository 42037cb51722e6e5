"""RRD — Relaxed Ranking Distillation (Kang, Hwang, Kweon & Yu, "DE-RRD", CIKM'20).

The student learns the order of a few of the teacher's top items, above a set of items the
teacher finds uninteresting. Every epoch, per user: K 'interesting' positions drawn without
replacement from the teacher's top-M unobserved items with p(r) ∝ exp(-r / T), kept in teacher
order; L 'uninteresting' items drawn uniformly without replacement from the items that are
neither training positives nor in the teacher's top-M. The loss is the Plackett-Luce likelihood of
the interesting order with the uninteresting items pooled below them, on the student's raw
logits, summed over the global batch's unique users:

  L_RRD(u) = -sum_{k=1..K} [ z_{pi_k} - log( sum_{l>=k} exp z_{pi_l} + sum_{j in unint} exp z_j ) ]

and L = L_own + lambda * L_RRD. `relaxed_ranking_loss` is shared with DCD.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kdrec_jax import losses, ranking, sparse
from kdrec_jax.methods import Method, require_pairs

LABEL = "RRD"
PAPER = "Kang, Hwang, Kweon & Yu, DE-RRD, CIKM'20"
# The RCE-KD / KDs CiteULike config (configs/citeulike/bpr/rrd.yaml there).
DEFAULTS = dict(lambda_rrd=0.1, top_m=500, num_interesting=100, num_uninteresting=200,
                temperature=10.0)

def relaxed_ranking_loss(ordered: jax.Array, ordered_valid: jax.Array, below: jax.Array,
                         below_valid: jax.Array) -> jax.Array:
  """Per row: -sum_k [s_k - log(sum_{l>=k} e^{s_l} + sum_j e^{b_j})] over the valid slots
  (`losses.relaxed_ranking_loss` per row): ordered [B, K] scores in the order to learn, below
  [B, L] scores of the items pooled underneath."""
  return losses.relaxed_ranking_loss(ordered, below, where=ordered_valid,
                                     pooled_where=below_valid, reduce_fn=None)


def contains_sorted(rows: jax.Array, items: jax.Array) -> jax.Array:
  """bool [B, D]: whether items[b, d] occurs in the ascending row rows[b] ([B, M])."""
  idx = jax.vmap(jnp.searchsorted)(rows, items)
  return jnp.take_along_axis(rows, jnp.minimum(idx, rows.shape[-1] - 1), axis=-1) == items


def unique_user_rows(cache: dict, batch: dict, num_users: int) -> dict:
  """The cache rows of the global batch's unique users: {'users', 'mask', **rows}."""
  users, mask = batch["global"].unique(batch["user"], batch["weight"] > 0, fill=num_users)
  users = jnp.minimum(users, num_users - 1)
  return dict({k: v[users] for k, v in cache.items()}, users=users, mask=mask)


def listwise_loss(models, outputs, batch, rows: dict, first: str, second: str) -> tuple:
  """Sum over unique users of the relaxed ranking loss of the student's scores of rows[first]
  (in order) above rows[second]; returns (this device's share, the global sum)."""
  z1 = models["student"].score(outputs["student"], rows["users"], rows[first])
  z2 = models["student"].score(outputs["student"], rows["users"], rows[second])
  per_user = relaxed_ranking_loss(z1, rows[first + "_valid"], z2, rows[second + "_valid"])
  total = jnp.sum(jnp.where(rows["mask"], per_user, 0.0))
  return batch["global"].share(total), total


def make(cfg, models, data) -> Method:
  require_pairs("rrd", models)
  num_users, num_items = data.num_users, data.num_items
  m = min(int(cfg.top_m), num_items)
  k, n_unint = int(cfg.num_interesting), int(cfg.num_uninteresting)
  if not 1 <= k <= m:
    raise ValueError(f"rrd: num_interesting must be in [1, top_m], got {k}")
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  lists = ranking.TopLists(models["teacher"].score_all, train, num_users, num_items, m,
                           budget_mb=cfg.get("lists_budget_mb", 2048),
                           chunk=cfg.get("list_chunk", 256))
  log_probs = -jnp.arange(1, m + 1, dtype=jnp.float32) / cfg.temperature

  def draw(key, users, items, valid):
    """One epoch's interesting (teacher order) and uninteresting items of a chunk of users."""
    k_int, k_unint = jax.random.split(key)
    pos = ranking.gumbel_top_k_rows(ranking.per_user_keys(k_int, users),
                                    jnp.where(valid, log_probs, -jnp.inf), k)
    pos = jnp.sort(pos, axis=-1)  # teacher order
    top_sorted = jnp.sort(jnp.where(valid, items, num_items), axis=-1)

    def excluded(cand):
      return sparse.contains(train, users[:, None], cand) | contains_sorted(top_sorted, cand)

    unint, unint_valid = ranking.uniform_distinct(ranking.per_user_keys(k_unint, users), n_unint,
                                                  num_items, excluded)
    return {"interesting": jnp.take_along_axis(items, pos, axis=-1),
            "interesting_valid": jnp.take_along_axis(valid, pos, axis=-1),
            "uninteresting": unint, "uninteresting_valid": unint_valid}

  def refresh(static, params, carry, key, epoch):
    del epoch
    return lists.all_rows(static, params["teacher"], lambda u, it, va: draw(key, u, it, va)), carry

  def sample(view, batch, keys, key):
    del keys, key
    return unique_user_rows(view["cache"], batch, num_users)

  def loss(outputs, batch, samples, hp):
    share, total = listwise_loss(models, outputs, batch, samples, "interesting",
                                 "uninteresting")
    return ({"student": hp["lambda_rrd"] * share},
            {"rrd": share, "rrd_users": batch["global"].share(jnp.sum(samples["mask"]))})

  return Method(name="rrd", loss=loss, learners=("student",), sample=sample,
                prepare=lambda frozen: lists.build(frozen["teacher"]), refresh=refresh,
                refresh_every=1, refresh_reads=("teacher",), hparams={"lambda_rrd": cfg.lambda_rrd})
