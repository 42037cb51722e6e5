"""HetComp — distillation from heterogeneous teachers and their training trajectories (Kang,
Kweon, Lee, Lian, Xie & Yu, "Distillation from Heterogeneous Models for Top-K Recommendation",
WWW'23).

The student is not shown the converged teachers' ranking at once: each teacher's checkpoints
along its training (its trajectory) give an easy-to-hard sequence of rankings, and each user
moves to the next, harder one when the student has caught up with it (dynamic knowledge
construction, DKC). The knowledge is the ensemble of the teachers' rankings at the user's
current stages; the loss moves from "these items above the rest" to their exact order once every
user has reached the last stage (adaptive knowledge transfer).

What we implement (per teacher x with stages s = 0..S_x-1, K the list length, p the period):

  static:  pi^{x,s}_u = the top-K unobserved items of teacher x's stage-s checkpoint;
           P_u = the user's first n_P training items (n_P = the smallest training row).
  carry:   stage v^x_u (start 0) and d^x_u, the student's distance to the next stage.
  DKC, at every epoch e = p, 2p, ... while not final (below), with D(a, b) = 1 - NDCG@K of the
  student's top-K unobserved list a against the set b (gain 2^{exp(-t/10)} - 1 at student position
  t, rounded to 4 decimals):
    e == p:  d^x_u = D(student, pi^{x, min(v+1, S-1)}_u), stages kept;
    later:   th = alpha 0.995^(e // p); for users with v < S-1,
             r = d^x_u / D(student, pi^{x,v+1}_u); if r > th or r < 1: v += 1 and
             d^x_u = D(student, pi^{x, min(v+2, S-1)}_u) (the stage after the new next one).
  final:   every teacher's mean stage over users, rounded to 2 decimals, equals S_x - 1 (then DKC
           stops for good).
  knowledge T_u: the ensemble of the lists pi^{x, v^x_u}_u: item i gets sum_x exp(-r^x_i / tau_e)
           (r^x_i its 0-based position in teacher x's list; a list without i adds nothing),
           top-K, ties to the lower id; with one teacher, T_u is that teacher's list.
  loss, per (user, positive) row, z = clip(student logits over all items, -40, 40), U_u = the
  user's unobserved items:
    before final:  2 * sum_{j in P_u ∪ T_u} -[z_j - log(e^{z_j} + sum_{i in U_u \\ T_u} e^{z_i})]
    final:         PL(P_u | U_u \\ T_u[:K/2]) + (PL(T_u[:K/2] | U_u \\ T_u[:K/2])
                   + PL(T_u[:K/10] | U_u \\ T_u[:K/10])) / 2,
    with PL(o | B) = -sum_k [z_{o_k} - log(sum_{l>=k} e^{z_{o_l}} + sum_{i in B} e^{z_i})]
    (RRD's relaxed ranking loss); L = L_BPR + lambda * sum over rows.

Two sources, which differ:
  * The authors' code (SeongKu-Kang/HetComp_WWW23): six heterogeneous teachers (MF, ML, DL, GNN,
    AE, I-AE), four trajectory stages each, K = 100, n_P = 10 observed items in an order and
    importance matrices ('state_dict', the paper's Eq. 8) that are precomputed offline and not in
    the repository, knowledge = the argsort of the summed importances; the student trains on the
    KD loss alone (0.01 x the first loss, 0.005 x the second; no BPR), per batch's unique users,
    batch 1024; DKC after the epoch's evaluation (student after e+1 epochs), p = 10, alpha = 1.05.
  * The RCE-KD benchmark's reimplementation (woriazzc/RCEKD and woriazzc/KDs
    `modeling/KD/(cf/)baseline.py::HetComp`), whose CiteULike row the README compares with: ONE
    teacher (the BPR-MF teacher, d = 400) and its checkpoints saved every 50 epochs while it
    trained (`--ckpt_interval=50`; only those before its best epoch are kept, then the best),
    the first num_ckpt = 3 of [checkpoints in epoch order, best] as the stages, K = 50, P_u = the
    first n_P training items in file order, L = L_BPR + lambda KD per batch row (duplicates count),
    lambda 0.005 (x 2 before the final stage), student weight decay 1e-3, DKC at the start of
    epoch e (student after e epochs). Their CiteULike config: configs/citeulike/bpr/hetcomp.yaml.

We follow the reimplementation (its single-teacher case is exactly `configs/kd_citeulike.py:
hetcomp`) and generalise it to several teachers the way the authors' code does (a stage per user
AND per teacher, the knowledge an ensemble). Our departures:
  * The ensemble importance exp(-r / tau_e) over each teacher's top-K list is our choice: the
    authors' Eq. 8 importances are not in their code and we could not read the paper. With one
    teacher any decreasing importance gives the teacher's own list, so the published-row setting
    does not depend on it.
  * Observed items: the reimplementation's first n_P training items in file order (this
    library's training rows are sorted by item id, the order of the protocol's file), not the
    authors' precomputed ranking of 10 observed items.
  * The authors exclude 'hidden positives' (precomputed) from the negative sampling; not done.
  * Logs without their 1e-5 clamp: log-sum-exps over exact set masks (the clamp only acts when
    the summed exponentials are below 1e-5).
  * Stage lists come from `prepare`'s frozen params: the trajectory epochs given
    (`teacher@e`, ...) in epoch order, then the final teacher, the first `num_stages` of them. To
    reproduce the reimplementation, pass only checkpoints from before the teacher's best epoch.

Interface (several frozen teachers): `make(cfg, models, data)` takes 'teacher', 'student' and one
Model per extra teacher name; `prepare(frozen)` takes {'teacher': params, 'teacher@<epoch>': ...,
<name>: ..., '<name>@<epoch>': ...} and returns {'lists': {teacher: {'items', 'valid'}
[S, U, K]}, 'pos', 'pos_valid' [U, n_P]}; `refresh` runs every p epochs on the student only,
keeps {'stage', 'dist': {teacher: [U]}} in the carry and returns the cache {'top', 'top_valid'
[U, K], 'final' (bool), 'metrics'}; the loss reads the student only.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import ranking, sparse
from kdrec_jax.methods import Method, require_pairs
from kdrec_jax.methods.rrd import relaxed_ranking_loss

LABEL = "HetComp"
PAPER = ("Kang, Kweon, Lee, Lian, Xie & Yu, Distillation from Heterogeneous Models for Top-K "
         "Recommendation, WWW'23")
# The RCE-KD / KDs CiteULike config (configs/citeulike/bpr/hetcomp.yaml): lmbda 0.005,
# hetcomp_num_ckpt 3, hetcomp_K 50, hetcomp_p 10, hetcomp_alpha 1.05. ensemble_temperature is
# ours (only used with several teachers).
DEFAULTS = dict(lambda_kd=0.005, num_stages=3, top_k=50, period=10, alpha=1.05,
                ensemble_temperature=10.0)

_NEG = -1e9
_CLIP = 40.0  # student logits are clipped to [-40, 40], as both codes do
_DECAY = 0.995  # the DKC threshold's decay per period


def ndcg_gains(k: int) -> np.ndarray:
  """DKC's NDCG discounted gains at student positions t = 0..k-1: (2^{exp(-t/10)} - 1) /
  log2(t + 2) (float32 [k])."""
  t = np.arange(k, dtype=np.float64)
  return ((2.0 ** np.exp(-t / 10.0) - 1.0) / np.log2(t + 2.0)).astype(np.float32)


def list_distance(student: jax.Array, student_valid: jax.Array, teacher: jax.Array,
                  teacher_valid: jax.Array) -> jax.Array:
  """1 - NDCG@K (rounded to 4 decimals) of the student's lists [C, K] against the teachers'
  lists [C, K] taken as sets: a hit is a student item at position t in the teacher's list."""
  k = student.shape[-1]
  gains = jnp.asarray(ndcg_gains(k))
  hit = jnp.any((student[:, :, None] == teacher[:, None, :]) & teacher_valid[:, None, :], -1)
  ndcg = jnp.sum(jnp.where(hit & student_valid, gains, 0.0), -1) / jnp.sum(gains)
  return 1.0 - jnp.round(ndcg * 1e4) / 1e4


