"""Top-K ranking metrics (HR, Recall, NDCG, MRR) under full-ranking and sampled protocols.

Conventions, shared by every function here:

* Rank 1 is best. A candidate ranks above another if its score is greater, or the scores are equal
  and its item id is smaller; this is exactly the order of a stable `argsort(-scores)` over the
  candidates listed by increasing item id (numpy's order, so NaN scores rank below every other
  score, -inf included). Scores are compared as float32 and -0.0 ties with +0.0.
* Candidates. 'full': every item except the user's training items and the items of the other
  held-out split ('test' excludes 'val' items, 'val' excludes 'test' items; with
  `exclude_other=False` only the training items are excluded, as in the RCE-KD/KDs code). Items with a -inf or
  NaN score are still candidates. Held-out items are always candidates, even if the data also lists
  them in train or in the other split. 'sampled': the user's held-out items plus `num_negatives`
  items drawn uniformly with replacement from the items the user has in none of train/val/test.
* Per user with held-out set H (|H| >= 1; users with an empty H are skipped) and ranks r_h:
  HR@K = 1[any r_h <= K]; Recall@K = #{r_h <= K} / |H|;
  NDCG@K = sum_{r_h <= K} 1/log2(r_h + 1) / sum_{r=1}^{min(K, |H|)} 1/log2(r + 1);
  MRR = 1 / min_h r_h (no cutoff). Reported values are means over evaluated users (or, with
  average='all', over all users, those without held-out items counting 0).
* Popularity bias (full protocol, on request): per item group g (`popularity_groups`),
  Recall@K/g and NDCG@K/g over the held-out items in g and Share@K/g, the fraction of the top-K
  list in g (`group_metrics`, `Evaluator(item_groups=...)(..., bias=True)`). Beside them, UnKD's
  own definitions (chengang95/UnKD `utils.py::RecallAndPrecisionByGroup`, averaged in
  `Procedure.py::TestAll`), named so they are not confused with ours: UnKDRecall@K/g (a user
  without held-out items in g counts 0, and the mean is over all evaluated users) and
  UnKDPrecision@K/g (the user's hits in g among its top K, divided by K).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence


import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import ranking, sparse
from kdrec_jax.data.interactions import Interactions
from kdrec_jax.data.popularity import groups as popularity_groups  # noqa: F401  (re-export)

ScoreFn = Callable[[Any, jax.Array], jax.Array]

DEFAULT_KS = (10, 20, 50, 100)
PROTOCOLS = ("full", "sampled")
AVERAGES = ("heldout", "all")

_EXCLUDED_KEY = ranking.EXCLUDED_KEY
order_key = ranking.order_key


def metric_names(ks: Sequence[int]) -> tuple[str, ...]:
  """Names of the metrics produced for cutoffs `ks`, in output order."""
  names = []
  for k in ks:
    names += [f"HR@{k}", f"Recall@{k}", f"NDCG@{k}"]
  return tuple(names) + ("MRR",)


def bias_metric_names(ks: Sequence[int], num_groups: int) -> tuple[str, ...]:
  """Names of the per-group (popularity bias) metrics for cutoffs `ks`, in output order."""
  names = []
  for g in range(num_groups):
    for k in ks:
      names += [f"Recall@{k}/g{g}", f"NDCG@{k}/g{g}", f"Share@{k}/g{g}",
                f"UnKDRecall@{k}/g{g}", f"UnKDPrecision@{k}/g{g}"]
  return tuple(names)


def ranking_metrics_from_ranks(ranks: jax.Array, valid: jax.Array, ks: Sequence[int]
                               ) -> dict[str, jax.Array]:
  """Per-row metrics from the 1-based ranks of each row's held-out items.

  Args:
    ranks: int [B, H], rank of each held-out item among the row's candidates. Ranks <= max(ks)
      must be exact; larger ones only enter through MRR, which needs the row minimum to be exact.
    valid: bool [B, H], False for padding slots; |H| of a row is its number of valid slots.
    ks: cutoffs.

  Returns:
    {name: float32 [B]} keyed as `metric_names(ks)`; rows with no valid slot give zeros.
  """
  ranks = ranks.astype(jnp.float32)
  num_rel = jnp.sum(valid, axis=-1)
  has_rel = num_rel > 0
  gain = jnp.where(valid, 1.0 / jnp.log2(ranks + 1.0), 0.0)
  out = {}
  for k in ks:
    hit = valid & (ranks <= k)
    disc = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))
    ideal = jnp.concatenate([jnp.zeros(1, jnp.float32), jnp.cumsum(disc)])
    idcg = ideal[jnp.minimum(num_rel, k)]
    dcg = jnp.sum(jnp.where(hit, gain, 0.0), axis=-1)
    out[f"HR@{k}"] = jnp.any(hit, axis=-1).astype(jnp.float32)
    out[f"Recall@{k}"] = jnp.sum(hit, axis=-1) / jnp.maximum(num_rel, 1).astype(jnp.float32)
    out[f"NDCG@{k}"] = jnp.where(has_rel, dcg / jnp.where(has_rel, idcg, 1.0), 0.0)
  best = jnp.min(jnp.where(valid, ranks, jnp.inf), axis=-1)
  out["MRR"] = jnp.where(has_rel, 1.0 / jnp.where(has_rel, best, 1.0), 0.0)
  return out


def ranks_among_candidates(keys: jax.Array, items: jax.Array, relevant: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """Ranks of relevant candidates given order keys and item ids per row.

  Args:
    keys: int32 [B, N] from `order_key`, or the excluded key for slots that are not candidates.
    items: int32 [B, N] item ids (ties are broken by smaller id).
    relevant: bool [B, N], held-out candidates.

  Returns:
    (ranks int32 [B, N], valid bool [B, N]) for `ranking_metrics_from_ranks`; slots are in rank
    order, so ranks is simply 1..N and valid marks where relevant candidates landed.
  """
  _, _, rel = jax.lax.sort((~keys, items, relevant.astype(jnp.int32)), dimension=-1, num_keys=2)
  ranks = jnp.broadcast_to(jnp.arange(1, keys.shape[-1] + 1, dtype=jnp.int32), keys.shape)
  return ranks, rel.astype(bool)


def full_ranks(scores: jax.Array, users: jax.Array, excluded: sparse.DeviceCSR,
               held: sparse.DeviceCSR, max_k: int) -> tuple[jax.Array, jax.Array]:
  """Ranks of each user's held-out items among all non-excluded items, exact up to `max_k`
  (and the row minimum exact, for MRR), in the contract of `ranking_metrics_from_ranks`.

  The rank of a held-out item is 1 + the number of candidates ordered before it (higher key, or
  equal key and smaller id). With one held-out slot (leave-one-out) that count is one [C, I]
  comparison. With several, counting costs one pass per slot (200 on a ratio split), so when
  every candidate score is finite the ranks come from the top-`max_k` list instead (a float
  `top_k`, ties to the lower id, exactly our order) plus one count for the best held-out item;
  a chunk with a non-finite candidate score falls back to counting per slot. Returns
  (ranks [C, H], valid [C, H]), H = `held.max_len`; ranks beyond `max_k` other than the row
  minimum are only known to exceed `max_k`.
  """
  num_users, num_items = scores.shape
  is_held = sparse.row_mask(held, users, num_items)
  candidate = ~sparse.row_mask(excluded, users, num_items) | is_held
  key = jnp.where(candidate, order_key(scores), jnp.int32(_EXCLUDED_KEY))
  ids = jnp.arange(num_items, dtype=jnp.int32)[None, :]
  held_items, valid = sparse.padded_rows(held, users, pad=0)
  held_keys = jnp.take_along_axis(key, held_items, axis=-1)

  def count_before(k, i):  # [C] ranks of items with keys k [C] and ids i [C]
    before = candidate & ((key > k[:, None]) | ((key == k[:, None]) & (ids < i[:, None])))
    return 1 + jnp.sum(before, axis=-1, dtype=jnp.int32)

  def by_counting(_):
    return jax.lax.map(lambda slot: count_before(held_keys[:, slot], held_items[:, slot]),
                       jnp.arange(held.max_len)).T

  def by_top_k(_):
    k = min(int(max_k), num_items)
    s = scores.astype(jnp.float32)
    s = jnp.where(candidate, jnp.where(s == 0, 0.0, s), -jnp.inf)  # -0.0 ties +0.0
    top = jax.lax.top_k(s, k)[1]
    match = held_items[:, :, None] == top[:, None, :]  # [C, H, k]
    in_top = jnp.any(match, axis=-1) & valid
    position = jnp.argmax(match, axis=-1).astype(jnp.int32) + 1
    # The best held-out item (highest key, then lowest id) and its exact rank.
    hk = jnp.where(valid, held_keys, jnp.int32(_EXCLUDED_KEY))
    best_key = jnp.max(hk, axis=-1)
    best_id = jnp.min(jnp.where(hk == best_key[:, None], held_items, num_items), axis=-1)
    best_rank = count_before(best_key, best_id)
    return jnp.where(in_top, position, jnp.maximum(best_rank, k + 1)[:, None])

  if held.max_len <= 1:
    ranks = by_counting(None)
  else:
    finite = jnp.all(jnp.isfinite(scores) | ~candidate)
    ranks = jax.lax.cond(finite, by_top_k, by_counting, None)
  return jnp.where(valid, ranks, 0), valid


def top_k_candidates(scores: jax.Array, candidate: jax.Array, k: int
                     ) -> tuple[jax.Array, jax.Array]:
  """Each row's top-k candidates, best first, in the library's order (ties to the lower id;
  NaN, -inf and -0.0 as `order_key`).

  `ranking.top_k_keys` on the int32 order keys, non-candidates at `EXCLUDED_KEY` (on CPU a
  float `lax.top_k` on `ranking.key_floats` for small k, the threshold pass for large k).
  scores [C, N], candidate bool [C, N]. Returns (items int32 [C, k], valid bool [C, k]); valid
  is False beyond the row's number of candidates.
  """
  key = jnp.where(candidate, order_key(scores), jnp.int32(_EXCLUDED_KEY))
  items = ranking.top_k_keys(key, k)
  return items, jnp.take_along_axis(key, items, axis=-1) != _EXCLUDED_KEY


def _top_k_rows(scores: jax.Array, flat: jax.Array, k: int, need: jax.Array, group: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The top-k (ids, values) of the candidates of the rows of float32 `scores` [C, N] (ties by
  lower id; -0.0 as +0.0) where `need`; other rows get ids 0 and values -inf. `flat`: the
  chunk's excluded positions (`ranking.chunk_positions`), set to -inf. The needed rows are
  gathered `group` at a time (a while loop over as many groups as needed), so a chunk where few
  rows need a list pays little for XLA's CPU top-k (~2 ns per item). Also returns whether a
  needed row has a NaN or -inf score (where this float top-k is not the library's order)."""
  c, n = scores.shape
  order = jnp.argsort(~need, stable=True).astype(jnp.int32)  # needed rows first
  n_need = jnp.sum(need, dtype=jnp.int32)
  order = jnp.concatenate([order, jnp.full((group,), c, jnp.int32)])
  flat_row, flat_col = flat // n, flat % n  # padding: row c

  def body(state):
    g, ids, vals, special = state
    rows = jax.lax.dynamic_slice(order, (g * group,), (group,))
    sub = scores[jnp.minimum(rows, c - 1)]
    special = special | jnp.any((rows < c)[:, None] & (jnp.isnan(sub) | (sub == -jnp.inf)))
    slot = jnp.full((c + 1,), group, jnp.int32).at[rows].set(
        jnp.arange(group, dtype=jnp.int32), mode="drop")[flat_row]  # group: not in this group
    sub = sub.reshape(-1).at[slot * n + flat_col].set(-jnp.inf, mode="drop").reshape(group, n)
    top_vals, top_ids = jax.lax.top_k(jnp.where(sub == 0, jnp.float32(0), sub), k)
    ids = ids.at[rows].set(top_ids.astype(jnp.int32), mode="drop")  # padding rows: dropped
    vals = vals.at[rows].set(top_vals, mode="drop")
    return g + 1, ids, vals, special

  init = (jnp.int32(0), jnp.zeros((c, k), jnp.int32), jnp.full((c, k), -jnp.inf, jnp.float32),
          jnp.bool_(False))
  _, ids, vals, special = jax.lax.while_loop(lambda s: s[0] * group < n_need, body, init)
  return ids, vals, special


