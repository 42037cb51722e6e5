"""DCD — Dual Correction Distillation (Lee & Kim, "Dual Correction Strategy for Ranking
Distillation in Top-N Recommender System", CIKM'21).

Two variants (`variant`):

'authors' (default): the authors' code (dudwns511/DCD_CIKM21 `run_dcd.py::DCD`,
`Utils/dcd_loss.py::relaxed_ranking_loss`), user side and item side.
  Lists, once per phase from the frozen teacher (`prepare`): each user's top-M unobserved items
  and each item's top-M users among those who did not train on it (the authors load both lists
  precomputed; the item list's exclusion of training pairs is this library's reading, the
  mirror of the user side's).
  Weights, every `refresh_every` (3) epochs from the student (`refresh`): for each user, r_S is
  the student's 0-based rank of each listed item *among the M listed items* (its scores of the
  list, sorted; ties in teacher order) and r_T = 0..M-1 the teacher's position;
    under-estimation  w_u = tanh(max((r_S - r_T) / T, 0))
    over-estimation   w_o = tanh(max((r_T - r_S) / T, 0))
  (the authors multiply by `ep` = 1 / T; no floor: items the student ranks at or above the
  teacher have w_u = 0). The same for each item over its listed users.
  Draws, every step (`sample`): for each unique user of the global batch, K list positions drawn
  without replacement ∝ w_u, *sorted into teacher order*, and K ∝ w_o (draw order, pooled
  below); the same for each unique positive item of the batch over its listed users. As torch's
  `multinomial` (without replacement, the exponential-race form): when a row has fewer than K
  positive weights, the remaining slots take zero-weight positions (here: lowest positions
  first; torch leaves their order unspecified).
  Loss, with RRD's relaxed ranking loss on the student's raw logits:
    L = L_own + lambda_kd * sum_{unique users} RRD(under above over)          (UCD)
              + lambda_icd * sum_{unique positive items} RRD(under above over)  (ICD)
  (the authors' `UCD_lmbda` and `ICD_lmbda`; their repository passes all hyperparameters in
  `opt` without defaults).

'kds': the woriazzc/KDs reimplementation (`cf/baseline.py::DCD`), this library's only DCD
before the variants existed. Every `refresh_every` epochs, per user, over the teacher's top-M:
r_S is the student's 0-based rank of each listed item *among all items*,
  under ∝ max(tanh(max((r_S - r_T) / T, 0)), 1e-5), over ∝ max(tanh(max((r_T - r_S) / T, 0)),
  1e-5),
K items drawn from each without replacement at the refresh and kept in draw order; user side
only: L = L_own + lambda_kd * sum_{unique users} RRD(under above over). The student's ranks come
from its top-`rank_cap` list (cap = M + 10 ceil(T)): beyond it both weights are exactly their
saturated float32 values (tanh(x) rounds to 1 for x > 10, and the over-estimation weight is the
floor), so the capped ranks give the full ranking's weights without sorting all items.
`mask_positives` (default False, as KDs) excludes the user's training items from the student's
ranking.

The batch's unique users and items are gathered across devices (`batch['global'].unique`, in
`global_sets` only) and each device contributes its share (`batch['global'].share`) of the
identical global terms, so 4 devices give the numbers of 1.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kdrec_jax import ranking, sparse
from kdrec_jax.methods import Method, require_pairs
from kdrec_jax.methods.rrd import listwise_loss, relaxed_ranking_loss, unique_user_rows

LABEL = "DCD"
PAPER = "Lee & Kim, Dual Correction Strategy for Ranking Distillation, CIKM'21"
# The authors' DCD (dudwns511/DCD_CIKM21): user and item side, ranks within the teacher's top-M,
# re-ranking every 3 epochs, draws every step. Their repository gives no values: the RCE-KD /
# KDs CiteULike lambda, M, K, T for the user side, the same lambda for the item side.
# `variant='kds'` (with refresh_every=1) is the benchmark's own DCD.
DEFAULTS = dict(variant="authors", lambda_kd=0.01, lambda_icd=0.01, top_m=500, num_samples=100,
                temperature=10.0, refresh_every=3)

VARIANTS = ("authors", "kds")
_ZERO_FILL = -1e4  # below every log-weight + Gumbel draw: zero-weight slots fill in list order


# ---------------------------------------------------------------------------------------------
# 'kds': woriazzc/KDs
# ---------------------------------------------------------------------------------------------

def correction_weights(rank_s: jax.Array, rank_t: jax.Array, temperature) -> tuple:
  """'kds' (under-estimated, over-estimated) sampling weights from 0-based ranks (1e-5 floor)."""
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


def _make_kds(cfg, models, data) -> Method:
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
    share, _ = listwise_loss(models, outputs, batch, samples, "under", "over")
    return ({"student": hp["lambda_kd"] * share},
            {"dcd": share, "dcd_users": batch["global"].share(jnp.sum(samples["mask"]))})

  return Method(name="dcd", loss=loss, learners=("student",), sample=sample,
                prepare=lambda frozen: lists.build(frozen["teacher"]), refresh=refresh,
                refresh_every=int(cfg.get("refresh_every", 1)),
                refresh_reads=("teacher", "student"), hparams={"lambda_kd": cfg.lambda_kd})


# ---------------------------------------------------------------------------------------------
# 'authors': dudwns511/DCD_CIKM21
# ---------------------------------------------------------------------------------------------

def list_ranks(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """int32 [C, M]: each slot's 0-based rank by `scores` [C, M] among its row's valid slots
  (ties: lower slot first); invalid slots rank after every valid one."""
  order = jnp.argsort(jnp.where(valid, -scores.astype(jnp.float32), jnp.inf), axis=-1,
                      stable=True)
  return jnp.argsort(order, axis=-1).astype(jnp.int32)


def authors_weights(rank_s: jax.Array, valid: jax.Array, temperature) -> tuple:
  """(under, over) float32 [C, M]: tanh(max(+-(r_S - r_T) / T, 0)) with r_T the slot index, 0 in
  invalid slots (no floor)."""
  d = (rank_s - jnp.arange(rank_s.shape[-1], dtype=jnp.int32)).astype(jnp.float32) / temperature
  under = jnp.where(valid, jnp.tanh(jnp.maximum(d, 0.0)), 0.0)
  over = jnp.where(valid, jnp.tanh(jnp.maximum(-d, 0.0)), 0.0)
  return under, over


def draw_positions(keys: jax.Array, weights: jax.Array, valid: jax.Array, k: int,
                   sort: bool) -> jax.Array:
  """k distinct positions per row, successively ∝ `weights` [B, M] among the valid slots, as
  torch.multinomial without replacement; when fewer than k valid slots have a positive weight,
  the zero-weight valid slots fill in (lowest first), then invalid ones (flagged by the caller's
  validity). `sort`: returned in increasing position (teacher order), else in draw order."""
  m = weights.shape[-1]
  g = jax.vmap(lambda kk: jax.random.gumbel(kk, (m,), jnp.float32))(keys)
  slot = jnp.arange(m, dtype=jnp.float32)
  race = jnp.where(valid & (weights > 0), jnp.log(jnp.where(weights > 0, weights, 1.0)) + g,
                   jnp.where(valid, _ZERO_FILL - slot, -jnp.inf))
  pos = jax.lax.top_k(race, k)[1].astype(jnp.int32)
  return jnp.sort(pos, axis=-1) if sort else pos


def teacher_lists(score_all, params, train, num_users: int, num_items: int, m_users: int,
                  m_items: int, chunk: int) -> dict:
  """Both teacher lists in one pass over user chunks (one `score_all` per chunk):
  {'user_items' int32 [U, m_users], 'user_valid': each user's top unobserved items, best first,
   'item_users' int32 [N, m_items], 'item_valid': each item's top users among those without it
   in training, best first} (ties: lower id first; valid False past a row's candidates)."""
  n_chunks = -(-num_users // chunk)
  padded = jnp.arange(n_chunks * chunk, dtype=jnp.int32).reshape(n_chunks, chunk)

  def body(best, users):
    real = users < num_users
    ids = jnp.minimum(users, num_users - 1)
    scores = score_all(params, ids).astype(jnp.float32)
    excluded = sparse.row_mask(train, ids, num_items) | ~real[:, None]
    rows = ranking.top_unobserved(scores, excluded, m_users)
    cand_s = jnp.concatenate([best[0], jnp.where(excluded, -jnp.inf, scores).T], axis=1)
    cand_u = jnp.concatenate([best[1], jnp.broadcast_to(users, (num_items, chunk))], axis=1)
    top_s, idx = jax.lax.top_k(cand_s, m_items)  # earlier (lower) users win ties
    return (top_s, jnp.take_along_axis(cand_u, idx, axis=1)), rows

  init = (jnp.full((num_items, m_items), -jnp.inf, jnp.float32),
          jnp.full((num_items, m_items), num_users, jnp.int32))
  (item_s, item_u), (user_items, user_valid) = jax.lax.scan(body, init, padded)
  item_valid = item_s > -jnp.inf
  return {"user_items": user_items.reshape(-1, m_users)[:num_users],
          "user_valid": user_valid.reshape(-1, m_users)[:num_users],
          "item_users": jnp.where(item_valid, item_u, 0), "item_valid": item_valid}


def global_sets(batch, num_users: int, num_items: int) -> dict:
  """The global batch's unique users and unique positive items (the step's only cross-device
  calls for DCD): {'users', 'user_mask' [S], 'items', 'item_mask' [S]}, ids clamped in range."""
  valid = batch["weight"] > 0
  users, u_mask = batch["global"].unique(batch["user"], valid, fill=num_users)
  items, i_mask = batch["global"].unique(batch["pos"], valid, fill=num_items)
  return {"users": jnp.minimum(users, num_users - 1), "user_mask": u_mask,
          "items": jnp.minimum(items, num_items - 1), "item_mask": i_mask}


def _make_authors(cfg, models, data) -> Method:
  num_users, num_items = data.num_users, data.num_items
  m_u, m_i = min(int(cfg.top_m), num_items), min(int(cfg.top_m), num_users)
  k = int(cfg.num_samples)
  if not 1 <= k <= m_u:
    raise ValueError(f"dcd: num_samples must be in [1, top_m], got {k}")
  k_i = min(k, m_i)
  temperature = float(cfg.temperature)
  if temperature <= 0:
    raise ValueError(f"dcd: temperature must be > 0, got {temperature}")
  chunk = max(1, int(cfg.get("list_chunk", 256)))
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  student = models["student"]

  def prepare(frozen):
    return teacher_lists(models["teacher"].score_all, frozen["teacher"], train, num_users,
                         num_items, m_u, m_i, min(chunk, num_users))

  def side_weights(params, rows, cols, valid, transpose):
    """(under, over) [R, M] for `rows` (users, or items when `transpose`) and their lists."""
    if transpose:  # scores of (listed user, item)
      z = student.score(params, cols.reshape(-1),
                        jnp.repeat(rows, cols.shape[1])).reshape(cols.shape)
    else:
      z = student.score(params, rows, cols)
    return authors_weights(list_ranks(z, valid), valid, temperature)

  def by_chunks(n, fn):
    c = max(1, min(chunk, n))
    n_chunks = -(-n // c)
    ids = (jnp.arange(n_chunks * c, dtype=jnp.int32) % n).reshape(n_chunks, c)
    out = jax.lax.map(fn, ids)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:n], out)

  def refresh(static, params, carry, key, epoch):
    """{'user_under', 'user_over' [U, M], 'item_under', 'item_over' [N, M]}: the student's
    correction weights over the teacher's lists."""
    del key, epoch
    s = params["student"]
    uu, uo = by_chunks(num_users, lambda u: side_weights(
        s, u, static["user_items"][u], static["user_valid"][u], False))
    iu, io = by_chunks(num_items, lambda i: side_weights(
        s, i, static["item_users"][i], static["item_valid"][i], True))
    return {"user_under": uu, "user_over": uo, "item_under": iu, "item_over": io}, carry

  def sample(view, batch, keys, key):
    """This step's draws for the global batch's unique users and positive items."""
    del keys
    static, cache = view["static"], view["cache"]
    sets = global_sets(batch, num_users, num_items)
    out = dict(sets)
    sides = (("user", sets["users"], static["user_items"], static["user_valid"], k),
             ("item", sets["items"], static["item_users"], static["item_valid"], k_i))
    for (side, ids, lists, valid, kk), side_key in zip(sides, jax.random.split(key)):
      rows, rows_valid = lists[ids], valid[ids]
      for name, sort, draw_key in zip(("under", "over"), (True, False),
                                      jax.random.split(side_key)):
        pos = draw_positions(ranking.per_user_keys(draw_key, ids),
                             cache[f"{side}_{name}"][ids], rows_valid, kk, sort)
        out[f"{side}_{name}"] = jnp.take_along_axis(rows, pos, axis=-1)
        out[f"{side}_{name}_valid"] = jnp.take_along_axis(rows_valid, pos, axis=-1)
    return out

  def loss(outputs, batch, samples, hp):
    p = outputs["student"]
    users, items = samples["users"], samples["items"]
    z = {n: student.score(p, users, samples[f"user_{n}"]) for n in ("under", "over")}
    ucd = relaxed_ranking_loss(z["under"], samples["user_under_valid"], z["over"],
                               samples["user_over_valid"])
    zi = {n: student.score(p, samples[f"item_{n}"].reshape(-1),
                           jnp.repeat(items, samples[f"item_{n}"].shape[1])
                           ).reshape(samples[f"item_{n}"].shape) for n in ("under", "over")}
    icd = relaxed_ranking_loss(zi["under"], samples["item_under_valid"], zi["over"],
                               samples["item_over_valid"])
    terms = {"dcd": jnp.sum(jnp.where(samples["user_mask"], ucd, 0.0)),
             "dcd_icd": jnp.sum(jnp.where(samples["item_mask"], icd, 0.0)),
             "dcd_users": jnp.sum(samples["user_mask"]).astype(jnp.float32),
             "dcd_items": jnp.sum(samples["item_mask"]).astype(jnp.float32)}
    total = hp["lambda_kd"] * terms["dcd"] + hp["lambda_icd"] * terms["dcd_icd"]
    shares = batch["global"].share(dict(terms, total=total))
    return {"student": shares.pop("total")}, shares

  return Method(name="dcd", loss=loss, learners=("student",), sample=sample, prepare=prepare,
                refresh=refresh, refresh_every=int(cfg.get("refresh_every", 3)),
                refresh_reads=("student",),
                hparams={"lambda_kd": cfg.lambda_kd,
                         "lambda_icd": cfg.get("lambda_icd", cfg.lambda_kd)})


def make(cfg, models, data) -> Method:
  """DCD (`variant` 'authors' or 'kds'; module docstring) for pair-batched `models`.

  cfg: lambda_kd (user side), lambda_icd ('authors', item side; default lambda_kd), top_m,
  num_samples, temperature, refresh_every ('authors' 3, 'kds' 1), list_chunk (256);
  'kds' also lists_budget_mb (2048), mask_positives (False).
  """
  require_pairs("dcd", models)
  variant = cfg.get("variant", "authors")
  if variant not in VARIANTS:
    raise ValueError(f"dcd: variant must be one of {VARIANTS}, got {variant!r}")
  return _make_kds(cfg, models, data) if variant == "kds" else _make_authors(cfg, models, data)