def dkc_update(stage: jax.Array, last: jax.Array, dists: jax.Array, first, threshold
               ) -> tuple[jax.Array, jax.Array]:
  """One DKC step for one teacher. stage int32 [U], last float32 [U] (distance to the next stage
  when it became the next), dists float32 [U, S] (the student's distance to every stage now).

  first: the first DKC (record the distances, keep the stages); else users below the last stage
  whose ratio r = last / (distance to the next stage) has r > threshold or r < 1 move one stage
  on and record their distance to the stage after it. Returns (stage, last).
  """
  s = dists.shape[-1]
  nxt = jnp.minimum(stage + 1, s - 1)
  after = jnp.minimum(stage + 2, s - 1)
  d_next = jnp.take_along_axis(dists, nxt[:, None], -1)[:, 0]
  d_after = jnp.take_along_axis(dists, after[:, None], -1)[:, 0]
  ratio = last / d_next
  move = (stage < s - 1) & ((ratio > threshold) | (ratio < 1.0)) & ~first
  return (jnp.where(move, stage + 1, stage),
          jnp.where(first, d_next, jnp.where(move, d_after, last)))


def is_final(stages: dict, num_stages: dict) -> jax.Array:
  """True when every teacher's mean stage, rounded to 2 decimals, is its last stage."""
  done = [jnp.round(jnp.mean(stages[x].astype(jnp.float32)) * 100) >= 100 * (num_stages[x] - 1)
          for x in stages]
  return jnp.all(jnp.stack(done))


