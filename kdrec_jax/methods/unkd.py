"""UnKD — Unbiased Knowledge Distillation (Chen, Chen, Feng, Zhou & He, "Unbiased Knowledge
Distillation for Recommendation", WSDM'23), as the authors' code (chengang95/UnKD) does it.

The teacher's soft ranking is popularity-biased, so UnKD distils only rankings *within* item
popularity groups. Items are split into G groups of about equal training interaction mass
(`data.popularity.groups`, the reference's `splitGroup`). Once per phase (`prepare`), for every
user u and group g: the teacher's top-L unobserved items of g, best first (L_ug = min(L, number
of g's items u has not trained on)). Every epoch (`refresh`), per user and group: n_g position
pairs (a, b), a and b drawn iid from q(r) ∝ exp(-r / T), r = 1..L_ug, ties redrawn. The loss on
the student's raw logits, per (user, positive) row of the batch (users repeat in proportion to
their training items):

  L_UnKD(u) = mean_{(p, n) in pairs(u)} -log sigma(z^S_up - z^S_un)

summed over the rows, and L = L_own + lambda * sum_rows L_UnKD (the reference averages rows and
adds 1e-10 inside the log; here the library's summed convention and a stable log-sigmoid).

Which item of a pair is the positive (`pair_swap`):
  'reference' (default): what the authors' `sample.py::UnKD.KD_sampling` (and woriazzc/KDs
    `cf/baseline.py::UnKD`) actually compute. They mean to swap a and b when the first draw is
    the worse-ranked one, but swap through 0-d tensor views (`s = a[l]; a[l] = b[l]; b[l] = s`,
    or the tuple form), so the second write copies the already overwritten value: when a > b
    both slots end up holding b, the better item. The pair is (min(a, b), b): half of the pairs
    (exactly: each untied pair with probability 1/2, by symmetry) are (better, better), with loss
    log 2 and zero gradient, which still count in the per-row mean. At equal lambda the KD
    gradient is about half of 'intended'. The published UnKD numbers (the paper's and the
    RCE-KD/KDs table's) were produced with this behaviour.
  'intended': the swap the code means, (min(a, b), max(a, b)): every pair is informative.

Quotas n_g (`group_quotas`): the reference's group ratios (mean popularity reversed, normalised,
rounded to 2 decimals, floored at 0.1), raised to `group_weight_power` (its `lamda`; 0 = equal
quotas) and renormalised; n_g = round(ratio_g * num_pairs) with Python's round (half to even);
if their sum falls short of num_pairs, the first num_pairs - sum groups get one more.

Differences from the reference, all in cases where it hangs or crashes: a (user, group) with
fewer than 2 candidate items gets no pairs (the reference loops forever on 1 item and fails on
0); rows whose pairs are all missing add 0.
"""
from __future__ import annotations

import math
from typing import Sequence

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import losses, metrics, sparse
from kdrec_jax.data import popularity
from kdrec_jax.methods import Method, require_pairs
from kdrec_jax.ranking import per_user_keys

LABEL = "UnKD"
PAPER = "Chen, Chen, Feng, Zhou & He, Unbiased Knowledge Distillation for Recommendation, WSDM'23"
# The RCE-KD / KDs CiteULike config: 2 popularity groups, 2 pairs per user (lamda 0); the pairs
# as the reference code swaps them ('reference': half (better, better); 'intended': all
# informative).
DEFAULTS = dict(lambda_kd=0.5, num_groups=2, num_pairs=2, group_weight_power=0.0, top_l=1000,
                rank_temperature=20.0, pair_swap="reference")

MAX_ROUNDS = 256  # rounds of redrawing tied pairs; a pair still tied after them is dropped
PAIR_SWAPS = ("reference", "intended")


def group_quotas(mean_popularity: Sequence[float], num_pairs: int, power: float) -> list[int]:
  """Pairs per user for each group, by the reference's rules.

  1. Ratios (`dataloader.py::splitGroup`): with the groups' mean item popularities p_g,
     r_g = round((max p + min p - p_g) / sum_h (max p + min p - p_h), 2), then max(r_g, 0.1).
  2. (`sample.py::UnKD.get_rank_negItems`) r_g <- r_g ** power / sum_h r_h ** power.
  3. (`sample.py::UnKD.KD_sampling`) n_g = round(r_g * num_pairs) (Python's round: half to
     even); if sum_g n_g < num_pairs, groups g < num_pairs - sum_g n_g get one more each.

  Returns a list of G ints (their sum can exceed `num_pairs`, e.g. G = 4, 30 pairs: 8 each).
  """
  p = [float(x) for x in mean_popularity]
  if not p:
    raise ValueError("group_quotas: no groups")
  top, bottom = max(p), min(p)
  reversed_ = [(top + bottom) - x for x in p]
  total = sum(reversed_)
  ratios = [round(x / total, 2) for x in reversed_]
  ratios = [0.1 if x < 0.1 else x for x in ratios]
  ratios = [math.pow(x, power) for x in ratios]
  total = sum(ratios)
  ratios = [x / total for x in ratios]
  quotas = [round(x * num_pairs) for x in ratios]
  short = num_pairs - sum(quotas)
  return [q + 1 if short > 0 and g < short else q for g, q in enumerate(quotas)]


