"""Ranks, top-k and sampling primitives shared by methods and evaluation.

Conventions: rank 1 is the best (highest score); ties are broken by item id, lower id first,
exactly as a stable argsort of -score. Excluded items get rank 0.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


# Order keys: int32 with the same order as float32 scores (NaN lowest, -0.0 == +0.0); excluded
# slots get the minimum, below every score.
EXCLUDED_KEY = np.iinfo(np.int32).min
_NEG_INF_KEY = -2139095041  # order key of -inf (bits 0xFF800000 with the low 31 bits flipped)
_NAN_KEY = _NEG_INF_KEY - 1  # NaN ranks below -inf but above excluded slots


def order_key(scores: jax.Array) -> jax.Array:
  """int32 keys ordered like float32 `scores` (NaN lowest, -0.0 == +0.0); all > EXCLUDED_KEY."""
  s = scores.astype(jnp.float32)
  s = jnp.where(s == 0, jnp.zeros_like(s), s)
  bits = jax.lax.bitcast_convert_type(s, jnp.int32)
  key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
  return jnp.where(jnp.isnan(s), jnp.int32(_NAN_KEY), key)


def _descending_order_of_keys(key: jax.Array) -> jax.Array:
  n = key.shape[-1]
  key = ~key  # ascending order of ~key = descending order of key
  if jax.config.jax_enable_x64:
    ids = jnp.arange(n, dtype=jnp.int64)
    packed = (key.astype(jnp.int64) << 32) | ids
    return (jnp.sort(packed, axis=-1) & 0xFFFFFFFF).astype(jnp.int32)
  ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), key.shape)
  _, order = jax.lax.sort((key, ids), dimension=key.ndim - 1, num_keys=1, is_stable=True)
  return order


def descending_order(scores: jax.Array) -> jax.Array:
  """Item ids of each row ordered best first, ties by lower id: int32 [..., N].

  With 64-bit types enabled (see `x64`), this sorts one packed int64 key (score key in the high
  word, item id in the low word), which XLA's CPU sort runs about 5x faster than a two-operand
  stable sort; otherwise it falls back to that stable sort. Both give identical results.
  """
  return _descending_order_of_keys(order_key(scores))


def ranks(scores: jax.Array, exclude: jax.Array | None = None) -> jax.Array:
  """Rank (1 = best) of every item in each row of `scores` [C, N]; int32, 0 where `exclude`.

  Excluded items are ranked after all others, so the remaining items get ranks 1..N-|excluded|.
  """
  key = order_key(scores)
  if exclude is not None:
    key = jnp.where(exclude, jnp.int32(EXCLUDED_KEY), key)
  order = _descending_order_of_keys(key)
  c, n = scores.shape
  rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[:, None], (c, n))
  positions = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (c, n))
  out = jnp.zeros((c, n), jnp.int32).at[rows, order].set(positions)
  if exclude is not None:
    out = jnp.where(exclude, 0, out)
  return out


def histogram_ranks(scores: jax.Array, exclude: jax.Array | None = None, buckets: int = 8192
                    ) -> tuple[jax.Array, jax.Array]:
  """Approximate `ranks` in O(N) per row, without sorting: (ranks int32 [C, N], error bound int32
  [C, N]).

  Each row's finite scores are cut into `buckets` equal-width bins between the row's lowest and
  highest score (+inf in the top bin; -inf and NaN in the bottom one). An item in a bin holding
  c items with a items in the bins above it has exact rank in [a + 1, a + c] (every item above
  its bin outranks it, every item below is outranked); it gets the middle, a + (c + 1) // 2, so
  |rank - exact rank| <= c // 2, the returned bound (0 for an item alone in its bin). Excluded
  items get rank 0 and bound 0 and are in no bin. On the 2-core CPU this is ~3x cheaper than the
  exact sort at 25k items (benchmarks/REPORT.md).
  """
  s = scores.astype(jnp.float32)
  c = s.shape[0]
  keep = jnp.ones(s.shape, bool) if exclude is None else ~exclude
  finite = keep & jnp.isfinite(s)
  lo = jnp.min(jnp.where(finite, s, jnp.inf), axis=-1, keepdims=True)
  hi = jnp.max(jnp.where(finite, s, -jnp.inf), axis=-1, keepdims=True)
  scale = jnp.where(hi > lo, (buckets - 1) / (hi - lo), 0.0)
  x = jnp.where(finite, (s - jnp.where(finite, lo, 0.0)) * scale, 0.0)
  b = jnp.clip(x.astype(jnp.int32), 0, buckets - 1)
  b = jnp.where(s == jnp.inf, buckets - 1, jnp.where(finite, b, 0))
  flat = b + (jnp.arange(c, dtype=jnp.int32) * buckets)[:, None]
  flat = jnp.where(keep, flat, c * buckets)  # excluded: out of range, dropped
  counts = jnp.zeros((c * buckets,), jnp.int32).at[flat.ravel()].add(1, mode="drop")
  counts = counts.reshape(c, buckets)
  above = jnp.cumsum(counts[:, ::-1], axis=-1)[:, ::-1] - counts
  mid = (above + (counts + 1) // 2).ravel()
  flat = jnp.minimum(flat, c * buckets - 1)
  rank = jnp.where(keep, mid[flat], 0)
  bound = jnp.where(keep, counts.ravel()[flat] // 2, 0)
  return rank, bound


@contextlib.contextmanager
def x64():
  """Traces inside with 64-bit types on (for the packed-key sort); a no-op if unsupported."""
  enable = getattr(jax, "enable_x64", None)
  if enable is None:
    yield
  else:
    with enable(True):
      yield


def searchsorted_rows(cdf: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
  """For each query, the smallest column j with cdf[row, j] > value (binary search).

  cdf [R, N] non-decreasing along rows; rows and values have the same shape; returns int32 in
  [0, N-1] (N-1 when value >= the row total, which callers avoid). Branchless: one position is
  carried through power-of-two steps, so the unrolled chain fuses into one kernel.
  """
  n = cdf.shape[-1]
  pos = jnp.full_like(values, -1, dtype=jnp.int32)  # last column with cdf <= value
  step = 1 << max(int(n).bit_length() - 1, 0)
  while step:
    cand = pos + step
    ok = (cand < n) & (cdf[rows, jnp.minimum(cand, n - 1)] <= values)
    pos = jnp.where(ok, cand, pos)
    step >>= 1
  return jnp.minimum(pos + 1, n - 1)


def weights_cdf(weights: jax.Array) -> jax.Array:
  """Cumulative sums of non-negative `weights` [..., N] along the last axis, built so that a
  zero-weight item can never be drawn by `sample_from_cdf`.

  XLA's float32 `cumsum` is a parallel prefix sum that is not monotone (at 17k items, tens of
  decreases per row), so a zero-weight item can get a sliver of probability. Here zero-weight
  entries are set to 0 and a running maximum restores order: then cdf[j] == cdf[j-1] exactly for
  every zero-weight j (an empty interval) and the table is non-decreasing.
  """
  c = jnp.cumsum(weights, axis=-1)
  return jax.lax.cummax(jnp.where(weights > 0, c, 0.0), axis=weights.ndim - 1)


def sample_from_cdf(keys: jax.Array, cdf: jax.Array, rows: jax.Array, n: int = 1) -> tuple:
  """Draws n items per query with replacement, item j with probability ∝ cdf[r,j] - cdf[r,j-1].

  keys: one PRNG key per query [B]; rows [B] index `cdf` [R, N]. Returns (items int32 [B, n],
  valid bool [B]); valid is False for rows whose weights are all zero (nothing to sample), and
  their items are 0.
  """
  total = cdf[rows, -1]
  u = jax.vmap(lambda k: jax.random.uniform(k, (n,), cdf.dtype))(keys)
  rows_b = jnp.broadcast_to(rows[:, None], u.shape)
  # value < total strictly (u * total can round up to it), so the first column whose cdf exceeds
  # the value exists and has positive weight: never a trailing or interior zero-weight item.
  value = jnp.minimum(u * total[:, None], jnp.nextafter(total, 0)[:, None])
  items = searchsorted_rows(cdf, rows_b, value)
  valid = total > 0
  return jnp.where(valid[:, None], items, 0), valid


def sample_from_weights(keys: jax.Array, weights: jax.Array, n: int = 1) -> tuple:
  """n categorical draws with replacement per row of unnormalised non-negative `weights` [B, N].

  keys: one PRNG key per row. Returns (items int32 [B, n], valid bool [B]) as `sample_from_cdf`.
  """
  positive = weights > 0
  logits = jnp.where(positive, jnp.log(jnp.where(positive, weights, 1.0)), -jnp.inf)
  valid = jnp.any(positive, axis=-1)
  safe = jnp.where(valid[:, None], logits, 0.0)
  items = jax.vmap(lambda k, l: jax.random.categorical(k, l, shape=(n,)))(keys, safe)
  return jnp.where(valid[:, None], items, 0).astype(jnp.int32), valid


def uniform_negatives(keys: jax.Array, users: jax.Array, positives, num_items: int
                      ) -> jax.Array:
  """One item per user drawn uniformly from the items not in its row of `positives` (DeviceCSR).

  Exact for every user (no rejection, so never a positive however many items the user has; see
  `uniform_unobserved`). A user with every item positive gets item N - 1.
  """
  return uniform_unobserved(keys, users, positives, num_items, 1)[:, 0]


def gumbel_top_k(key: jax.Array, log_weights: jax.Array, k: int) -> jax.Array:
  """k items per row without replacement, with probability of successive draws ∝ exp(log_w)."""
  g = jax.random.gumbel(key, log_weights.shape, log_weights.dtype)
  return jax.lax.top_k(log_weights + g, k)[1]


def draws_mask(keys: jax.Array, weights: jax.Array, draws: jax.Array) -> tuple:
  """The set of items hit by `draws[b]` categorical draws with replacement from row b of the
  unnormalised non-negative `weights` [B, N], as a float32 0/1 mask [B, N].

  Each item is included independently with its exact marginal probability under the draws,
  1 - (1 - p_i)^k; so per-item frequencies (and the expected set size) equal those of drawing
  and collapsing duplicates, at O(N) per row with no searches. keys: one PRNG key per row.
  Returns (mask, valid bool [B]); valid is False for rows whose weights are all zero.
  """
  total = jnp.sum(weights, axis=-1, keepdims=True)
  valid = total[:, 0] > 0
  p = jnp.minimum(weights / jnp.where(total > 0, total, 1.0), 1.0)
  k = draws.astype(weights.dtype)[:, None]
  log_miss = jnp.where(p < 1, jnp.log1p(-jnp.where(p < 1, p, 0.0)), -jnp.inf)
  q = jnp.where(k > 0, -jnp.expm1(k * log_miss), 0.0)  # P(item drawn at least once)
  return (uniform_rows(keys, weights.shape[-1]) < q).astype(jnp.float32), valid


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit avalanche hash (xorshift-multiply, 'lowbias32' constants)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def uniform_rows(keys: jax.Array, n: int) -> jax.Array:
  """float32 [B, n] uniforms in [0, 1), row b determined by keys[b] (one PRNG key per row).

  For dense per-item masks (dropout, negative and BD item sets) over all items: the key's 64
  bits seed a counter-based hash of the column index, two rounds, 24-bit output. On the 2-core
  CPU this is ~37x cheaper than `jax.random.uniform` per row (1.0 vs 38 ms for 128 x 25,181;
  benchmarks/bench_uniform_rows.py),
  which would otherwise dominate a user-batched step (B x I draws several times per step).
  Statistically tested in tests/ranking_test.py.
  """
  data = jax.random.key_data(keys).reshape(keys.shape[0], -1).astype(jnp.uint32)
  col = jnp.arange(n, dtype=jnp.uint32)[None, :]
  x = _mix32(col ^ data[:, :1])
  if data.shape[1] > 1:
    x = _mix32(x ^ data[:, 1:2])
  return (x >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def top_unobserved(scores: jax.Array, exclude: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """Each row's `m` best items that are not excluded, best first (ties: lower id first).

  scores [C, N] float, exclude bool [C, N]. Returns (items int32 [C, m], valid bool [C, m]);
  valid is False in the slots beyond a row's number of non-excluded items.
  """
  masked = jnp.where(exclude, -jnp.inf, scores.astype(jnp.float32))
  _, items = jax.lax.top_k(masked, m)
  return items.astype(jnp.int32), ~jnp.take_along_axis(exclude, items, axis=-1)


class TopLists:
  """Per-user lists of a model's top-`m` unobserved items (teacher top-M), under a memory budget.

  `build(params)` computes the [U, m] table on device in user chunks when it fits in
  `budget_mb` (else returns an empty dict and stores nothing); `rows(table, params, users)`
  reads a batch's rows from the table, or computes them from `params` when there is none.
  Both give identical rows.
  """

  def __init__(self, score_all, train, num_users: int, num_items: int, m: int,
               budget_mb: float = 2048, chunk: int = 256):
    from kdrec_jax import sparse  # local import: sparse imports nothing from here
    if not 1 <= m <= num_items:
      raise ValueError(f"top-M list size must be in [1, {num_items}], got {m}")
    self.score_all, self.train, self._sparse = score_all, train, sparse
    self.num_users, self.num_items, self.m = num_users, num_items, int(m)
    self.chunk = max(1, min(int(chunk), num_users))
    self.stored = 5 * num_users * self.m <= budget_mb * 2**20  # int32 ids + bool validity

  def compute(self, params, users: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(items [B, m], valid [B, m]) for `users`, from `params`."""
    exclude = self._sparse.row_mask(self.train, users, self.num_items)
    return top_unobserved(self.score_all(params, users), exclude, self.m)

  def build(self, params) -> dict:
    """{'items' [U, m], 'valid' [U, m]} if stored, else {}."""
    if not self.stored:
      return {}
    n_chunks = -(-self.num_users // self.chunk)
    users = jnp.arange(n_chunks * self.chunk, dtype=jnp.int32) % self.num_users
    items, valid = jax.lax.map(lambda u: self.compute(params, u),
                               users.reshape(n_chunks, self.chunk))
    return {"items": items.reshape(-1, self.m)[:self.num_users],
            "valid": valid.reshape(-1, self.m)[:self.num_users]}

  def rows(self, table: dict, params, users: jax.Array) -> tuple[jax.Array, jax.Array]:
    if table:
      return table["items"][users], table["valid"][users]
    return self.compute(params, users)

  def all_rows(self, table: dict, params, fn):
    """`fn(users [chunk], items, valid)` over all users in chunks (lax.map); outputs [U, ...]."""
    n_chunks = -(-self.num_users // self.chunk)
    users = jnp.arange(n_chunks * self.chunk, dtype=jnp.int32) % self.num_users

    def one(u):
      return fn(u, *self.rows(table, params, u))

    out = jax.lax.map(one, users.reshape(n_chunks, self.chunk))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:self.num_users], out)