def fast_full_ranks(scores: jax.Array, users: jax.Array, splits: Sequence[dict], max_k: int
                    ) -> list[tuple[jax.Array, jax.Array]]:
  """`full_ranks` for several held-out splits of the same chunk of scores, from one pass each.

  splits: per split {'flat': int32 [E] (this chunk's `ranking.chunk_positions` row: the
  excluded items), 'held', 'excluded': DeviceCSR (as `full_ranks`), 'share': index of an
  earlier split with the same candidates or -1}. Per split, the best held-out item's rank is
  counted (rank by counting): one pass over the chunk's scores counts the items ordered before
  it (higher score, or equal score and lower id: exactly `order_key`'s order, NaN below all,
  unless the best item's own score is NaN), for up to 31 // bits(N) splits at once in the bit
  fields of one int32 sum, minus those among the E excluded positions (a gather). Only rows where that rank is <= k = min(max_k, N) can have other held-out items
  within k, and only those rows get the candidates' top-k list (XLA's float `lax.top_k`,
  excluded items at -inf, `_top_k_rows`); the held-out items' ranks up to k are their positions
  in it. Splits with the same candidates share the list. The ranks equal `full_ranks`' wherever
  those are defined (up to k, and the row minimum), so the metrics are identical. A chunk where
  a held-out score is NaN, or a row that needs a list has a NaN or -inf score (where -inf
  candidates would tie with excluded items), takes `full_ranks` per split (`lax.cond`).
  """
  c, n = scores.shape
  k = min(int(max_k), n)
  s = scores.astype(jnp.float32)  # float compares tie -0.0 with +0.0
  ids = jnp.arange(n, dtype=jnp.int32)[None, :]
  per_split, special, befores = [], jnp.bool_(False), []
  for sp in splits:
    held_items, valid = sparse.padded_rows(sp["held"], users, pad=0)
    hs = jnp.take_along_axis(s, held_items, axis=-1)
    special = special | jnp.any(valid & jnp.isnan(hs))
    best = jnp.max(jnp.where(valid, hs, -jnp.inf), axis=-1)
    best_id = jnp.min(jnp.where(valid & (hs == best[:, None]), held_items, n), axis=-1)
    befores.append((s > best[:, None]) | ((s == best[:, None]) & (ids < best_id[:, None])))
    per_split.append((held_items, valid, hs, best, best_id))
  # The counts, several splits' packed into the bit fields of one int32 sum (one pass).
  bits = max(1, n.bit_length())
  per_word = max(1, 31 // bits)
  counts = []
  for w in range(0, len(splits), per_word):
    word = sum(b.astype(jnp.int32) << (bits * j) for j, b in enumerate(befores[w:w + per_word]))
    total = jnp.sum(word, axis=-1, dtype=jnp.int32)
    counts += [(total >> (bits * j)) & ((1 << bits) - 1)
               for j in range(len(befores[w:w + per_word]))]
  for j, sp in enumerate(splits):
    held_items, valid, hs, best, best_id = per_split[j]
    # Minus the excluded items among them (distinct positions: a gather, then a row sum).
    flat = sp["flat"]
    row, col = flat // n, flat % n
    r = jnp.minimum(row, c - 1)
    ex = s.reshape(-1)[jnp.minimum(flat, c * n - 1)]
    ex_before = (row < c) & ((ex > best[r]) | ((ex == best[r]) & (col < best_id[r])))
    count = counts[j] - jnp.zeros((c,), jnp.int32).at[row].add(ex_before.astype(jnp.int32),
                                                                mode="drop")
    per_split[j] = (held_items, valid, hs, 1 + count)
  lists = []
  for j, sp in enumerate(splits):
    if sp["share"] >= 0:
      lists.append(lists[sp["share"]])
      continue
    need = jnp.zeros((c,), bool)
    for jj, other in enumerate(splits):
      if jj == j or other["share"] == j:
        need = need | (per_split[jj][3] <= k)
    group = max(1, min(c, 32)) if jax.default_backend() == "cpu" else c
    top_ids, top_vals, list_special = _top_k_rows(s, sp["flat"], k, need, group)
    special = special | list_special
    lists.append((top_ids, top_vals))
  out = []
  for (held_items, valid, hs, best_rank), (top_ids, top_vals) in zip(per_split, lists):
    # Rank within the top-k list: 1 + the listed candidates ordered before the item.
    tv, ti = top_vals[:, None, :], top_ids[:, None, :]
    listed_before = (tv > -jnp.inf) & ((tv > hs[:, :, None]) | (
        (tv == hs[:, :, None]) & (ti < held_items[:, :, None])))
    rank = 1 + jnp.sum(listed_before, axis=-1, dtype=jnp.int32)
    listed = (best_rank <= k)[:, None] & (rank <= k)
    ranks = jnp.where(listed, rank, jnp.maximum(best_rank, k + 1)[:, None])
    out.append((jnp.where(valid, ranks, 0), valid))

  def slow(_):
    return [full_ranks(scores, users, sp["excluded"], sp["held"], max_k) for sp in splits]

  return jax.lax.cond(special, slow, lambda _: out, None)


def group_metrics(scores: jax.Array, users: jax.Array, excluded: sparse.DeviceCSR,
                  held: sparse.DeviceCSR, ranks: jax.Array, valid: jax.Array,
                  groups: jax.Array, num_groups: int, ks: Sequence[int]
                  ) -> dict[str, jax.Array]:
  """Per-user popularity-bias metrics of one chunk under the full protocol.

  For group g (items with groups[i] == g; -1 = no group) and cutoff K:
    Recall@K/g, NDCG@K/g: Recall@K and NDCG@K (module docstring) with the user's held-out items
      of group g as the relevant set; ranks are still among all the user's candidates (held-out
      items of other groups are ordinary candidates). NaN for users without held-out items in g.
    Share@K/g: the fraction of the user's top-min(K, #candidates) candidates that lie in g.
    UnKDRecall@K/g: UnKD's per-group recall (`utils.py::RecallAndPrecisionByGroup`): the
      user's held-out items of g ranked in the top K over its held-out items of g, and 0 (not
      NaN) for a user without held-out items in g, so its mean runs over all evaluated users
      (UnKD divides the sum by the number of test users, `Procedure.py::TestAll`).
    UnKDPrecision@K/g: UnKD's per-group precision: the user's held-out items of g in its top K,
      divided by K (not by the list length, nor by the items in g).

  Args:
    scores [C, N], users [C], excluded / held: as `full_ranks`; ranks, valid [C, H]: its output.
    groups: int32 [N] item groups; num_groups: G (static); ks: cutoffs (each <= max rank exact).

  Returns:
    {name: float32 [C]} keyed as `bias_metric_names(ks, num_groups)`.
  """
  num_items = scores.shape[-1]
  is_held = sparse.row_mask(held, users, num_items)
  candidate = ~sparse.row_mask(excluded, users, num_items) | is_held
  held_items, _ = sparse.padded_rows(held, users, pad=0)
  held_groups = groups[held_items]
  k_max = min(max(ks), num_items)
  top, top_valid = top_k_candidates(scores, candidate, k_max)
  top_groups = jnp.where(top_valid, groups[top], -1)
  out = {}
  for g in range(num_groups):
    in_g = valid & (held_groups == g)
    has = jnp.any(in_g, axis=-1)
    per = ranking_metrics_from_ranks(ranks, in_g, ks)
    for k in ks:
      kk = min(k, k_max)
      shown = jnp.sum(top_valid[:, :kk], axis=-1)
      hits = jnp.sum(top_groups[:, :kk] == g, axis=-1)
      out[f"Recall@{k}/g{g}"] = jnp.where(has, per[f"Recall@{k}"], jnp.nan)
      out[f"NDCG@{k}/g{g}"] = jnp.where(has, per[f"NDCG@{k}"], jnp.nan)
      out[f"Share@{k}/g{g}"] = hits / jnp.maximum(shown, 1).astype(jnp.float32)
      out[f"UnKDRecall@{k}/g{g}"] = per[f"Recall@{k}"]  # 0 without held-out items in g
      held_hits = jnp.sum(in_g & (ranks <= k), axis=-1).astype(jnp.float32)
      out[f"UnKDPrecision@{k}/g{g}"] = held_hits / jnp.float32(k)
  return out


def sample_negatives(key: jax.Array, users: jax.Array, seen: sparse.DeviceCSR,
                     num_negatives: int, num_items: int, max_tries: int = 32
                     ) -> tuple[jax.Array, jax.Array]:
  """Uniform negatives per user, with replacement, avoiding items in the user's `seen` row.

  Each slot is redrawn (rejection) up to `max_tries` times in total; slots still hitting a seen
  item are returned as invalid and dropped from the candidates. Draws depend only on (key, user),
  not on chunking. Returns (items int32 [C, N], valid bool [C, N]).
  """
  user_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, users)

  def draw(t):
    return jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, t), (num_negatives,),
                                                 0, num_items, jnp.int32))(user_keys)

  def is_seen(items):
    return sparse.contains(seen, users[:, None], items)

  def cond(state):
    t, _, bad = state
    return (t < max_tries) & jnp.any(bad)

  def body(state):
    t, items, bad = state
    items = jnp.where(bad, draw(t), items)
    return t + 1, items, is_seen(items)

  items = draw(0)
  _, items, bad = jax.lax.while_loop(cond, body, (jnp.int32(1), items, is_seen(items)))
  return items, ~bad


