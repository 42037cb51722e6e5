"""Ranks, top-k and sampling primitives shared by methods and evaluation.

Conventions: rank 1 is the best (highest score); ties are broken by item id, lower id first,
exactly as a stable argsort of -score. Excluded items get rank 0.
"""
from __future__ import annotations

import contextlib
import functools

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


def key_floats(key: jax.Array) -> jax.Array:
  """float32 values whose `lax.top_k` order is the order of the int32 `key`s (ties: lower index).

  XLA's `TopK` compares float32 by their bits as sign-magnitude integers (a total order: -0.0
  below +0.0, positive NaNs above +inf, negative NaNs below -inf). This is the inverse of that
  map, so every int32 key, `EXCLUDED_KEY` and NaN keys included, becomes a float32 bit pattern
  that `lax.top_k` places exactly where the key belongs. CPU only: other backends' top-k
  kernels may compare the values as floats (`top_k_keys` uses the int32 keys there).
  """
  bits = jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _halves(fn, *arrays):
  """`fn(*arrays)` row-wise, on CPU as two independent halves so that XLA's runtime can run the
  two (single-threaded) sorts on two cores at once."""
  rows = arrays[0].shape[0]
  if not _on_cpu() or rows < 16:
    return fn(*arrays)
  h = rows // 2
  top = fn(*(a[:h] for a in arrays))
  bottom = fn(*(a[h:] for a in arrays))
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), top, bottom)


def _top_k_lax(key: jax.Array, k: int) -> jax.Array:
  if _on_cpu():
    return jax.lax.top_k(key_floats(key), k)[1].astype(jnp.int32)
  return jax.lax.top_k(key, k)[1].astype(jnp.int32)


def _sort_desc_ids(keys: jax.Array, ids: jax.Array) -> jax.Array:
  """`ids` [C, M] reordered by descending `keys` (int32), ties by lower id (ids distinct)."""
  def one(kk, ii):
    if jax.config.jax_enable_x64:
      packed = ((~kk).astype(jnp.int64) << 32) | ii.astype(jnp.int64)
      return (jnp.sort(packed, axis=-1) & 0xFFFFFFFF).astype(jnp.int32)
    return jax.lax.sort((~kk, ii), dimension=kk.ndim - 1, num_keys=2)[1]
  return _halves(one, keys, ids)