def per_user_keys(key: jax.Array, users: jax.Array) -> jax.Array:
  """One PRNG key per user id, `fold_in(key, user)`: draws that do not depend on chunking."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, users)


def gumbel_top_k_rows(keys: jax.Array, log_weights: jax.Array, k: int) -> jax.Array:
  """k positions per row without replacement, drawn successively with probability ∝
  exp(log_weights) among those left, in draw order: int32 [B, k].

  keys: one PRNG key per row; log_weights [B, N] or [N] (shared by all rows), -inf = never.
  """
  shape = (keys.shape[0], log_weights.shape[-1])
  g = jax.vmap(lambda kk: jax.random.gumbel(kk, shape[1:], jnp.float32))(keys)
  return jax.lax.top_k(jnp.broadcast_to(log_weights, shape) + g, k)[1].astype(jnp.int32)


def uniform_distinct(keys: jax.Array, n: int, num_items: int, excluded, draws: int = 0
                     ) -> tuple[jax.Array, jax.Array]:
  """n distinct items per row, uniformly without replacement from the items not `excluded`.

  keys: one PRNG key per row [B]; excluded(candidates [B, D]) -> bool [B, D]. Draws D = `draws`
  (default 2 n + 64) candidates with replacement per row and keeps, in draw order, the first n
  distinct ones that are not excluded: by symmetry an exact uniform sample without replacement.
  Returns (items int32 [B, n], valid bool [B, n]); valid is False in slots the D draws could not
  fill (only when few items are allowed).
  """
  d = draws or 2 * n + 64
  cand = jax.vmap(lambda k: jax.random.randint(k, (d,), 0, num_items, jnp.int32))(keys)
  order = jnp.argsort(cand, axis=-1, stable=True)
  srt = jnp.take_along_axis(cand, order, axis=-1)
  first_sorted = jnp.concatenate([jnp.ones_like(srt[:, :1], bool), srt[:, 1:] != srt[:, :-1]],
                                 axis=-1)
  rows = jnp.arange(cand.shape[0])[:, None]
  first = jnp.zeros(cand.shape, bool).at[rows, order].set(first_sorted)
  keep = first & ~excluded(cand)
  pick = jnp.argsort(~keep, axis=-1, stable=True)[:, :n]  # kept slots first, in draw order
  return (jnp.take_along_axis(cand, pick, axis=-1),
          jnp.take_along_axis(keep, pick, axis=-1))


def uniform_unobserved(keys: jax.Array, users: jax.Array, observed, num_items: int, n: int
                       ) -> jax.Array:
  """int32 [B, n]: n items per user drawn uniformly with replacement from the items not in its
  row of `observed` (a sparse.DeviceCSR, rows sorted). keys: one PRNG key per user [B].

  Exact, without rejection: a draw r ~ U{0, ..., N - n_u - 1} maps to the r-th unobserved item,
  r + #{j : p_j - j <= r} for the row's sorted items p_0 < p_1 < ... (p_j - j, the number of
  unobserved items below p_j, is non-decreasing), counted by one branchless binary search. A
  user with every item observed gets item N - 1 (callers give such rows weight 0).
  """
  start = observed.indptr[users][:, None]
  length = observed.row_lengths[users][:, None]
  free = jnp.maximum(num_items - length[:, 0], 1)
  r = jax.vmap(lambda k, m: jax.random.randint(k, (n,), 0, m, jnp.int32))(keys, free)
  last = observed.indices.shape[0] - 1
  pos = jnp.full(r.shape, -1, jnp.int32)  # the last j with p_j - j <= r (-1: none)
  step = 1 << max(int(observed.max_len).bit_length() - 1, 0)
  while step:  # unrolled at trace time: log2(max row length) steps
    cand = pos + step
    p = observed.indices[jnp.clip(start + cand, 0, last)]
    pos = jnp.where((cand < length) & (p - cand <= r), cand, pos)
    step >>= 1
  return jnp.minimum(r + pos + 1, num_items - 1)