def ensemble(lists: list, valids: list, k: int, temperature) -> tuple[jax.Array, jax.Array]:
  """The top-k of sum_x exp(-r^x_i / temperature) over the teachers' lists ([C, K_x] each, best
  first; r^x_i an item's 0-based position), ties to the lower item id. Returns (items, valid)
  [C, k]."""
  cand = jnp.concatenate(lists, -1)
  ok = jnp.concatenate(valids, -1)
  imp = jnp.concatenate([jnp.broadcast_to(jnp.exp(-jnp.arange(l.shape[-1], dtype=jnp.float32)
                                                  / temperature), l.shape) for l in lists], -1)
  sentinel = jnp.iinfo(jnp.int32).max
  cand = jnp.where(ok, cand, sentinel)
  order = jnp.argsort(cand, axis=-1, stable=True)  # equal items adjacent, ids ascending
  srt = jnp.take_along_axis(cand, order, -1)
  imp = jnp.where(ok, imp, 0.0)
  imp = jnp.take_along_axis(imp, order, -1)
  total = jnp.sum(jnp.where(srt[:, :, None] == srt[:, None, :], imp[:, None, :], 0.0), -1)
  first = jnp.concatenate([jnp.ones_like(srt[:, :1], bool), srt[:, 1:] != srt[:, :-1]], -1)
  score = jnp.where(first & (srt != sentinel), total, -jnp.inf)
  best, pos = jax.lax.top_k(score, k)  # ties: lower position, i.e. lower item id
  return jnp.take_along_axis(srt, pos, -1), best > -jnp.inf


def _mask_of(items: jax.Array, valid: jax.Array, num_items: int) -> jax.Array:
  """bool [B, I]: the valid items of each row."""
  rows = jnp.broadcast_to(jnp.arange(items.shape[0])[:, None], items.shape)
  return jnp.zeros((items.shape[0], num_items), bool).at[rows, jnp.where(
      valid, items, num_items)].set(True, mode="drop")


