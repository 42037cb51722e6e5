"""BD — Bidirectional Distillation (Kweon, Kang & Yu, WWW'21).

Teacher and student teach each other. Every `refresh_every` epochs both models rank all
unobserved items (rank 1 = best). Then each training pair (u, i) draws, per direction, items by
rank discrepancy:

  student learns on  j ~ p_TS(j|u) ∝ tanh(max(eps_t * (rank_S - rank_T), 0))
                     (items the teacher ranks above the student)
  teacher learns on  j ~ p_ST(j|u) ∝ exp(eps_e * (rank_T - rank_S))
                     (items the student ranks above the teacher)

and the learner fits the guide's softened prediction with a summed binary cross-entropy,
BCE(sg(sigma(z_guide / tau)), sigma(z_learner)), weighted lambda_TS (student) / lambda_ST
(teacher), on top of its own loss.

The public notebook differs in four ways, each a switch here: `rank_sign='notebook'` (its
ascending argsort inverts both discrepancies), `mask_positives=False` (training positives can be
sampled), `positive_scores='zero'` (it ranks score x (1 - train mask), so positives score 0) and
`bpr_negative='bd_sample'` (the BD-sampled item doubles as the BPR negative).

With user-batched models (CDAE) a user draws `num_samples * |I+_u|` items per direction (the
CDAE notebook's 5 |I+_u|), kept as a 0/1 mask over items (`ranking.draws_mask`), and the BCE
reads the learner's and guide's training-mode logits for the whole row.

Three ways to keep the sampling state (`sampling_state`, 'auto' picks the first that fits in
`table_budget_mb` and in half the memory the device has free; see `choose_sampling_state`):
- 'tables': the refresh stores per-user cumulative weights for all items (two U x I float32
  tables) and a draw is a binary search;
- 'draws' (pair batches, refresh_every >= 1): the refresh draws, from the same weights, every
  BD item the coming period's steps will use (per training pair, epoch of the period and
  direction: 2 x pairs x refresh_every x num_samples int32) and a step reads its pairs' rows. The
  draws are i.i.d. from each user's weights as in 'tables', from another random stream; memory is
  O(pairs), the cost a refresh's;
- 'snapshot': the state is the parameter snapshot and each step ranks its batch's users from it
  (memory O(batch x items), an epoch costs about as many row sorts as 20 refreshes).
`rank_buckets` > 0 ranks with `ranking.histogram_ranks` (opt-in: |rank error| <= half the
occupancy of the item's bin; the exact sort otherwise).

`make(..., feedback=Feedback(...))` reweights these weights by state built at each refresh (iBD,
`kdrec_jax.methods.ibd`), in all three forms of the sampling state; the sampler and the loss
are BD's. Without it BD is unchanged.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import losses, ranking, sparse
from kdrec_jax.methods import Method

LABEL = "BD"
PAPER = "Kweon, Kang & Yu, Bidirectional Distillation for Top-K Recommender System, WWW'21"
# The paper's semantics and the BD notebook's BPR-MF settings; the notebook's departures are the
# switches rank_sign, mask_positives, positive_scores and bpr_negative (module docstring).
DEFAULTS = dict(
    refresh_every=10, tau=5.0, lambda_ts=0.5, lambda_st=0.5, eps_t=1e-2, eps_e=1e-4,
    num_samples=1,
    rank_sign="paper",        # 'notebook': the public notebook's inverted discrepancies
    mask_positives=True,      # False: training positives can be sampled (notebook)
    positive_scores="rank",   # with mask_positives=False: 'zero' ranks score x (1 - train
                              # mask) as the notebooks (positives at score 0)
    bpr_negative="uniform",   # 'bd_sample': BD's item doubles as BPR negative (notebook)
    sampling_state="auto",    # tables / draws / snapshot; 'auto': the first that fits
    table_budget_mb=2048,     # the sampling state's memory budget (tables: 2 x U x I float32)
    rank_buckets=0,           # 0: exact ranks; > 0: histogram ranks (opt-in, bounded error)
    refresh_chunk=256)


def discrepancy(rank_t: jax.Array, rank_s: jax.Array, rank_sign: str = "paper") -> jax.Array:
  """The student's rank discrepancy d (the teacher's is -d), the same shape as the ranks: the
  student's BD weight grows with d, the teacher's with -d. 'paper': rank_S - rank_T (> 0: the
  teacher ranks the item above the student); 'notebook': the public notebook's inverted sign."""
  if rank_sign == "paper":
    return rank_s - rank_t  # > 0: the teacher ranks the item above the student
  if rank_sign == "notebook":
    return rank_t - rank_s
  raise ValueError(f"rank_sign must be 'paper' or 'notebook', got {rank_sign!r}")