def sampled_ranks(scores: jax.Array, users: jax.Array, held: sparse.DeviceCSR,
                  negatives: jax.Array, negatives_valid: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Ranks of held-out items among held-out items plus the given negatives."""
  held_items, held_valid = sparse.padded_rows(held, users, pad=0)
  items = jnp.concatenate([held_items, negatives], axis=-1)
  valid = jnp.concatenate([held_valid, negatives_valid], axis=-1)
  relevant = jnp.concatenate([held_valid, jnp.zeros_like(negatives_valid)], axis=-1)
  keys = jnp.where(valid, order_key(jnp.take_along_axis(scores, items, axis=-1)),
                   jnp.int32(_EXCLUDED_KEY))
  return ranks_among_candidates(keys, items, relevant)


@functools.partial(jax.jit, static_argnames=("score_fn", "ks", "chunk_size", "protocol",
                                             "num_negatives", "max_tries", "num_groups",
                                             "shares"))
def _per_user_chunked(score_fn: ScoreFn, params: Any, users: jax.Array, splits: tuple,
                      tables: tuple, seen: sparse.DeviceCSR | None, key: jax.Array | None,
                      groups: jax.Array | None = None, *, ks: tuple[int, ...],
                      chunk_size: int, protocol: str, num_negatives: int, max_tries: int,
                      num_groups: int = 0, shares: tuple[int, ...] = (-1,)
                      ) -> tuple[dict[str, jax.Array], ...]:
  """Per-user metrics of every split in `splits` ({'excluded', 'held'} DeviceCSRs) for `users`
  (length a multiple of chunk_size), chunked with lax.map: each chunk is scored once. tables:
  per split its `ranking.chunk_positions` [num_chunks, E]; shares: per split the index of an earlier
  split with the same candidates, or -1. With `num_groups` > 0 (full protocol) also the
  per-group metrics of `groups` (int32 [N])."""

  def one_chunk(xs):
    chunk, flats = xs
    scores = score_fn(params, chunk)
    if protocol == "full":
      rs = fast_full_ranks(scores, chunk, [
          dict(flat=f, share=sh, **sp) for f, sh, sp in zip(flats, shares, splits)], max(ks))
    else:
      negs, negs_valid = sample_negatives(key, chunk, seen, num_negatives, scores.shape[-1],
                                          max_tries)
      rs = [sampled_ranks(scores, chunk, sp["held"], negs, negs_valid) for sp in splits]
    outs = []
    for (ranks, valid), sp in zip(rs, splits):
      out = ranking_metrics_from_ranks(ranks, valid, ks)
      if num_groups:
        out.update(group_metrics(scores, chunk, sp["excluded"], sp["held"], ranks, valid, groups,
                                 num_groups, ks))
      outs.append(out)
    return tuple(outs)

  out = jax.lax.map(one_chunk, (users.reshape(-1, chunk_size), tables))
  return tuple({name: v.reshape(-1) for name, v in o.items()} for o in out)


def _union_csr(num_users: int, num_items: int, *csrs: tuple[np.ndarray, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
  """Row-wise union of CSR matrices (sorted, unique items per row)."""
  codes = []
  for indptr, indices in csrs:
    users = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(indptr))
    codes.append(users * num_items + indices.astype(np.int64))
  codes = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
  counts = np.bincount(codes // num_items, minlength=num_users)
  indptr = np.zeros(num_users + 1, np.int64)
  np.cumsum(counts, out=indptr[1:])
  return indptr, (codes % num_items).astype(np.int32)


class Evaluator:
  """Device-side evaluation data for one (data, split, protocol), with a jitted chunked evaluation.

  Build once and call repeatedly: `Evaluator(data, 'test')(score_fn, params) -> {name: mean}`.
  `score_fn(params, users int32 [C]) -> float [C, num_items]` must be pure and jittable; it is a
  static argument of the jitted function, so pass the same function object each time (e.g. a
  module-level function, not a fresh lambda) to avoid recompiling.

  Popularity bias: given `item_groups` (int32 [num_items], e.g. `popularity_groups`; -1 = no
  group; full protocol only), a call with `bias=True` adds `bias_metric_names(ks, G)` (see
  `group_metrics`), G = item_groups.max() + 1. Their means: Recall@K/g and NDCG@K/g over the
  users with held-out items in g (NaN if there are none), Share@K/g, UnKDRecall@K/g and
  UnKDPrecision@K/g over the evaluated users (UnKD's "all test users"); `average` does not
  apply to them. `bias=False` (the default, e.g. per-epoch validation) runs
  exactly the program without them; each setting compiles once.
  """

  def __init__(self, data: Interactions, split: str = "test", ks: Sequence[int] = DEFAULT_KS,
               chunk_size: int = 1024, protocol: str = "full", num_negatives: int = 499,
               max_tries: int = 32, exclude_other: bool = True, average: str = "heldout",
               item_groups: np.ndarray | None = None):
    if split not in ("val", "test"):
      raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if protocol not in PROTOCOLS:
      raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
      raise ValueError(f"ks must be positive cutoffs, got {ks}")
    if average not in AVERAGES:
      raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if chunk_size < 1 or num_negatives < 1 or max_tries < 1:
      raise ValueError("chunk_size, num_negatives and max_tries must be >= 1")
    self.data, self.split, self.ks, self.protocol = data, split, ks, protocol
    self.num_negatives, self.max_tries = int(num_negatives), int(max_tries)
    self.names = metric_names(ks)
    other = "val" if split == "test" else "test"
    held_indptr, held_indices = data.split(split)
    self.users = np.flatnonzero(np.diff(held_indptr) > 0).astype(np.int32)
    n = len(self.users)
    self.chunk_size = max(1, min(int(chunk_size), n))
    pad = (-n) % self.chunk_size
    fill = self.users[-1] if n else 0
    self._padded_users = jnp.asarray(np.concatenate([self.users, np.full(pad, fill, np.int32)]))
    self._held = sparse.DeviceCSR.from_numpy(held_indptr, held_indices)
    u, i = data.num_users, data.num_items
    self.average = average
    excluded = [data.split("train")] + ([data.split(other)] if exclude_other else [])
    self._excluded_np = _union_csr(u, i, *excluded)
    self._held_np = (held_indptr, held_indices)
    self._excluded = sparse.DeviceCSR.from_numpy(*self._excluded_np)
    self._seen = (sparse.DeviceCSR.from_numpy(
        *_union_csr(u, i, data.split("train"), data.split("val"), data.split("test")))
                  if protocol == "sampled" else None)
    self.num_groups, self._groups, self.bias_names = 0, None, ()
    if item_groups is not None:
      item_groups = np.asarray(item_groups, np.int32)
      if protocol != "full":
        raise ValueError("popularity-bias metrics need protocol='full'")
      if item_groups.shape != (i,) or item_groups.min(initial=-1) < -1:
        raise ValueError(f"item_groups must be int [{i}] with values >= -1")
      self.num_groups = int(item_groups.max(initial=-1)) + 1
      self._groups = jnp.asarray(item_groups)
      self.bias_names = bias_metric_names(ks, self.num_groups)

  @property
  def num_users(self) -> int:
    """Number of evaluated users (those with a non-empty held-out set)."""
    return len(self.users)

  def _key(self, key: jax.Array | None) -> jax.Array | None:
    if self.protocol != "sampled":
      return None
    return jax.random.key(0) if key is None else key

  def per_user(self, score_fn: ScoreFn, params: Any, key: jax.Array | None = None,
               bias: bool = False) -> dict[str, np.ndarray]:
    """{name: float32 [num_users]}, rows aligned with `self.users` (increasing user id).

    `key` seeds the sampled protocol (default `jax.random.key(0)`); ignored for 'full'. With
    `bias` (and item groups) also the per-group metrics, NaN for a user without held-out items
    in the group (Recall, NDCG).
    """
    return joint_evaluator((self,)).per_user(score_fn, params, key, bias)[self.split]

  def means(self, per_user: Mapping[str, np.ndarray]) -> dict[str, float]:
    """{name: mean} of `per_user` (as returned by `per_user`), as `__call__` averages them."""
    n = self.data.num_users if self.average == "all" else self.num_users
    out = {}
    for name, v in per_user.items():
      if name in self.bias_names:
        ok = ~np.isnan(v)
        out[name] = float(np.sum(v[ok], dtype=np.float64) / ok.sum()) if ok.any() else float("nan")
      else:
        out[name] = float(np.sum(v, dtype=np.float64) / n) if len(v) else float("nan")
    return out

  def __call__(self, score_fn: ScoreFn, params: Any, key: jax.Array | None = None,
               bias: bool = False) -> dict[str, float]:
    """{name: mean over evaluated users}; NaN if no user has held-out items. With
    average='all' the mean is over all users, those without held-out items counting 0.
    `bias`: also the per-group metrics (class docstring), averaged over the users they are
    defined for."""
    return self.means(self.per_user(score_fn, params, key, bias))

  def negatives(self, key: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The sampled protocol's negatives for `self.users`: (items int32 [U, N], valid bool [U, N])."""
    if self.protocol != "sampled":
      raise ValueError("negatives exist only for protocol='sampled'")
    items, valid = jax.jit(sample_negatives, static_argnums=(3, 4, 5))(
        self._key(key), jnp.asarray(self.users), self._seen, self.num_negatives,
        self.data.num_items, self.max_tries)
    return np.asarray(items), np.asarray(valid)


# Rows per chunk on CPU: a chunk's scores then stay in the CPU's caches across its passes
# (counts, the top-k of the rows that need it); `chunk_size` stays an upper bound.
FAST_CHUNK = 256


class JointEvaluator:
  """Several `Evaluator`s of the same data and settings (e.g. 'val' and 'test') in one pass:
  each chunk of users is scored once and every split's metrics are computed from those scores.
  Results are identical to each evaluator's own: `per_user(...)[split]` equals
  `evaluators[split].per_user(...)` and `__call__` its means. Build with `joint_evaluator`
  (cached per tuple of evaluators).
  """

  def __init__(self, evaluators: Sequence[Evaluator]):
    first = evaluators[0]
    settings = lambda e: (e.data, e.ks, e.protocol, e.num_negatives, e.max_tries, e.num_groups)
    if any(settings(e) != settings(first) for e in evaluators):
      raise ValueError("joint evaluation needs the same data, ks, protocol and item groups")
    self.evaluators = tuple(evaluators)
    self.splits = tuple(e.split for e in evaluators)
    if len(set(self.splits)) != len(self.splits):
      raise ValueError(f"splits must differ, got {self.splits}")
    self.users = np.unique(np.concatenate([e.users for e in evaluators])).astype(np.int32)
    n = len(self.users)
    chunk = min(e.chunk_size for e in evaluators)
    if jax.default_backend() == "cpu":
      chunk = min(chunk, FAST_CHUNK)
    chunk = max(1, min(chunk, n))
    if first.protocol == "full":
      chunk = max(1, min(chunk, (2**31 - 1) // first.data.num_items))
    self.chunk_size = chunk
    pad = (-n) % chunk
    fill = self.users[-1] if n else 0
    padded = np.concatenate([self.users, np.full(pad, fill, np.int32)])
    self._padded_users = jnp.asarray(padded)
    self._rows = [np.searchsorted(self.users, e.users) for e in evaluators]
    tables, shares = [], []
    for e in evaluators:
      if e.protocol == "full":
        t = ranking.chunk_positions(padded, chunk, e.data.num_items, e._excluded_np,
                                        e._held_np)
      else:
        t = np.zeros((len(padded) // chunk, 1), np.int32)
      same = [j for j, u in enumerate(tables) if u.shape == t.shape and np.array_equal(u, t)]
      shares.append(same[0] if same else -1)
      tables.append(t)
    self._tables = tuple(jnp.asarray(t) for t in tables)
    self._shares = tuple(shares)
    self._splits = tuple({"excluded": e._excluded, "held": e._held} for e in evaluators)

  def per_user(self, score_fn: ScoreFn, params: Any, key: jax.Array | None = None,
               bias: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{split: {name: float32 [num_users of that split]}}, as `Evaluator.per_user`."""
    first = self.evaluators[0]
    groups = first.num_groups if bias else 0
    names = first.names + (first.bias_names if groups else ())
    if not len(self.users):
      return {e.split: {name: np.zeros(0, np.float32) for name in names}
              for e in self.evaluators}
    out = _per_user_chunked(score_fn, params, self._padded_users, self._splits, self._tables,
                            first._seen, first._key(key), first._groups if groups else None,
                            ks=first.ks, chunk_size=self.chunk_size, protocol=first.protocol,
                            num_negatives=first.num_negatives, max_tries=first.max_tries,
                            num_groups=groups, shares=self._shares)
    return {e.split: {name: np.asarray(o[name])[rows] for name in names}
            for e, o, rows in zip(self.evaluators, out, self._rows)}

  def __call__(self, score_fn: ScoreFn, params: Any, key: jax.Array | None = None,
               bias: bool = False) -> dict[str, dict[str, float]]:
    """{split: {name: mean}}, each as that split's `Evaluator.__call__`."""
    per_user = self.per_user(score_fn, params, key, bias)
    return {e.split: e.means(per_user[e.split]) for e in self.evaluators}


@functools.lru_cache(maxsize=16)
def joint_evaluator(evaluators: tuple[Evaluator, ...]) -> JointEvaluator:
  """The (cached) `JointEvaluator` of `evaluators`."""
  return JointEvaluator(evaluators)


def evaluate_splits(evaluators: Mapping[str, Evaluator], score_fn: ScoreFn, params: Any,
                    key: jax.Array | None = None, bias: bool = False
                    ) -> dict[str, dict[str, float]]:
  """{split: metrics} for `evaluators` ({split: Evaluator}) from one pass over the users (see
  `JointEvaluator`); identical to calling each evaluator."""
  joint = joint_evaluator(tuple(evaluators.values()))
  return joint(score_fn, params, key, bias)


@functools.lru_cache(maxsize=8)
def _cached_evaluator(data: Interactions, split: str, ks: tuple[int, ...], chunk_size: int,
                      protocol: str, num_negatives: int) -> Evaluator:
  return Evaluator(data, split, ks, chunk_size, protocol, num_negatives)


def evaluate(score_fn: ScoreFn, params: Any, data: Interactions, split: str = "test",
             ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024, protocol: str = "full",
             num_negatives: int = 499, key: jax.Array | None = None, per_user: bool = False
             ) -> Mapping[str, float] | Mapping[str, np.ndarray]:
  """Means of `metric_names(ks)` over users with held-out items (per-user arrays if `per_user`).

  Convenience wrapper over a cached `Evaluator` (keyed by the `data` object and the settings).
  """
  evaluator = _cached_evaluator(data, split, tuple(ks), int(chunk_size), protocol,
                                int(num_negatives))
  if per_user:
    return evaluator.per_user(score_fn, params, key)
  return evaluator(score_fn, params, key)