def overall_loss(z, observed, pos, pos_valid, top, top_valid) -> jax.Array:
  """Per row: sum over j in P ∪ T of -[z_j - log(e^{z_j} + sum_{i in U \\ T} e^{z_i})], U the
  unobserved items."""
  pool = ~observed & ~_mask_of(top, top_valid, z.shape[-1])
  lse = jax.nn.logsumexp(jnp.where(pool, z, _NEG), axis=-1, keepdims=True)
  items = jnp.concatenate([pos, top], -1)
  valid = jnp.concatenate([pos_valid, top_valid], -1)
  s = jnp.take_along_axis(z, items, -1)
  return -jnp.sum(jnp.where(valid, s - jnp.logaddexp(s, lse), 0.0), -1)


def rank_loss(z, observed, pos, pos_valid, top, top_valid) -> jax.Array:
  """Per row: PL(P | U \\ T[:K/2]) + (PL(T[:K/2] | U \\ T[:K/2]) + PL(T[:K/10] | U \\ T[:K/10])) / 2
  (a list of no items contributes 0)."""
  k = top.shape[-1]

  def pl(ordered, ordered_valid, n):
    if ordered.shape[-1] == 0:
      return jnp.zeros(z.shape[0], z.dtype)
    below = ~observed & ~_mask_of(top[:, :n], top_valid[:, :n], z.shape[-1])
    return relaxed_ranking_loss(jnp.take_along_axis(z, ordered, -1), ordered_valid, z, below)

  half, tenth = k // 2, k // 10
  return (pl(pos, pos_valid, half) + (pl(top[:, :half], top_valid[:, :half], half)
                                      + pl(top[:, :tenth], top_valid[:, :tenth], tenth)) / 2.0)


def _trajectory(frozen: dict, name: str, num_stages: int) -> list:
  """The stage params of teacher `name`: its `name@epoch` checkpoints in epoch order, then its
  final params, the first `num_stages`."""
  pattern = re.compile(re.escape(name) + r"@(\d+)$")
  epochs = sorted(int(m.group(1)) for m in map(pattern.match, frozen) if m)
  stages = [frozen[f"{name}@{e}"] for e in epochs] + [frozen[name]]
  return stages[:num_stages]


def teacher_names(models) -> tuple[str, ...]:
  """'teacher', then the extra frozen teachers in name order."""
  return ("teacher",) + tuple(sorted(n for n in models if n not in ("teacher", "student")))