def discrepancy_weights(rank_t: jax.Array, rank_s: jax.Array, eps_t: float, eps_e: float,
                        rank_sign: str = "paper") -> tuple[jax.Array, jax.Array]:
  """(student's weights p_TS, teacher's weights p_ST), unnormalised, 0 where a rank is 0.

  Ranks are 1 = best and 0 for excluded items.
  """
  d = discrepancy(rank_t, rank_s, rank_sign).astype(jnp.float32)
  keep = (rank_t > 0) & (rank_s > 0)
  w_student = jnp.where(keep, jnp.tanh(jnp.maximum(eps_t * d, 0.0)), 0.0)
  w_teacher = jnp.where(keep, jnp.exp(-eps_e * d), 0.0)
  return w_student, w_teacher


def soft_labels(guide_logits: jax.Array, tau) -> jax.Array:
  """The guide's softened prediction sigma(sg(z_guide) / tau), the learner's target."""
  return jax.nn.sigmoid(jax.lax.stop_gradient(guide_logits) / tau)


def distill_bce(learner_logits: jax.Array, guide_logits: jax.Array, tau) -> jax.Array:
  """Elementwise BCE of sigma(learner) against the stop-gradient soft label sigma(guide / tau)."""
  return losses.sigmoid_cross_entropy(learner_logits, soft_labels(guide_logits, tau),
                                      reduce_fn=None)


def table_bytes(num_users: int, num_items: int) -> int:
  return 2 * 4 * num_users * num_items


def draws_bytes(num_pairs: int, refresh_every: int, num_samples: int) -> int:
  return 2 * 4 * num_pairs * refresh_every * num_samples


SAMPLING_STATES = ("auto", "tables", "draws", "snapshot")


def available_mb() -> float:
  """Memory the default device has free, in MiB (GPU: its allocator's limit minus use; CPU: the
  host's MemAvailable); inf when unknown."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
      return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 2**20
  except Exception:  # noqa: BLE001 (backends without memory_stats)
    pass
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return float("inf")


def choose_sampling_state(cfg, num_users: int, num_items: int, num_pairs: int, by_users: bool,
                          free_mb: float | None = None) -> str:
  """The sampling state `cfg.sampling_state` names, or for 'auto' the first of tables, draws
  (pair batches with refresh_every >= 1) and snapshot whose memory fits in `table_budget_mb`
  and in half of `free_mb` (default: `available_mb()`)."""
  state = str(cfg.get("sampling_state", "auto"))
  if state not in SAMPLING_STATES:
    raise ValueError(f"sampling_state must be one of {SAMPLING_STATES}, got {state!r}")
  can_draw = not by_users and int(cfg.refresh_every) >= 1
  if state == "draws" and not can_draw:
    raise ValueError("sampling_state='draws' needs pair-batched models and refresh_every >= 1")
  if state != "auto":
    return state
  free = available_mb() if free_mb is None else free_mb
  budget = min(float(cfg.table_budget_mb), free / 2) * 2**20
  if table_bytes(num_users, num_items) <= budget:
    return "tables"
  if can_draw and draws_bytes(num_pairs, int(cfg.refresh_every), int(cfg.num_samples)) <= budget:
    return "draws"
  return "snapshot"


POSITIVE_SCORES = ("rank", "zero")


def student_beats_teacher(exp, params, num_bins: int = 4) -> dict:
  """BD's motivating observation, measured: the share of test users whose held-out item the
  student ranks strictly above the teacher does (best held-out rank, i.e. per-user MRR), over
  all users and by user activity (`num_bins` quantile bins of training interactions).
  `exp`: the run's `Experiment`; params: {'teacher', 'student'}."""
  ev = exp.evaluators["test"]
  mrr = {m: ev.per_user(exp.models[m].score_all, params[m], exp.eval_key)["MRR"]
         for m in ("teacher", "student")}
  better = mrr["student"] > mrr["teacher"]
  activity = np.diff(exp.data.split("train")[0])[ev.users]
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