def group_lists(scores: jax.Array, observed: jax.Array, groups: jax.Array, num_groups: int,
                length: int) -> tuple[jax.Array, jax.Array]:
  """Each row's top-`length` unobserved items of every group, best first (ties: lower id).

  scores float [C, N], observed bool [C, N] (training items), groups int32 [N] (-1: no group).
  Returns (items int32 [C, G, length], valid bool [C, G, length]); the valid slots of a row and
  group are a prefix, as many as the group has unobserved items (at most `length`).
  """
  items, valid = [], []
  for g in range(num_groups):  # G top-k passes over the chunk's scores
    it, va = metrics.top_k_candidates(scores, ~observed & (groups == g)[None, :], length)
    items.append(it)
    valid.append(va)
  return jnp.stack(items, axis=1), jnp.stack(valid, axis=1)


def truncated_geometric(u: jax.Array, n: jax.Array, temperature: float) -> jax.Array:
  """0-based positions r - 1 with P(r) ∝ exp(-r / T) on r = 1..n, from uniforms u in [0, 1).

  Inverse CDF of an exponential truncated to [0, n / T): E = -log(1 - u (1 - e^{-n/T})), then
  r - 1 = floor(T E), since P(floor(T E) = k) ∝ e^{-k/T} - e^{-(k+1)/T} ∝ e^{-k/T}. Rows with
  n < 1 give 0. In float32, positions whose total q-mass is below ~1e-7 are never drawn (about
  r > 320 at T = 20), as with the reference's float32 multinomial.
  """
  n = jnp.maximum(n, 1).astype(jnp.float32)
  c = -jnp.expm1(-n / temperature)
  e = -jnp.log1p(-u * c)
  return jnp.clip(jnp.floor(e * temperature), 0, n - 1).astype(jnp.int32)