def make(cfg, models, data) -> Method:
  require_pairs("hetcomp", models)
  num_users, num_items = data.num_users, data.num_items
  k = int(cfg.top_k)
  num_stages = int(cfg.num_stages)
  period = int(cfg.period)
  alpha = float(cfg.alpha)
  temperature = float(cfg.get("ensemble_temperature", 10.0))
  if not 2 <= k <= num_items:
    raise ValueError(f"hetcomp: top_k must be in [2, num_items], got {k}")
  if num_stages < 1 or period < 1:
    raise ValueError("hetcomp: num_stages and period must be >= 1")
  names = teacher_names(models)
  indptr, indices = data.split("train")
  train = sparse.DeviceCSR.from_numpy(indptr, indices)
  chunk = cfg.get("list_chunk", 256)
  lists = {x: ranking.TopLists(models[x].score_all, train, num_users, num_items, k,
                               budget_mb=float("inf"), chunk=chunk) for x in names}
  student_lists = ranking.TopLists(models["student"].score_all, train, num_users, num_items, k,
                                   budget_mb=0, chunk=chunk)
  lengths = np.diff(indptr)
  n_pos = int(lengths.min()) if len(lengths) else 0
  if cfg.get("num_observed", 0):
    n_pos = min(n_pos, int(cfg.num_observed))
  starts = np.asarray(indptr[:-1], np.int64)[:, None] + np.arange(n_pos)
  pos_items = jnp.asarray(np.asarray(indices, np.int32)[starts].reshape(num_users, n_pos))
  pos_valid = jnp.ones((num_users, n_pos), bool)  # every row has at least n_pos items

  def prepare(frozen: dict) -> dict:
    """{'lists': {teacher: {'items', 'valid'} [S, U, K]}, 'pos', 'pos_valid' [U, n_P]}."""
    out = {}
    for x in names:
      tables = [lists[x].build(models[x].prepare(p)) for p in _trajectory(frozen, x, num_stages)]
      out[x] = jax.tree.map(lambda *a: jnp.stack(a), *tables)
    return {"lists": out, "pos": pos_items, "pos_valid": pos_valid}

  def knowledge(static, stages):
    """T_u for every user from the teachers' lists at the users' stages: (items, valid) [U, K]."""
    rows = jnp.arange(num_users)
    picked = [static["lists"][x]["items"][stages[x], rows] for x in names]
    valid = [static["lists"][x]["valid"][stages[x], rows] for x in names]
    if len(names) == 1:
      return picked[0], valid[0]
    return ensemble(picked, valid, k, temperature)

  def student_distances(static, student):
    """{teacher: float32 [U, S]}: the student's distance to every stage list of every teacher."""
    def fn(users, items, valid):
      items, valid = jax.lax.optimization_barrier((items, valid))  # one top-K search, many reads
      out = {}
      for x in names:
        t = static["lists"][x]
        out[x] = jnp.stack([list_distance(items, valid, t["items"][s][users],
                                          t["valid"][s][users])
                            for s in range(t["items"].shape[0])], -1)
      return out
    return student_lists.all_rows({}, student, fn)

  def refresh(static, params, carry, key, epoch):
    """At e = p, 2p, ... (before final): DKC; then the knowledge T_u and the final flag."""
    del key
    counts = {x: static["lists"][x]["items"].shape[0] for x in names}
    due = (epoch % period == 0) & (epoch >= period) & ~is_final(carry["stage"], counts)

    def dkc(carry):
      dists = student_distances(static, models["student"].prepare(params["student"]))
      threshold = alpha * _DECAY ** (epoch // period).astype(jnp.float32)
      first = epoch == period
      new = {x: dkc_update(carry["stage"][x], carry["dist"][x], dists[x], first, threshold)
             for x in names}
      return {"stage": {x: new[x][0] for x in names}, "dist": {x: new[x][1] for x in names}}

    carry = jax.lax.cond(due, dkc, lambda c: c, carry)
    items, valid = knowledge(static, carry["stage"])
    final = is_final(carry["stage"], counts)
    mean_stage = {x: jnp.mean(carry["stage"][x].astype(jnp.float32)) for x in names}
    return {"top": items, "top_valid": valid, "final": final,
            "metrics": {"final": final.astype(jnp.float32),
                        **{f"stage_{x}": v for x, v in mean_stage.items()}}}, carry

  def init_carry():
    return {"stage": {x: jnp.zeros(num_users, jnp.int32) for x in names},
            "dist": {x: jnp.ones(num_users, jnp.float32) for x in names}}

  def sample(view, batch, keys, key):
    del keys, key
    users = batch["user"]
    cache, static = view["cache"], view["static"]
    return {"top": cache["top"][users], "top_valid": cache["top_valid"][users],
            "pos": static["pos"][users], "pos_valid": static["pos_valid"][users],
            "final": cache["final"]}

  def loss(outputs, batch, samples, hp):
    users, weight = batch["user"], batch["weight"]
    z = jnp.clip(models["student"].score_all(outputs["student"], users), -_CLIP, _CLIP)
    observed = sparse.row_mask(train, users, num_items)
    args = (z, observed, samples["pos"], samples["pos_valid"], samples["top"],
            samples["top_valid"])
    per_row = jax.lax.cond(samples["final"], lambda a: rank_loss(*a),
                           lambda a: 2.0 * overall_loss(*a), args)
    total = jnp.sum(weight * per_row)
    return ({"student": hp["lambda_kd"] * total},
            {"hetcomp": total,
             "hetcomp_final_rows": jnp.sum(weight) * samples["final"].astype(jnp.float32)})

  return Method(name="hetcomp", loss=loss, learners=("student",), sample=sample,
                prepare=prepare, refresh=refresh, refresh_every=period,
                refresh_reads=("student",), hparams={"lambda_kd": cfg.lambda_kd},
                init_carry=init_carry)