def user_ranks(models, train: sparse.DeviceCSR, num_items: int, mask_positives: bool, params,
               users: jax.Array, positive_scores: str = "rank", rank_buckets: int = 0
               ) -> tuple[jax.Array, jax.Array]:
  """(teacher's, student's) ranks [C, I] of all items for `users` [C] under `params`
  ({'teacher', 'student'}): 1 = best, 0 for the training positives when `mask_positives`.

  Without the mask, `positive_scores` says how the positives are ranked: 'rank' by their scores;
  'zero' as the public notebooks do, by output x (1 - train mask), so every positive scores 0 on
  the model's output scale: CDAE's outputs are sigmoid probabilities (positives last), the other
  models' are raw scores (positives where 0 falls, mid-list for BPR-MF).
  `rank_buckets` > 0: `ranking.histogram_ranks` with that many bins instead of the exact sort.
  """
  if positive_scores not in POSITIVE_SCORES:
    raise ValueError(f"positive_scores must be one of {POSITIVE_SCORES}, got {positive_scores!r}")
  mask = sparse.row_mask(train, users, num_items) if (
      mask_positives or positive_scores == "zero") else None

  def ranks_of(scores, exclude=None):
    if rank_buckets:
      return ranking.histogram_ranks(scores, exclude, rank_buckets)[0]
    return ranking.ranks(scores, exclude)

  def rank(model, p):
    scores = model.score_all(p, users)
    if mask_positives:
      return ranks_of(scores, mask)
    if positive_scores == "zero":
      out = model.probabilities(scores) if model.probabilities else scores
      return ranks_of(jnp.where(mask, 0.0, out))
    return ranks_of(scores)

  return rank(models["teacher"], params["teacher"]), rank(models["student"], params["student"])


class Feedback(NamedTuple):
  """A reweighting of BD's sampling weights by per-user state built at each refresh (iBD's hook).

  rows(snapshot, carry, key, epoch, users, ranks, weights) -> (fb, out): called at the refresh on
    each chunk of users [C] with the models' ranks (rank_T, rank_S) [C, I] and BD's weights
    (w_student, w_teacher) [C, I] from `snapshot`. fb: the per-user rows `apply` reads (a pytree
    of [C, ...]); out: anything else the refresh collects over all users for `finish`.
  apply(fb, w_student, w_teacher) -> (w_student, w_teacher): the reweighted weights [C, I].
  finish(snapshot, carry, epoch, out) -> (cache, carry): entries added to the refresh's cache
    (out: [U, ...]) and the carry the period starts with.
  With sampling tables or pre-drawn samples, `apply` runs inside the refresh and the tables or
  draws come from the reweighted weights; in snapshot mode the cache keeps `fb` for all users
  ('feedback', [U, ...]) and each step applies it to its users' weights.
  """
  rows: Callable
  apply: Callable
  finish: Callable