def sample_pairs(keys: jax.Array, n: jax.Array, temperature: float,
                 max_rounds: int = MAX_ROUNDS, swap: str = "intended"
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Position pairs drawn iid from q(r) ∝ exp(-r / T), r = 1..n, conditioned on being untied.

  keys: one PRNG key per row [C]; n: int [C, P], the number of positions of each slot. Each slot
  draws (a, b) iid from q and redraws both while a == b (in a `lax.while_loop`, round t drawing
  from `fold_in(key, t)`); since slots are iid, this equals the reference's redrawing of a user's
  whole vector until no pair is tied. Result: P(a = i, b = j) ∝ q_i q_j for i != j.

  swap: which positions the pair gives (module docstring): 'intended' (min(a, b), max(a, b)),
  so P(first = i, second = j) ∝ 2 q_i q_j for i < j; 'reference' (min(a, b), b): for i < j,
  P(i, j) ∝ q_i q_j and P(i, i) ∝ q_i sum_{j > i} q_j (a degenerate pair, probability 1/2).

  Returns (first, second, ok): int32 [C, P] 0-based positions of the positive and the negative
  (first <= second; first < second with 'intended'), and ok False for slots with n < 2 (no
  untied pair exists) or, with vanishing probability, still tied after `max_rounds` rounds.
  """
  if swap not in PAIR_SWAPS:
    raise ValueError(f"pair_swap must be one of {PAIR_SWAPS}, got {swap!r}")
  feasible = n >= 2

  def draw(t):
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, t), (*n.shape[1:], 2),
                                              jnp.float32))(keys)
    return (truncated_geometric(u[..., 0], n, temperature),
            truncated_geometric(u[..., 1], n, temperature))

  def cond(state):
    t, a, b = state
    return (t < max_rounds) & jnp.any(feasible & (a == b))

  def body(state):
    t, a, b = state
    a2, b2 = draw(t)
    tied = a == b
    return t + 1, jnp.where(tied, a2, a), jnp.where(tied, b2, b)

  a, b = draw(jnp.int32(0))
  _, a, b = jax.lax.while_loop(cond, body, (jnp.int32(1), a, b))
  second = jnp.maximum(a, b) if swap == "intended" else b
  return jnp.minimum(a, b), second, feasible & (a != b)


def pair_loss(z_pos: jax.Array, z_neg: jax.Array, valid: jax.Array) -> jax.Array:
  """Per row: the mean over its valid pairs of -log sigma(z_pos - z_neg) (0 without any).

  z_pos, z_neg float [B, P], valid bool [B, P]. Returns float32 [B].
  """
  per_pair = losses.log_sigmoid_loss(z_pos - z_neg, where=valid, reduce_fn=None)
  count = jnp.sum(valid, axis=-1).astype(per_pair.dtype)
  return jnp.sum(per_pair, axis=-1) / jnp.maximum(count, 1.0)


def make(cfg, models, data) -> Method:
  require_pairs("unkd", models)
  num_users, num_items = data.num_users, data.num_items
  groups_np = popularity.groups(*data.split("train"), num_items, int(cfg.num_groups))
  num_groups = int(groups_np.max()) + 1
  if num_groups < 1:
    raise ValueError("unkd: no item has a training interaction")
  sizes = np.bincount(groups_np[groups_np >= 0], minlength=num_groups)
  pop = data.item_popularity
  mean_pop = np.bincount(groups_np[groups_np >= 0], weights=pop[groups_np >= 0],
                         minlength=num_groups) / sizes
  quotas = group_quotas(mean_pop.tolist(), int(cfg.num_pairs),
                        float(cfg.get("group_weight_power", 0.0)))
  length = int(min(int(cfg.top_l), sizes.max()))
  if length < 1:
    raise ValueError(f"unkd: top_l must be >= 1, got {cfg.top_l}")
  temperature = float(cfg.rank_temperature)
  pair_swap = str(cfg.get("pair_swap", "reference"))
  if pair_swap not in PAIR_SWAPS:
    raise ValueError(f"unkd: pair_swap must be one of {PAIR_SWAPS}, got {pair_swap!r}")
  slot_group = jnp.asarray(np.repeat(np.arange(num_groups), quotas), jnp.int32)  # [P]
  logging.info("unkd: %d popularity groups (asked %d): items %s, mean popularity %s; pairs per "
               "user %s; lists of %d; pair swap %r", num_groups, int(cfg.num_groups),
               sizes.tolist(), np.round(mean_pop, 2).tolist(), quotas, length, pair_swap)
  if not sum(quotas):
    raise ValueError("unkd: num_pairs gives no pairs")

  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  groups = jnp.asarray(groups_np)
  chunk = max(1, min(int(cfg.get("list_chunk", 256)), num_users))
  n_chunks = -(-num_users // chunk)
  chunked_users = (jnp.arange(n_chunks * chunk, dtype=jnp.int32) % num_users).reshape(n_chunks,
                                                                                      chunk)
  stored = 5 * num_users * num_groups * length <= cfg.get("lists_budget_mb", 2048) * 2**20
  score_all = models["teacher"].score_all

  def compute_lists(teacher_params, users):
    observed = sparse.row_mask(train, users, num_items)
    return group_lists(score_all(teacher_params, users), observed, groups, num_groups, length)

  def prepare(frozen):
    """{'items' int32 [U, G, L], 'valid' bool [U, G, L]}: the teacher's per-group lists, if
    they fit in `lists_budget_mb` (else {} and `refresh` recomputes them per chunk)."""
    teacher_params = frozen["teacher"]
    if not stored:
      return {}
    items, valid = jax.lax.map(lambda u: compute_lists(teacher_params, u), chunked_users)
    return {"items": items.reshape(-1, num_groups, length)[:num_users],
            "valid": valid.reshape(-1, num_groups, length)[:num_users]}

  def draw(key, users, items, valid):
    """This epoch's pairs of a chunk of users: {'pos', 'neg' int32, 'valid' bool} [C, P]."""
    n = jnp.sum(valid, axis=-1, dtype=jnp.int32)[:, slot_group]  # [C, P]
    better, worse, ok = sample_pairs(per_user_keys(key, users), n, temperature, swap=pair_swap)
    flat = items.reshape(items.shape[0], -1)
    base = slot_group[None, :] * length
    pos = jnp.take_along_axis(flat, base + better, axis=-1)
    neg = jnp.take_along_axis(flat, base + worse, axis=-1)
    return {"pos": pos.astype(jnp.int32), "neg": neg.astype(jnp.int32), "valid": ok}

  def refresh(static, params, carry, key, epoch):
    """Every epoch: {'pos', 'neg', 'valid'} [U, P] for all users."""
    del epoch

    def one(users):
      if static:
        return draw(key, users, static["items"][users], static["valid"][users])
      return draw(key, users, *compute_lists(params["teacher"], users))

    out = jax.lax.map(one, chunked_users)
    return jax.tree.map(lambda x: x.reshape(-1, x.shape[-1])[:num_users], out), carry

  def sample(view, batch, keys, key):
    del keys, key
    users = batch["user"]
    cache = view["cache"]
    return cache["pos"][users], cache["neg"][users], cache["valid"][users]

  def loss(outputs, batch, samples, hp):
    users, weight = batch["user"], batch["weight"]
    pos, neg, valid = samples
    z_pos = models["student"].score(outputs["student"], users, pos)
    z_neg = models["student"].score(outputs["student"], users, neg)
    total = jnp.sum(weight * pair_loss(z_pos, z_neg, valid))
    pairs = jnp.sum(weight[:, None] * valid)
    return {"student": hp["lambda_kd"] * total}, {"unkd": total, "unkd_pairs": pairs}

  return Method(name="unkd", loss=loss, learners=("student",), sample=sample, prepare=prepare,
                refresh=refresh, refresh_every=1, refresh_reads=("teacher",),
                hparams={"lambda_kd": cfg.lambda_kd})