def _prefix_sums(x: jax.Array, block: int = 64) -> jax.Array:
  """Inclusive cumulative sums along the last axis of small non-negative integers (float32,
  exact below 2**24), as two triangular matmuls: XLA's CPU `cumsum` is a reduce-window that
  costs ~30x more at these sizes."""
  *lead, n = x.shape
  nb = -(-n // block)
  xb = jnp.pad(x, [(0, 0)] * len(lead) + [(0, nb * block - n)]).reshape(*lead, nb, block)
  hi = jax.lax.Precision.HIGHEST  # integers: no reduced-precision passes on accelerators
  inner = jnp.matmul(xb, jnp.triu(jnp.ones((block, block), jnp.float32)), precision=hi)
  before = jnp.matmul(inner[..., -1], jnp.triu(jnp.ones((nb, nb), jnp.float32), 1),
                      precision=hi)
  return (inner + before[..., None]).reshape(*lead, nb * block)[..., :n]


def compact_rows(mask: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
  """The column ids of each row's True entries, increasing, in `cap` slots: (ids int32 [C, cap]
  with N in unused slots, count int32 [C]); entries beyond `cap` are dropped.

  Sort- and scan-free (both are slow on XLA's CPU): the row is packed into 32-bit words, a word
  per output slot is found from the words' popcount prefix sums (one scatter-add of a marker per
  word, then prefix sums over the slots), and the slot's bit by a 5-step popcount search.
  """
  c, n = mask.shape
  nw = -(-n // 32)
  # bit (j mod 32) of word j // 32, summed by a strided reduce-window: XLA's CPU runs it ~6x
  # faster than a reduction over a reshaped [C, nw, 32] (a loop fusion)
  bits = mask.astype(jnp.uint32) << (jnp.arange(n, dtype=jnp.uint32) & 31)
  word = jax.lax.reduce_window(bits, jnp.uint32(0), jax.lax.add, (1, 32), (1, 32),
                               ((0, 0), (0, nw * 32 - n)))
  pop = jax.lax.population_count(word).astype(jnp.float32)
  start = _prefix_sums(pop) - pop  # first slot of each word
  count = (start[:, -1] + pop[:, -1]).astype(jnp.int32)
  # marks[j] = number of words starting at slot j; the slot's word is (sum of marks <= j) - 1.
  rows = jnp.arange(c, dtype=jnp.int32)[:, None]
  at = jnp.where(start < cap, rows * cap + start.astype(jnp.int32), c * cap)
  marks = jnp.zeros((c * cap,), jnp.float32).at[at.reshape(-1)].add(1.0, mode="drop")
  w = _prefix_sums(marks.reshape(c, cap)).astype(jnp.int32) - 1
  flat = rows * nw + jnp.clip(w, 0, nw - 1)
  r = jnp.arange(cap, dtype=jnp.int32)[None, :] - start.reshape(-1)[flat].astype(jnp.int32)
  wj = word.reshape(-1)[flat]
  pos = jnp.zeros((c, cap), jnp.int32)
  for width in (16, 8, 4, 2, 1):
    low = jax.lax.population_count(
        (wj >> pos.astype(jnp.uint32)) & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
    take = r >= low
    r = jnp.where(take, r - low, r)
    pos = jnp.where(take, pos + width, pos)
  slot = jnp.arange(cap, dtype=jnp.int32)[None, :]
  return jnp.where(slot < count[:, None], w * 32 + pos, n), count


def _row_sample(key: jax.Array, pieces: int, width: int) -> tuple[jax.Array, jax.Array]:
  """The threshold searches' start: (sample int32 [C, m], step float32 [C]). The sample is
  `pieces` contiguous runs of `width` columns spread over each row (strided samples are slow;
  the whole row when it is short); the step, an eighth of the spread of its finite scores (1/8
  when there is none), is how far a search moves while one side of its target is unknown."""
  n = key.shape[-1]
  if pieces * width * 2 <= n:
    sample = jnp.concatenate([key[:, (i * n) // pieces:(i * n) // pieces + width]
                              for i in range(pieces)], axis=-1)
  else:
    sample = key
  values = key_floats(sample)  # the scores (NaN patterns for NaN and excluded keys)
  fin = jnp.isfinite(values)
  spread = (jnp.max(jnp.where(fin, values, -jnp.inf), axis=-1)
            - jnp.min(jnp.where(fin, values, jnp.inf), axis=-1))
  f32 = jnp.float32
  return sample, jnp.where(jnp.isfinite(spread) & (spread > 0), spread, f32(1)) / f32(8)


def _threshold_keys(key: jax.Array, k: int, cap: int, max_iter: int, pieces: int = 8,
                    width: int = 64) -> tuple[jax.Array, jax.Array]:
  """Per row a threshold key t with k <= #{key >= t} <= cap, and whether one was found.

  The search runs on the scores (`key_floats`), the counts on the int32 keys (one pass each;
  converting inside the passes is several times slower on XLA's CPU). The first guess is an
  order statistic of a sample (`pieces` contiguous runs of `width` columns spread over the row;
  strided samples are slow), sorted: its j-th best score stands for about (j + 1) n / m items,
  and the guess aims at the middle of [k, cap]; the second moves along the sample's ranks by
  the first count's miss. Then secant steps through the last two exact counts, aimed 3/4
  across the window (so that the steps cross it rather than creep towards it), and once exact
  counts bracket it, regula falsi inside the bracket whenever a secant step leaves it, and
  every third step. Only exact counts decide. Rows that need more than `max_iter` steps (e.g. more
  than cap - k ties at the k-th value, or fewer than k finite values) are not `done`.
  """
  f32 = jnp.float32
  n = key.shape[-1]
  sample, step0 = _row_sample(key, pieces, width)
  m = sample.shape[-1]
  target = k + (cap - k) // 2
  scale = n / m
  guess = min(m - 1, max(0, round(target / scale) - 1))
  # The sample's scores, best first (a sort of a few hundred int32 keys per row: cheap).
  top = key_floats(jnp.sort(sample, axis=-1)[:, ::-1])
  target = f32(target)

  def count(t):
    return jnp.sum(jnp.where(key >= order_key(t)[:, None], f32(1), f32(0)), axis=-1)

  def done_of(cnt):
    return (cnt >= k) & (cnt <= cap)

  def cond(state):
    i, _, cnt, *_ = state
    return (i < max_iter) & ~jnp.all(done_of(cnt))

  def body(state):
    i, t, cnt, t_prev, c_prev, lo, c_lo, hi, c_hi = state
    done = done_of(cnt)
    many, few = ~done & (cnt > cap), ~done & (cnt < k)
    # The bracket of exact counts: lo the highest t with too many, hi the lowest with too few
    # (NaN while unknown).
    new_lo = many & ~(t <= lo)
    lo, c_lo = jnp.where(new_lo, t, lo), jnp.where(new_lo, cnt, c_lo)
    new_hi = few & ~(t >= hi)
    hi, c_hi = jnp.where(new_hi, t, hi), jnp.where(new_hi, cnt, c_hi)
    # Along the sample's ranks by the miss (first step), or a secant step.
    r = guess + jnp.round((target - cnt) / f32(scale)).astype(jnp.int32)
    t_sample = jnp.take_along_axis(top, jnp.clip(r, 0, m - 1)[:, None], axis=-1)[:, 0]
    t_sample = jnp.where((r >= 0) & (r < m), t_sample, f32(jnp.nan))
    # Before the window is bracketed, aim past its middle (3/4 across), so that a concave or
    # convex count curve does not leave the steps creeping towards it from one side.
    aim = jnp.where(cnt > cap, f32(k + (cap - k) // 4), f32(cap - (cap - k) // 4))
    step = (aim - cnt) * (t - t_prev) / (cnt - c_prev)  # NaN or inf when flat
    t_secant = t + step
    t_new = jnp.where(i == 0, t_sample, t_secant)
    # Keep it on the right side of what is known; regula falsi inside a full bracket.
    bracketed = ~jnp.isnan(lo) & ~jnp.isnan(hi)
    ok = jnp.isfinite(t_new) & ~(t_new <= lo) & ~(t_new >= hi)
    frac = jnp.clip((c_lo - target) / jnp.maximum(c_lo - c_hi, f32(1)), f32(0.05), f32(0.95))
    t_falsi = lo + (hi - lo) * jnp.where(i % 3 == 2, f32(0.5), frac)
    t_open = jnp.where(many, t + step0, t - step0)  # one side still unknown
    t_new = jnp.where(bracketed & (~ok | (i % 3 == 2)), t_falsi, jnp.where(ok, t_new, t_open))
    t_next = jnp.where(done, t, t_new)
    return (i + 1, t_next, jnp.where(done, cnt, count(t_next)), t, cnt, lo, c_lo, hi, c_hi)

  t0 = top[:, guess]
  c0 = count(t0)
  nan = jnp.full(t0.shape, jnp.nan, f32)
  state = (jnp.int32(0), t0, c0, t0, c0, nan, nan, nan, nan)
  _, t, cnt, *_ = jax.lax.while_loop(cond, body, state)
  return order_key(t), done_of(cnt)


def _top_k_threshold(key: jax.Array, k: int, cap: int, max_iter: int = 24) -> jax.Array:
  """`top_k_keys` by a threshold pass: per row a key t with k..cap keys >= t (counting passes,
  `_threshold_keys`), those items compacted (`compact_rows`) and sorted by (key, id). If a row
  has no such t (fewer than k keys above NaN and excluded ones, or more than cap - k ties at the
  k-th key), the chunk goes to `lax.top_k` (`only_if`): the result is always exact."""
  t, done = _threshold_keys(key, k, cap, max_iter)
  ids, _ = compact_rows(key >= t[:, None], cap)
  n = key.shape[-1]
  kk = jnp.where(ids < n, jnp.take_along_axis(key, jnp.minimum(ids, n - 1), axis=-1),
                 jnp.int32(EXCLUDED_KEY))
  return only_if(~jnp.all(done), lambda x: _top_k_lax(x, k), _sort_desc_ids(kk, ids)[:, :k], key)


def only_if(pred: jax.Array, fn, otherwise, *args):
  """`fn(*args)` where `pred`, else `otherwise` (same structure), computing `fn` only when
  needed, also under `jax.vmap` (e.g. N runs as one program): there a `lax.cond` with a batched
  predicate becomes a select that always computes both branches, while this loop of at most one
  step runs its body only if some run needs it. `args` enter the body through the loop's carry
  and an optimization barrier, so that XLA cannot hoist `fn` out of the loop as loop-invariant
  (it does, and then always computes it). Not differentiable (a while loop): for refreshes and
  lists, not for losses."""
  def body(carry):
    p, _, a = carry
    a, p = jax.lax.optimization_barrier((a, p))
    return jnp.zeros_like(p), fn(*a), a

  return jax.lax.while_loop(lambda c: c[0], body, (pred, otherwise, args))[1]


TOP_K_METHODS = ("auto", "lax", "threshold")


def top_k_keys(key: jax.Array, k: int, method: str = "auto") -> jax.Array:
  """Column ids of each row's `k` largest int32 order keys [C, N], best first, ties by lower id:
  int32 [C, k], exactly `numpy.argsort(-key, kind='stable')[:, :k]`.

  method: 'lax': `lax.top_k` (on CPU on `key_floats`);
  'threshold': a counting threshold pass, compaction and a sort of about k items (`_top_k_
  threshold`; CPU, large k); 'auto': 'threshold' on CPU for 256 <= k <= N / 4 (~3-5x faster than
  XLA's CPU top-k there, benchmarks/REPORT.md), else 'lax' (accelerators sort).
  """
  n = key.shape[-1]
  if not 0 <= k <= n:
    raise ValueError(f"k must be in [0, {n}], got {k}")
  if method == "auto":
    method = "threshold" if _on_cpu() and 256 <= k and 4 * k <= n else "lax"
  if method == "lax":
    return _top_k_lax(key, k)
  if method == "threshold":
    cap = min(n, -(-(k + max(128, k // 8)) // 64) * 64)
    return _top_k_threshold(key, k, cap)
  raise ValueError(f"method must be one of {TOP_K_METHODS}, got {method!r}")


def _counts_at(key: jax.Array, thresholds: jax.Array) -> jax.Array:
  """#{key >= thresholds[:, j]} per row: int32 [C, n] for int32 keys [C, N] and thresholds
  [C, n]. Two thresholds share one int32 sum (16-bit fields) when N < 2**16: a count pass costs
  a pass over the row whatever it sums."""
  n_items, n = key.shape[-1], thresholds.shape[-1]
  if n_items >= 2**16 or n == 1:
    return jnp.stack([jnp.sum(key >= thresholds[:, j:j + 1], axis=-1, dtype=jnp.int32)
                      for j in range(n)], axis=-1)
  out = []
  for j in range(0, n, 2):
    both = ((key >= thresholds[:, j:j + 1]).astype(jnp.int32)
            + ((key >= thresholds[:, min(j + 1, n - 1):min(j + 1, n - 1) + 1]).astype(jnp.int32)
               << 16))
    total = jnp.sum(both, axis=-1, dtype=jnp.int32)
    out += [total & 0xFFFF, total >> 16][:n - j]
  return jnp.stack(out, axis=-1)


def _band_keys(key: jax.Array, ranks: jax.Array, width: int, bound: int | None = None,
               max_iter: int = 16, pieces: int = 8, sample_width: int = 64):
  """Per row and rank r (`ranks` [C, n], 0-based) a key band holding the item at rank r:
  (lo, hi, above, done), int32 [C, n] each but `done`, with above = #{key >= hi} <= r <
  #{key >= lo} and #{lo <= key < hi} <= width.

  A bracketing search on the scores (`key_floats`) with exact counts (`_counts_at`, all ranks of
  a row in one pass): the first guess is the sample's order statistic at the rank (as in
  `_threshold_keys`), then secant steps aimed a quarter window past the rank on the other side
  of the last count, regula falsi inside the bracket when a step leaves it, and every third
  step. Only exact counts decide. `done` is False where more than `width` keys tie around the
  rank, or the search needs more than `max_iter` passes."""
  f32 = jnp.float32
  n_items = key.shape[-1]
  sample, step0 = _row_sample(key, pieces, sample_width)
  step0 = step0[:, None]
  scale = n_items / sample.shape[-1]
  # The sample's best scores, as far down as the largest rank reaches (`bound`).
  m = min(sample.shape[-1], -(-(bound or n_items) // int(scale)) + 16)
  top = key_floats(_halves(lambda x: jnp.sort(x, axis=-1)[:, ::-1][:, :m], sample))
  r = ranks.astype(f32)
  guess = jnp.clip(jnp.round((r + f32(0.5)) / f32(scale)).astype(jnp.int32) - 1, 0, m - 1)
  quarter = f32(max(width // 4, 1))

  def count(t):
    return _counts_at(key, order_key(t)).astype(f32)

  def done_of(c_lo, c_hi):
    return ~jnp.isnan(c_lo) & ~jnp.isnan(c_hi) & (c_lo - c_hi <= width)

  def cond(state):
    i, *_, c_lo, _, c_hi = state
    return (i < max_iter) & ~jnp.all(done_of(c_lo, c_hi))

  def body(state):
    i, t, cnt, t_prev, c_prev, lo, c_lo, hi, c_hi = state
    done = done_of(c_lo, c_hi)
    # lo: the highest score known to leave the rank's item inside (count > r), hi: the lowest
    # known to leave it outside (count <= r); NaN while unknown.
    aim = jnp.where(cnt > r, r - quarter, r + f32(1) + quarter)
    r_s = guess + jnp.round((aim - cnt) / f32(scale)).astype(jnp.int32)
    t_sample = jnp.take_along_axis(top, jnp.clip(r_s, 0, m - 1), axis=-1)
    t_sample = jnp.where((r_s >= 0) & (r_s < m), t_sample, f32(jnp.nan))
    t_secant = t + (aim - cnt) * (t - t_prev) / (cnt - c_prev)  # NaN or inf when flat
    t_new = jnp.where(i == 0, t_sample, t_secant)
    bracketed = ~jnp.isnan(lo) & ~jnp.isnan(hi)
    ok = jnp.isfinite(t_new) & ~(t_new <= lo) & ~(t_new >= hi)
    frac = jnp.clip((c_lo - aim) / jnp.maximum(c_lo - c_hi, f32(1)), f32(0.05), f32(0.95))
    t_falsi = lo + (hi - lo) * jnp.where(i % 3 == 2, f32(0.5), frac)
    # One side still unknown: a step that doubles each pass (and is not absorbed by |t|).
    step = jnp.maximum(step0, jnp.abs(t) / f32(256)) * jnp.exp2(jnp.minimum(i, 64).astype(f32))
    t_open = jnp.where(cnt > r, t + step, t - step)
    t_new = jnp.where(bracketed & (~ok | (i % 3 == 2)), t_falsi, jnp.where(ok, t_new, t_open))
    t_next = jnp.where(done, t, t_new)
    c_next = jnp.where(done, cnt, count(t_next))
    inside = c_next > r
    new_lo = inside & ~(t_next <= lo)
    new_hi = ~inside & ~(t_next >= hi)
    return (i + 1, t_next, c_next, t, cnt, jnp.where(new_lo, t_next, lo),
            jnp.where(new_lo, c_next, c_lo), jnp.where(new_hi, t_next, hi),
            jnp.where(new_hi, c_next, c_hi))

  t0 = jnp.take_along_axis(top, guess, axis=-1)
  c0 = count(t0)
  nan = jnp.full(t0.shape, jnp.nan, f32)
  inside = c0 > r
  state = (jnp.int32(0), t0, c0, t0, c0, jnp.where(inside, t0, nan), jnp.where(inside, c0, nan),
           jnp.where(inside, nan, t0), jnp.where(inside, nan, c0))
  _, _, _, _, _, lo, c_lo, hi, c_hi = jax.lax.while_loop(cond, body, state)
  done = done_of(c_lo, c_hi)
  return (order_key(lo), order_key(hi), jnp.where(done, c_hi, f32(0)).astype(jnp.int32), done)


def keys_at_ranks(key: jax.Array, ranks: jax.Array, width: int = 64, bound: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """The column ids at 0-based `ranks` [C, n] of each row's order by descending int32 `key`
  [C, N], ties by lower id (`numpy.argsort(-key, kind='stable')[r, ranks[r]]`), without sorting
  the row: per rank a band of at most `width` keys around it (`_band_keys`), the bands' items
  compacted (`compact_rows`) and sorted (n * width of them). Returns (ids int32 [C, n], done
  bool [C]): rows not `done` (more than `width` ties around a rank, or a rank outside the row)
  hold no answer and need another path (`TopLists.at_positions` builds their pool)."""
  n_items, n = key.shape[-1], ranks.shape[-1]
  ranks = ranks.astype(jnp.int32)
  lo, hi, above, done = _band_keys(key, ranks, width, bound)
  band = functools.reduce(jnp.logical_or, [(key >= lo[:, j:j + 1]) & (key < hi[:, j:j + 1])
                                           for j in range(n)])
  ids, _ = compact_rows(band, min(n * width, n_items))
  kk = jnp.where(ids < n_items, jnp.take_along_axis(key, jnp.minimum(ids, n_items - 1), axis=-1),
                 jnp.int32(EXCLUDED_KEY))
  order = _sort_desc_ids(kk, ids)
  sorted_keys = jnp.take_along_axis(key, jnp.minimum(order, n_items - 1), axis=-1)
  sorted_keys = jnp.where(order < n_items, sorted_keys, jnp.int32(EXCLUDED_KEY))
  # The band's first item sits after the union's items above the band (other bands' items).
  before = jnp.sum(sorted_keys[:, None, :] >= hi[:, :, None], axis=-1, dtype=jnp.int32)
  at = jnp.clip(before + ranks - above, 0, order.shape[-1] - 1)
  return jnp.take_along_axis(order, at, axis=-1), jnp.all(done, axis=-1)


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
  order = _halves(_descending_order_of_keys, key)
  c, n = scores.shape
  # The inverse permutation as one flat scatter of distinct positions (~2x cheaper on XLA's CPU
  # than the [rows, order] form).
  positions = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (c, n))
  if c * n < 2**31:
    flat = (order + (jnp.arange(c, dtype=jnp.int32) * n)[:, None]).reshape(-1)
    out = jnp.zeros((c * n,), jnp.int32).at[flat].set(positions.reshape(-1),
                                                      unique_indices=True).reshape(c, n)
  else:
    rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[:, None], (c, n))
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


def top_unobserved(scores: jax.Array, exclude: jax.Array, m: int, method: str = "auto"
                   ) -> tuple[jax.Array, jax.Array]:
  """Each row's `m` best items that are not excluded, best first (ties: lower id first).

  scores [C, N] float, exclude bool [C, N]. Returns (items int32 [C, m], valid bool [C, m]);
  valid is False in the slots beyond a row's number of non-excluded items. Excluded items score
  -inf (tied with -inf scores, by id), in the library's order (`order_key`: -0.0 ties +0.0, NaN
  below -inf), exactly `numpy.argsort(-masked, kind='stable')[:, :m]`; `method`: `top_k_keys`.
  """
  return _pool_of(order_key(jnp.where(exclude, -jnp.inf, scores.astype(jnp.float32))), exclude,
                  m, method)


def _pool_of(key: jax.Array, exclude: jax.Array, m: int, method: str = "auto"):
  items = top_k_keys(key, m, method)
  return items, ~jnp.take_along_axis(exclude, items, axis=-1)


def chunk_positions(users: np.ndarray, chunk_size: int, num_items: int,
                    excluded: tuple[np.ndarray, np.ndarray],
                    held: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
  """Host-side, per chunk of `users` (length a multiple of chunk_size): the flat positions
  row * num_items + item of the items in each user's row of the `excluded` CSR (indptr,
  indices), minus its row of `held` if given, padded with chunk_size * num_items (out of range,
  dropped by a scatter): int32 [num_chunks, E], E the largest count of a chunk.

  A chunk's exclusion mask from these few positions replaces `sparse.row_mask`'s padded
  [C, max_len] scatter (1.6 M updates per 1,024 users at CiteULike's longest training row) by
  ~C x the mean row length.
  """
  if chunk_size * num_items >= 2**31:
    raise ValueError("chunk_size * num_items must fit in int32")
  users = np.asarray(users, np.int64)
  ex_ptr, ex_idx = excluded
  lengths = np.diff(ex_ptr)[users]
  rows = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
  offsets = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  items = np.asarray(ex_idx, np.int64)[np.asarray(ex_ptr, np.int64)[users[rows]] + offsets]
  if held is not None:
    h_ptr, h_idx = held
    keep = ~np.isin(users[rows] * num_items + items,
                    np.repeat(np.arange(len(h_ptr) - 1, dtype=np.int64), np.diff(h_ptr))
                    * num_items + np.asarray(h_idx, np.int64))
    rows, items = rows[keep], items[keep]
  chunk = rows // chunk_size
  flat = (rows % chunk_size) * num_items + items
  n_chunks = len(users) // chunk_size
  counts = np.bincount(chunk, minlength=n_chunks)
  out = np.full((n_chunks, max(int(counts.max(initial=0)), 1)), chunk_size * num_items, np.int64)
  order = np.argsort(chunk, kind="stable")
  offsets = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
  out[chunk[order], offsets] = flat[order]
  return out.astype(np.int32)


# Users per chunk of `TopLists.at_positions`' selection: a chunk's [C, N] keys are read once per
# counting pass, and on the 2-core CPU 64 rows (6.4 MB at CiteULike's N) run ~1.6x faster than
# 256 (benchmarks/REPORT.md).
SELECT_CHUNK = 64


class TopLists:
  """Per-user lists of a model's top-`m` unobserved items (teacher top-M), under a memory budget.

  `build(params)` computes the [U, m] table on device in user chunks when it fits in
  `budget_mb` (else returns an empty dict and stores nothing); `rows(table, params, users)`
  reads a batch's rows from the table, or computes them from `params` when there is none.
  Both give identical rows (`top_unobserved`). Over all users (`build`, `all_rows`), a chunk's
  training items are masked from host-built positions (`chunk_positions`) rather than
  `sparse.row_mask`'s padded scatter.
  """

  def __init__(self, score_all, train, num_users: int, num_items: int, m: int,
               budget_mb: float = 2048, chunk: int = 256, method: str = "auto"):
    from kdrec_jax import sparse  # local import: sparse imports nothing from here
    if not 1 <= m <= num_items:
      raise ValueError(f"top-M list size must be in [1, {num_items}], got {m}")
    self.score_all, self.train, self._sparse = score_all, train, sparse
    self.num_users, self.num_items, self.m = num_users, num_items, int(m)
    self.chunk = max(1, min(int(chunk), num_users, (2**31 - 1) // num_items))
    self.method = method
    self.stored = 5 * num_users * self.m <= budget_mb * 2**20  # int32 ids + bool validity
    self.n_chunks = -(-num_users // self.chunk)
    self._plans = {}
    self._users, self._positions, _ = self._plan(self.chunk)

  def _plan(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunks of `chunk` users (the last wraps around to user 0): (users int32 [K, chunk], their
    training items' flat positions [K, E] (`chunk_positions`), row lengths int32 [K, chunk])."""
    if chunk not in self._plans:
      k = -(-self.num_users // chunk)
      users = np.arange(k * chunk) % self.num_users
      indptr = np.asarray(self.train.indptr)
      self._plans[chunk] = (
          users.reshape(k, chunk).astype(np.int32),
          chunk_positions(users, chunk, self.num_items, (indptr, np.asarray(self.train.indices))),
          np.diff(indptr)[users].reshape(k, chunk).astype(np.int32))
    return self._plans[chunk]

  def compute(self, params, users: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(items [B, m], valid [B, m]) for `users`, from `params`."""
    exclude = self._sparse.row_mask(self.train, users, self.num_items)
    return top_unobserved(self.score_all(params, users), exclude, self.m, self.method)

  def _exclusion(self, users: jax.Array, positions: jax.Array) -> jax.Array:
    c, n = users.shape[0], self.num_items
    return jnp.zeros((c * n,), bool).at[positions].set(True, mode="drop").reshape(c, n)

  def _chunk(self, params, users: jax.Array, positions: jax.Array):
    return top_unobserved(self.score_all(params, users), self._exclusion(users, positions),
                          self.m, self.method)

  def build(self, params) -> dict:
    """{'items' [U, m], 'valid' [U, m]} if stored, else {}."""
    if not self.stored:
      return {}
    items, valid = jax.lax.map(lambda xs: self._chunk(params, *xs),
                               (jnp.asarray(self._users), jnp.asarray(self._positions)))
    return {"items": items.reshape(-1, self.m)[:self.num_users],
            "valid": valid.reshape(-1, self.m)[:self.num_users]}

  def rows(self, table: dict, params, users: jax.Array) -> tuple[jax.Array, jax.Array]:
    if table:
      return table["items"][users], table["valid"][users]
    return self.compute(params, users)

  def all_rows(self, table: dict, params, fn):
    """`fn(users [chunk], items, valid)` over all users in chunks (lax.map); outputs [U, ...]."""
    def one(xs):
      u, positions = xs
      if table:
        return fn(u, *self.rows(table, params, u))
      return fn(u, *self._chunk(params, u, positions))

    out = jax.lax.map(one, (jnp.asarray(self._users), jnp.asarray(self._positions)))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:self.num_users], out)

  def at_positions(self, table: dict, params, choose, method: str = "auto"):
    """Each user's pool entries at the positions `choose(users [C], valid [C, m])` picks (int32
    [C, n], e.g. draws by position): (items, valid) [U, n], exactly those of `all_rows` rows.

    method 'pool' builds each chunk's pool (`all_rows`); 'select' (the 'auto' choice on CPU
    without a stored table, for n <= 4) builds none: when a chunk's valid slots are a prefix
    (each user has at least min(m, unobserved) items scoring above -inf, so `valid` is the
    first min(m, N - #excluded) slots), the items at the chosen ranks are selected
    (`keys_at_ranks`, in chunks of at most `SELECT_CHUNK` users); a chunk where that does not
    hold or a rank cannot be narrowed to a band (ties) builds its pool instead (`only_if`):
    the result is the same either way. CD's student-guided refresh: 0.375 s instead of 0.85 s
    for all CiteULike users on the 2-core CPU (benchmarks/REPORT.md)."""
    if method not in ("auto", "pool", "select"):
      raise ValueError(f"method must be 'auto', 'pool' or 'select', got {method!r}")

    def gather(users, items, valid):
      pos = choose(users, valid)
      return (jnp.take_along_axis(items, pos, axis=-1), jnp.take_along_axis(valid, pos, axis=-1))

    if method == "auto":
      method = "pool" if table or not _on_cpu() else "select"
    if method == "pool":
      return self.all_rows(table, params, gather)
    n_items, m = self.num_items, self.m
    slots = jnp.arange(m, dtype=jnp.int32)

    def one(xs):
      users, positions, lengths = xs
      exclude = self._exclusion(users, positions)
      key = order_key(jnp.where(exclude, -jnp.inf,
                                self.score_all(params, users).astype(jnp.float32)))
      avail = jnp.minimum(m, n_items - lengths)
      finite = jnp.sum(key > _NEG_INF_KEY, axis=-1, dtype=jnp.int32)
      valid = slots[None, :] < avail[:, None]
      pos = choose(users, valid)
      if pos.shape[-1] > 4:  # a band per rank: beyond a few, the pool is cheaper
        return gather(users, *_pool_of(key, exclude, m, self.method))
      ids, done = keys_at_ranks(key, pos, bound=m)
      fast = (ids, jnp.take_along_axis(valid, pos, axis=-1))
      ok = jnp.all(done & (finite >= avail))
      return only_if(~ok, lambda u, q: gather(u, *self._chunk(params, u, q)), fast,
                     users, positions)

    plan = self._plan(min(self.chunk, SELECT_CHUNK))
    out = jax.lax.map(one, tuple(jnp.asarray(x) for x in plan))
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
  slot = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), cand.shape)
  bits = max(1, (d - 1).bit_length())
  if num_items <= 2 ** (31 - bits):  # (item, slot) packed in one int32: a plain sort, ~6x faster
    packed = jnp.sort((cand << bits) | slot, axis=-1)
    srt, order = packed >> bits, packed & ((1 << bits) - 1)
  else:
    srt, order = jax.lax.sort((cand, slot), dimension=1, num_keys=1, is_stable=True)
  first_sorted = jnp.concatenate([jnp.ones_like(srt[:, :1], bool), srt[:, 1:] != srt[:, :-1]],
                                 axis=-1)
  rows = jnp.arange(cand.shape[0])[:, None]
  first = jnp.zeros(cand.shape, bool).at[rows, order].set(first_sorted, unique_indices=True)
  keep = first & ~excluded(cand)
  # Kept slots first, in draw order, then the others (a stable partition; a cumulative count,
  # not a sort).
  kept = jnp.cumsum(keep, axis=-1, dtype=jnp.int32)
  dest = jnp.where(keep, kept - 1, kept[:, -1:] + jnp.cumsum(~keep, axis=-1, dtype=jnp.int32) - 1)
  pick = jnp.zeros(cand.shape, jnp.int32).at[rows, dest].set(slot, unique_indices=True)[:, :n]
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