def make(cfg, models, data, feedback: Optional[Feedback] = None) -> Method:
  """BD for `models` = {'teacher': Model, 'student': Model} on `data` (Interactions); with
  `feedback`, BD's weights reweighted as it says (see `Feedback`)."""
  num_users, num_items = data.num_users, data.num_items
  indptr, indices = data.split("train")
  train = sparse.DeviceCSR.from_numpy(indptr, indices)
  chunk = min(cfg.refresh_chunk, num_users)
  by_users = models["teacher"].batching.kind == "users"
  mode = choose_sampling_state(cfg, num_users, num_items, len(indices), by_users)
  use_tables, use_draws = mode == "tables", mode == "draws"
  logging.info("BD sampling state: %s", mode)
  rank_buckets = int(cfg.get("rank_buckets", 0))
  if rank_buckets < 0:
    raise ValueError(f"rank_buckets must be >= 0 (0: exact ranks), got {rank_buckets}")
  positive_scores = str(cfg.get("positive_scores", "rank"))
  if positive_scores not in POSITIVE_SCORES:
    raise ValueError(f"positive_scores must be one of {POSITIVE_SCORES}, got {positive_scores!r}")
  if cfg.mask_positives and positive_scores != "rank":
    raise ValueError(f"positive_scores={positive_scores!r} ranks the training positives, so it "
                     "needs mask_positives=False")

  def ranks_for(snapshot, users):
    return user_ranks(models, train, num_items, cfg.mask_positives, snapshot, users,
                      positive_scores, rank_buckets)

  def weights_for(snapshot, users):
    return discrepancy_weights(*ranks_for(snapshot, users), cfg.eps_t, cfg.eps_e, cfg.rank_sign)

  n_chunks = -(-num_users // chunk)
  if use_draws:  # the training pairs of each chunk of users: a contiguous range of the CSR
    every, n = int(cfg.refresh_every), int(cfg.num_samples)
    bounds = np.asarray(indptr, np.int64)[np.minimum(np.arange(n_chunks + 1) * chunk, num_users)]
    pair_slots = max(int(np.max(np.diff(bounds))), 1)
    bounds = jnp.asarray(bounds, jnp.int32)
    pair_user = jnp.asarray(data.train_pairs()[0])
    num_pairs = len(indices)

  def draw_pairs(keys, cdfs, first_user, start, end, buf):
    """Writes the draws for the pairs [start, end) of the users from `first_user` into `buf`."""
    slot = start + jnp.arange(pair_slots, dtype=jnp.int32)
    inside = slot < end
    slot = jnp.where(inside, slot, num_pairs)  # out of range: dropped by the scatter
    rows = pair_user[jnp.minimum(slot, num_pairs - 1)] - first_user
    out = []
    for k, cdf, b in zip(keys, cdfs, buf):
      items, valid = ranking.sample_from_cdf(ranking.per_user_keys(k, slot), cdf, rows,
                                             every * n)
      items = jnp.where(valid[:, None], items, -1).reshape(-1, every, n)
      out.append(b.at[slot].set(items, mode="drop"))
    return tuple(out)

  def refresh(static, snapshot, carry, key, epoch):
    del static  # BD's tables depend only on the two models (and the feedback's state)
    if feedback is None and mode == "snapshot":
      return {"snapshot": snapshot}, carry
    users = jnp.arange(n_chunks * chunk, dtype=jnp.int32) % num_users
    draw_keys = (jax.random.fold_in(key, 1 << 20), jax.random.fold_in(key, (1 << 20) + 1))

    def one(c, u, buf):  # user batches read weights; pair batches binary-search cumulative weights
      r_t, r_s = ranks_for(snapshot, u)
      w_s, w_t = discrepancy_weights(r_t, r_s, cfg.eps_t, cfg.eps_e, cfg.rank_sign)
      fb = out = None
      if feedback is not None:
        fb, out = feedback.rows(snapshot, carry, key, epoch, u, (r_t, r_s), (w_s, w_t))
        w_s, w_t = feedback.apply(fb, w_s, w_t)
      if mode == "snapshot":
        return buf, (None, fb, out)
      tables = (w_s, w_t) if by_users else (ranking.weights_cdf(w_s), ranking.weights_cdf(w_t))
      if use_draws:
        return draw_pairs(draw_keys, tables, c * chunk, bounds[c], bounds[c + 1], buf), (
            None, None, out)
      return buf, (tables, None, out)

    buf = ((jnp.zeros((num_pairs, every, n), jnp.int32),) * 2 if use_draws else None)
    buf, rows = jax.lax.scan(lambda b, xs: one(*xs, b), buf,
                             (jnp.arange(n_chunks), users.reshape(n_chunks, chunk)))
    tables, fb, out = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:num_users], rows)
    if use_tables:
      cache = {"table_student": tables[0], "table_teacher": tables[1]}
    elif use_draws:
      cache = {"draws_student": buf[0], "draws_teacher": buf[1],
               "draws_epoch": jnp.asarray(epoch, jnp.int32)}
    else:
      cache = {"snapshot": snapshot, "feedback": fb}
    if feedback is not None:
      extra, carry = feedback.finish(snapshot, carry, epoch, out)
      cache.update(extra)
    return cache, carry

  def snapshot_weights(state, users):
    """Weights for a batch's `users` from the snapshot (over the table budget)."""
    w_s, w_t = weights_for(state["snapshot"], users)
    if feedback is None:
      return w_s, w_t
    return feedback.apply(jax.tree.map(lambda x: x[users], state["feedback"]), w_s, w_t)

  def sample(view, batch, keys, key):
    del key
    state, users = view["cache"], batch["user"]
    k_s, k_t = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    n = cfg.num_samples
    if by_users:
      w_s, w_t = ((state["table_student"][users], state["table_teacher"][users]) if use_tables
                  else snapshot_weights(state, users))
      draws = n * train.row_lengths[users]
      return {"student": ranking.draws_mask(k_s, w_s, draws),
              "teacher": ranking.draws_mask(k_t, w_t, draws)}
    if use_draws:  # this pair's draws for this epoch of the period
      r = jnp.clip(view["epoch"] - state["draws_epoch"], 0, cfg.refresh_every - 1)
      s, t = (state[f"draws_{m}"][batch["example"], r] for m in ("student", "teacher"))
      return {"student": (jnp.maximum(s, 0), s[:, 0] >= 0),
              "teacher": (jnp.maximum(t, 0), t[:, 0] >= 0)}
    if use_tables:
      s = ranking.sample_from_cdf(k_s, state["table_student"], users, n)
      t = ranking.sample_from_cdf(k_t, state["table_teacher"], users, n)
    else:
      w_s, w_t = snapshot_weights(state, users)
      s = ranking.sample_from_weights(k_s, w_s, n)
      t = ranking.sample_from_weights(k_t, w_t, n)
    return {"student": s, "teacher": t}

  def loss(outputs, batch, samples, hp):
    """outputs: the models' params (pair batches) or training-mode logits [B, I] (user batches)."""
    users, weight = batch["user"], batch["weight"]
    out, aux = {}, {}
    for learner, guide, lam in (("student", "teacher", hp["lambda_ts"]),
                                ("teacher", "student", hp["lambda_st"])):
      picked, valid = samples[learner]
      w = (weight * valid)[:, None]
      if by_users:  # picked: 0/1 mask [B, I]
        z_learner, z_guide, w = outputs[learner], outputs[guide], w * picked
      else:  # picked: item ids [B, n]
        z_learner = models[learner].score(outputs[learner], users, picked)
        z_guide = models[guide].score(outputs[guide], users, picked)
      bce = losses.sigmoid_cross_entropy(z_learner, soft_labels(z_guide, hp["tau"]), weights=w)
      out[learner] = lam * bce
      aux[f"bd_{learner}"] = bce
      aux[f"valid_{learner}"] = jnp.sum(weight * valid)
    return out, aux

  def cf_negatives(samples, uniform):
    """The notebook's BPR negatives: the item BD sampled for the same pair and model."""
    return {m: jnp.where(samples[m][1], samples[m][0][:, 0], uniform[m]) for m in uniform}

  if cfg.bpr_negative not in ("uniform", "bd_sample"):
    raise ValueError(f"bpr_negative must be 'uniform' or 'bd_sample', got {cfg.bpr_negative!r}")
  if by_users and cfg.bpr_negative == "bd_sample":
    raise ValueError("bpr_negative='bd_sample' needs pair-batched models (one BD item per pair); "
                     f"{models['teacher'].name!r} trains on user batches")
  return Method(name="bd", loss=loss, learners=("teacher", "student"), sample=sample,
                report=lambda exp, params: {
                    "student_beats_teacher": student_beats_teacher(exp, params)},
                refresh=refresh, refresh_every=cfg.refresh_every,
                refresh_reads=("teacher", "student"),
                hparams={"tau": cfg.tau, "lambda_ts": cfg.lambda_ts, "lambda_st": cfg.lambda_st},
                cf_negatives=cf_negatives if cfg.bpr_negative == "bd_sample" else None)
