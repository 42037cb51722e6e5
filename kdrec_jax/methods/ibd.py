r"""iBD — BD with multi-round feedback re-distillation (after W. Du, J. Intelligent & Fuzzy
Systems 44(3), 2023).

The paper keeps BD's loss and changes which items are distilled: a *shallow* stage of plain BD,
then *multiple distillation* rounds in which items that were sampled for a user and are still not
corrected are distilled again. Its equations are not public; the formalisation below is ours
(docs/methods/ibd.md). It reduces exactly to BD when beta = 0 (bit for bit, same seed).

Rounds. A round is one refresh period: round r = floor(epoch / P), P = `refresh_every` epochs,
starting with the refresh at epoch r P. At that refresh both models rank all items from their
current params (the snapshot; rank 1 = best, 0 for excluded positives):

  K(u,i)      = [R_T(u,i) > 0 and R_S(u,i) > 0]                            (rankable)
  d_S(u,i)    = R_S - R_T   ('paper' rank_sign; 'notebook': R_T - R_S)     (T->S: student learns)
  d_T(u,i)    = -d_S(u,i)                                                   (S->T: teacher learns)
  b_S = K tanh(max(eps_t d_S, 0)),   b_T = K exp(eps_e d_T)                (BD's weights)

d_dir > 0: the direction's guide ranks the item above its learner. Per direction dir in {S, T}
the train step records C_dir^(r)(u,i) in {0,1}: item i was drawn for user u in that direction
during round r (pair batches: the sampled ids; user batches: the 0/1 masks; padding and users
without a valid draw are not recorded). At the refresh starting round r >= 1, with
A^(r) = [r >= R0] (R0 = `shallow_rounds`; rounds r < R0 are the shallow stage, plain BD):

  F_dir^(r)(u) = { i : C_dir^(r-1)(u,i) = 1, K(u,i), d_dir^(r)(u,i) > delta }
                 (sampled last round and still not corrected)
    strict:      ... and K^(r-1)(u,i) and d_dir^(r)(u,i) >= kappa d_dir^(r-1)(u,i)  (no progress)
  G_dir^(r)(u) = A^(r) F_dir^(r)(u)                          (feedback='discrepancy')
               = A^(r) * a uniformly random subset of E_dir(u) = { i : b_dir(u,i) > 0 } of size
                 min(|F_dir^(r)(u)|, |E_dir(u)|), drawn from the refresh's key  (feedback='random')
  gamma = 0:     w_dir^(r)(u,i) = b_dir^(r)(u,i) (1 + beta 1[i in G_dir^(r)(u)])
  gamma > 0:     H_dir^(r) = gamma H_dir^(r-1) + 1[G_dir^(r)],  H^(-1) = 0,
                 w_dir^(r)(u,i) = b_dir^(r)(u,i) (1 + beta H_dir^(r)(u,i))

Items are then drawn from w exactly as BD draws from b (its tables or per-batch weights, its
sampler and its loss: `bd.make(..., feedback=...)`). beta = 0 gives w = b: BD. The random control
(is it the feedback, or just more distillation?) up-weights as many items per user, at random
among those BD can draw in that direction (for delta >= 0, F_dir is a subset of E_dir).

Per-round statistics (written to metrics.jsonl as {'phase', 'epoch', 'refresh': ...} at every
refresh; all zero / null at round 0, which has no previous round): 'round' r, 'feedback' A^(r),
and per direction ('student': T->S, 'teacher': S->T), means over all users u of
  sampled     |C^(r-1)(u)|                                  (distinct items drawn last round)
  corrected   |{i in C^(r-1)(u) : K, d^(r) <= delta}|        (discrepancy fell to <= delta)
  reselected  |F^(r)(u)|                                     (by the rule, in both stages)
  boosted     |G^(r)(u)|                                     (the set actually up-weighted)
and 'mean_d', the mean of d^(r) over all recorded (u, i), 'd_hist', their counts in the bins of
`HIST_EDGES` (with 'strict' also 'mean_d_prev', the
mean of d^(r-1) over them: the discrepancy when they were sampled).

State. The records are packed bitsets in the carry ({'record': {dir: uint32 [U, ceil(I/32)]}}),
written by the step (gathered over devices: 4 devices give the result of 1) and checkpointed with
it, so a run resumed mid-round is bit-identical. 'strict' adds the params of the previous refresh
('prev', to re-rank for d^(r-1)); gamma > 0 adds H ('history', float32 [U, I] per direction,
e.g. 0.5 GB each on CiteULike). The checkpoint's snapshot holds a second copy (the carry the last
refresh read).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import ranking, sparse
from kdrec_jax.methods import Method, bd

LABEL = "iBD"
PAPER = ("Du, Improved rank discrepancy-aware sampling based on bidirectional distillation, "
         "J. Intelligent & Fuzzy Systems 44(3), 2023")
# BD's settings plus the feedback's (the formalisation is ours: module docstring).
DEFAULTS = dict(
    bd.DEFAULTS,
    beta=1.0,               # up-weighting (1 + beta) of re-selected items; 0 is BD, bit for bit
    delta=0.0,              # "not corrected": discrepancy still > delta
    strict=False,           # also require no progress: d^(r) >= kappa d^(r-1)
    kappa=1.0,
    gamma=0.0,              # > 0: history H = gamma H + 1[F], weights (1 + beta H)
    shallow_rounds=1,       # rounds (refresh periods) of plain BD before the feedback starts
    feedback="discrepancy",  # 'random': as many items per user, at random (the control)
)

# The learner of each direction: 'student' is T->S (weights b_S), 'teacher' is S->T (b_T).
DIRECTIONS = ("student", "teacher")
FEEDBACK = ("discrepancy", "random")
_BITS = 32


def num_words(num_items: int) -> int:
  """uint32 words per bitset row of `num_items` items."""
  return -(-num_items // _BITS)


def pack_bits(mask: jax.Array) -> jax.Array:
  """bool (or 0/1) [..., N] -> uint32 [..., ceil(N/32)]: item i is bit i % 32 of word i // 32."""
  n = mask.shape[-1]
  pad = [(0, 0)] * (mask.ndim - 1) + [(0, num_words(n) * _BITS - n)]
  bits = jnp.pad((mask != 0).astype(jnp.uint32), pad)
  bits = bits.reshape(*mask.shape[:-1], -1, _BITS)
  # Distinct powers of two: their sum is their OR.
  return jnp.sum(bits << jnp.arange(_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_bits(words: jax.Array, num_items: int) -> jax.Array:
  """uint32 [..., W] -> bool [..., num_items] (the inverse of `pack_bits`)."""
  bits = (words[..., None] >> jnp.arange(_BITS, dtype=jnp.uint32)) & jnp.uint32(1)
  return bits.reshape(*words.shape[:-1], -1)[..., :num_items].astype(bool)


def _segment_or(start: jax.Array, values: jax.Array) -> jax.Array:
  """Inclusive OR-scan of `values` [E, ...] restarting where `start` [E] is True."""
  def op(a, b):
    (fa, va), (fb, vb) = a, b
    fb_ = fb.reshape(fb.shape + (1,) * (vb.ndim - fb.ndim))
    return fa | fb, jnp.where(fb_, vb, va | vb)
  return jax.lax.associative_scan(op, (start, values))[1]


def _or_into(record: jax.Array, rows: jax.Array, cols: Optional[jax.Array],
             values: jax.Array) -> jax.Array:
  """record[rows[e], cols[e]] |= values[e] (whole rows when `cols` is None), for entries sorted
  by (row, col); rows == U (the row count) are skipped. Duplicates are OR-combined first, so the
  scatter writes each cell once (deterministic)."""
  num_rows = record.shape[0]
  same = rows[1:] == rows[:-1]
  if cols is not None:
    same = same & (cols[1:] == cols[:-1])
  start = jnp.concatenate([jnp.ones((1,), bool), ~same])
  acc = _segment_or(start, values)
  end = jnp.concatenate([start[1:], jnp.ones((1,), bool)])
  target = jnp.where(end, rows, num_rows)  # one write per (row, col) run; others dropped
  safe = jnp.minimum(rows, num_rows - 1)
  if cols is None:
    return record.at[target].set(record[safe] | acc, mode="drop")
  return record.at[target, cols].set(record[safe, cols] | acc, mode="drop")


def record_items(record: jax.Array, users: jax.Array, items: jax.Array,
                 ok: jax.Array) -> jax.Array:
  """Sets the bits of (users[e], items[e]) where ok[e] in the bitset `record` uint32 [U, W].

  users, items, ok: [E] (any order, duplicates allowed). Returns the updated record.
  """
  num_users = record.shape[0]
  rows = jnp.where(ok, users, num_users).astype(jnp.int32)
  items = items.astype(jnp.int32)
  words = items // _BITS
  bits = jnp.left_shift(jnp.uint32(1), (items % _BITS).astype(jnp.uint32))
  rows, words, bits = jax.lax.sort((rows, words, bits), num_keys=2)
  return _or_into(record, rows, words, bits)


def record_rows(record: jax.Array, users: jax.Array, packed: jax.Array,
                ok: jax.Array) -> jax.Array:
  """record[users[b]] |= packed[b] where ok[b]: record uint32 [U, W], users [B], packed uint32
  [B, W] (`pack_bits` of 0/1 masks), ok [B]; users may repeat. Returns the updated record."""
  rows = jnp.where(ok, users, record.shape[0]).astype(jnp.int32)
  order = jnp.argsort(rows, stable=True)
  return _or_into(record, rows[order], None, packed[order])


def feedback_set(d: jax.Array, sampled: jax.Array, keep: jax.Array, delta: float,
                 prev: Optional[tuple[jax.Array, jax.Array]] = None,
                 kappa: float = 1.0) -> jax.Array:
  """F = sampled & keep & (d > delta), and with `prev` = (d_prev, keep_prev) (strict) also
  keep_prev & (d >= kappa d_prev). All arrays [C, I] (d float, the others bool); returns bool."""
  f = sampled & keep & (d > delta)
  if prev is not None:
    d_prev, keep_prev = prev
    f = f & keep_prev & (d >= kappa * d_prev)
  return f


def random_subset(keys: jax.Array, eligible: jax.Array, sizes: jax.Array) -> jax.Array:
  """Per row, min(sizes[c], |eligible[c]|) items drawn uniformly without replacement among the
  `eligible` ones: bool [C, I]. keys: one PRNG key per row [C]; eligible bool [C, I]; sizes [C]."""
  order = ranking.ranks(ranking.uniform_rows(keys, eligible.shape[-1]), exclude=~eligible)
  return (order > 0) & (order <= sizes[:, None])


def reweight(w: jax.Array, x: jax.Array, beta: float) -> jax.Array:
  """w (1 + beta x): BD's weights [C, I] times the feedback factor (x: 1[G] or H)."""
  return w * (1.0 + beta * x.astype(w.dtype))


def update_history(h: jax.Array, boosted: jax.Array, gamma: float) -> jax.Array:
  """H^(r) = gamma H^(r-1) + 1[G^(r)] (float32 [C, I])."""
  return gamma * h + boosted.astype(h.dtype)


# Bin edges of the discrepancy histogram of the sampled items (rank positions; signed, roughly
# logarithmic): bin b holds HIST_EDGES[b] <= d < HIST_EDGES[b + 1], the outer bins open.
HIST_EDGES = (-10000, -3000, -1000, -300, -100, -30, -10, 0, 10, 30, 100, 300, 1000, 3000,
              10000)


def discrepancy_histogram(d: jax.Array, seen: jax.Array) -> jax.Array:
  """float32 [C, len(HIST_EDGES) + 1]: per row, counts of d over the `seen` items in the bins
  (-inf, e_0), [e_0, e_1), ..., [e_last, inf)."""
  edges = (-np.inf, *HIST_EDGES, np.inf)
  cols = [jnp.sum(seen & (d >= lo) & (d < hi), axis=-1, dtype=jnp.int32)
          for lo, hi in zip(edges[:-1], edges[1:])]
  return jnp.stack(cols, axis=-1).astype(jnp.float32)


def round_stats(d: jax.Array, sampled: jax.Array, keep: jax.Array, delta: float,
                chosen: jax.Array, boosted: jax.Array,
                prev: Optional[tuple[jax.Array, jax.Array]] = None) -> dict:
  """Per-user counts of one direction at a refresh, float32 [C] each: 'sampled' |C|,
  'corrected' |C & keep & d <= delta|, 'reselected' |F| (`chosen`), 'boosted' |G|, 'd_sum' and
  'd_count' (sum and count of d over C & keep), with `prev` = (d_prev, keep_prev) also
  'd_prev_sum' and 'd_prev_count' (over C & keep_prev)."""
  f32 = jnp.float32
  count = lambda m: jnp.sum(m, axis=-1, dtype=jnp.int32).astype(f32)  # noqa: E731
  seen = sampled & keep
  out = {"sampled": count(sampled), "corrected": count(seen & (d <= delta)),
         "reselected": count(chosen), "boosted": count(boosted),
         "d_sum": jnp.sum(jnp.where(seen, d.astype(f32), 0.0), axis=-1, dtype=f32),
         "d_count": count(seen), "d_hist": discrepancy_histogram(d, seen)}
  if prev is not None:
    d_prev, keep_prev = prev
    seen_prev = sampled & keep_prev
    out["d_prev_sum"] = jnp.sum(jnp.where(seen_prev, d_prev.astype(f32), 0.0), axis=-1,
                                dtype=f32)
    out["d_prev_count"] = count(seen_prev)
  return out


def summarize(stats: dict, num_users: int) -> dict:
  """One direction's refresh statistics from per-user `round_stats` [U]: per-user means of the
  counts and the pooled mean discrepancies (NaN when nothing was recorded)."""
  total = {k: jnp.sum(v, axis=0, dtype=jnp.float32) for k, v in stats.items()}
  out = {k: total[k] / num_users for k in ("sampled", "corrected", "reselected", "boosted")}
  out["d_hist"] = total["d_hist"]  # counts of the recorded items per bin of HIST_EDGES
  out["mean_d"] = total["d_sum"] / total["d_count"]
  if "d_prev_sum" in total:
    out["mean_d_prev"] = total["d_prev_sum"] / total["d_prev_count"]
  return out


def _check(cfg) -> None:
  if cfg.feedback not in FEEDBACK:
    raise ValueError(f"ibd: feedback must be one of {FEEDBACK}, got {cfg.feedback!r}")
  if int(cfg.refresh_every) < 1:
    raise ValueError("ibd: rounds are refresh periods, so refresh_every must be >= 1, got "
                     f"{cfg.refresh_every}")
  if int(cfg.shallow_rounds) < 0 or float(cfg.beta) < 0 or float(cfg.gamma) < 0:
    raise ValueError("ibd: shallow_rounds, beta and gamma must be >= 0; got "
                     f"{cfg.shallow_rounds}, {cfg.beta}, {cfg.gamma}")


def make(cfg, models, data) -> Method:
  """iBD for `models` = {'teacher': Model, 'student': Model} on `data` (Interactions): BD's
  settings (see `bd.make`) plus beta, delta, kappa, gamma, shallow_rounds, strict, feedback."""
  _check(cfg)
  num_users, num_items = data.num_users, data.num_items
  every, first = int(cfg.refresh_every), int(cfg.shallow_rounds)
  beta, delta, kappa, gamma = (float(cfg.beta), float(cfg.delta), float(cfg.kappa),
                               float(cfg.gamma))
  strict, use_random = bool(cfg.strict), cfg.feedback == "random"
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  by_users = models["teacher"].batching.kind == "users"
  f32 = jnp.float32

  def rows(snapshot, carry, key, epoch, users, ranks, weights):
    """Per chunk of users [C]: (fb: G as bits, or H; out: H and the statistics)."""
    del snapshot
    r_t, r_s = ranks
    active = epoch // every >= first
    keep = (r_t > 0) & (r_s > 0)
    d_s = bd.discrepancy(r_t, r_s, cfg.rank_sign).astype(f32)
    prev_d = None
    if strict:  # d^(r-1): re-rank with the previous refresh's params
      p_t, p_s = bd.user_ranks(models, train, num_items, cfg.mask_positives, carry["prev"],
                               users, str(cfg.get("positive_scores", "rank")),
                               int(cfg.get("rank_buckets", 0)))
      p_d = bd.discrepancy(p_t, p_s, cfg.rank_sign).astype(f32)
      prev_d = {"student": p_d, "teacher": -p_d}
      keep_prev = (p_t > 0) & (p_s > 0)
    fb, out = {}, {"stats": {}, "history": {}}
    for index, (name, d, w) in enumerate(zip(DIRECTIONS, (d_s, -d_s), weights)):
      sampled = unpack_bits(carry["record"][name][users], num_items)
      prev = (prev_d[name], keep_prev) if strict else None
      chosen = feedback_set(d, sampled, keep, delta, prev, kappa)
      boosted = chosen & active
      if use_random:
        keys = ranking.per_user_keys(jax.random.fold_in(key, index), users)
        boosted = random_subset(keys, w > 0, jnp.sum(boosted, axis=-1, dtype=jnp.int32))
      out["stats"][name] = round_stats(d, sampled, keep, delta, chosen, boosted, prev)
      if gamma:
        fb[name] = out["history"][name] = update_history(carry["history"][name][users],
                                                         boosted, gamma)
      else:
        fb[name] = pack_bits(boosted)
    return fb, out

  def apply(fb, w_s, w_t):
    x = {n: fb[n] if gamma else unpack_bits(fb[n], num_items) for n in DIRECTIONS}
    return reweight(w_s, x["student"], beta), reweight(w_t, x["teacher"], beta)

  def finish(snapshot, carry, epoch, out):
    """The statistics (cache['metrics']) and the carry of the new round: an empty record."""
    new = {"record": jax.tree.map(jnp.zeros_like, carry["record"])}
    if strict:
      new["prev"] = {m: snapshot[m] for m in ("teacher", "student")}
    if gamma:
      new["history"] = out["history"]
    r = epoch // every
    metrics = {"round": r, "feedback": (r >= first).astype(f32),
               "d_hist_edges": jnp.asarray(HIST_EDGES, jnp.int32)}
    metrics.update({n: summarize(out["stats"][n], num_users) for n in DIRECTIONS})
    return {"metrics": metrics}, new

  def init_carry():
    words = num_words(num_items)
    carry = {"record": {n: jnp.zeros((num_users, words), jnp.uint32) for n in DIRECTIONS}}
    if strict:
      carry["prev"] = {m: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       jax.eval_shape(models[m].init, jax.random.key(0)))
                       for m in ("teacher", "student")}
    if gamma:
      carry["history"] = {n: jnp.zeros((num_users, num_items), f32) for n in DIRECTIONS}
    return carry

  def update_carry(carry, batch, samples):
    """Records this step's draws (all devices' batches, so every device's carry is the same)."""
    ok_rows = batch["weight"] > 0
    gather = batch["global"].gather
    users = gather(batch["user"])
    record = {}
    for name in DIRECTIONS:
      picked, valid = samples[name]
      ok = gather(ok_rows & valid)
      if by_users:  # picked: 0/1 mask [b, I], packed before the gather (32x less traffic)
        record[name] = record_rows(carry["record"][name], users,
                                   gather(pack_bits(picked)), ok)
      else:  # picked: item ids [b, n]
        items = gather(picked)
        n = items.shape[1]
        record[name] = record_items(carry["record"][name], jnp.repeat(users, n),
                                    items.reshape(-1), jnp.repeat(ok, n))
    return dict(carry, record=record)

  base = bd.make(cfg, models, data, feedback=bd.Feedback(rows=rows, apply=apply, finish=finish))
  return base._replace(name="ibd", init_carry=init_carry, update_carry=update_carry)
