r"""Top-K and full-ranking evaluation paths at CiteULike size: candidates and the chosen.

  python -m benchmarks.bench_topk [--rows eval,pool,lists,bd,draw,candidates] [--repeats 3] \
      [--fixture trained|random] [--out results/bench/topk_cpu.json]

Data: CiteULike-t with the RCE-KD split (5,219 users x 25,181 items, `configs/kd_citeulike.py`).
Scores: BPR-MF, d = 20 (student) and d = 400 (teacher). Fixtures: 'random' (normal parameters,
std 0.1: held-out items almost never reach the top 20) or 'trained' (default: `--train_epochs`
epochs of BPR with Adam from the same start, so that the evaluation meets realistic hit rates;
NDCG@20 is printed with each row). Rows (each the median of `repeats` timed calls after a
compiling one; seconds for all users; `uptime` load averages with each row, since the timings
are only comparable on an idle machine):

- eval: one validation evaluation (`Evaluator`, the protocol's settings), both splits one after
  the other, and both in one pass (`metrics.evaluate_splits`); the previous implementation
  (`benchmarks/_topk_reference.py`, today's `full_ranks` chunked as before) beside it, and the
  scores alone (the matmul in user chunks: the floor);
- pool: CD's student pool, the top-3000 unobserved items of every user (`TopLists.build` on the
  student's scores), and a whole student-guided refresh (2 draws per user) from the pools and
  by selecting the drawn ranks (`TopLists.at_positions`, CD's path);
- lists: the teacher's top-500 lists (RRD / DCD prepare), DCD's student top-600 (`capped_ranks`)
  and UnKD's per-group top-1000 lists;
- bd: BD's exact rank refresh of both models (`bd.user_ranks` over all users);
- candidates: the top-k candidates per k (20, 100, 500, 1000, 3000) on one chunk's scores,
  scaled to all users: XLA's `lax.top_k` on floats (the previous path), on int32 keys, the
  blocked top-k (per-block maxima, then the top-k blocks' items), the threshold pass
  (`top_k_keys(method='threshold')`) and the full packed-key sort; and for the evaluation the
  rank-by-counting pass (one count per held-out slot: its cost per slot).
"""
import functools
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _topk_reference as reference
from benchmarks.common import write_report
from configs import kd_citeulike
from kdrec_jax import data as kdata
from kdrec_jax import metrics, ranking, sparse
from kdrec_jax.methods import bd, cd, dcd, unkd
from kdrec_jax.models import bpr_mf

_ROWS = flags.DEFINE_list("rows", ["eval", "pool", "lists", "bd", "candidates"],
                          "Row groups to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per row.")
_FIXTURE = flags.DEFINE_enum("fixture", "trained", ["trained", "random"], "Score fixture.")
_TRAIN_EPOCHS = flags.DEFINE_integer("train_epochs", 60, "BPR epochs of the 'trained' fixture.")
_DIMS = flags.DEFINE_list("dims", ["20", "400"], "Embedding sizes for the evaluation rows.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON report here too.")


def _load():
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _time(fn, repeats):
  """(median wall seconds, median process CPU seconds) of `repeats` calls after a compiling one."""
  jax.block_until_ready(fn())
  walls, cpus = [], []
  for _ in range(repeats):
    c, t = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn())
    walls.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
  return statistics.median(walls), statistics.median(cpus)


def _params(data, dim, fixture, epochs, seed=0):
  params = bpr_mf.init(jax.random.key(seed), data.num_users, data.num_items, dim, 0.1)
  if fixture == "random":
    return params
  users, items = data.train_pairs()
  csr = sparse.DeviceCSR.from_numpy(*data.split("train"))
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def epoch(params, state, key):
    perm = jax.random.permutation(key, len(users))
    nb = len(users) // 2048

    def step(carry, idx):
      params, state, key = carry
      key, sub = jax.random.split(key)
      u, i = jnp.asarray(users)[idx], jnp.asarray(items)[idx]
      neg = ranking.uniform_negatives(jax.random.split(sub, len(idx)), u, csr, data.num_items)
      loss, g = jax.value_and_grad(bpr_mf.cf_loss)(params, u, i, neg, jnp.ones(len(idx)))
      upd, state = opt.update(g, state, params)
      return (optax.apply_updates(params, upd), state, key), loss

    (params, state, _), _ = jax.lax.scan(step, (params, state, key),
                                         perm[:nb * 2048].reshape(nb, 2048))
    return params, state

  for e in range(epochs):
    params, state = epoch(params, state, jax.random.key(100 + e))
  return params


class Table:
  def __init__(self):
    self.rows = []

  def add(self, group, name, wall_cpu, note=""):
    wall, cpu = wall_cpu
    self.rows.append(dict(group=group, row=name, wall_s=wall, cpu_s=cpu, load=_load(),
                          note=note))
    print(f"| {group} | {name} | {wall:.3f} | {cpu:.3f} | {_load()} | {note} |", flush=True)


def eval_rows(table, data, cfg, fixtures, repeats):
  ev = cfg.eval
  kw = dict(ks=tuple(ev.ks), chunk_size=ev.chunk_size, protocol=ev.protocol,
            num_negatives=ev.num_negatives, exclude_other=ev.exclude_other, average=ev.average)
  new = {s: metrics.Evaluator(data, s, **kw) for s in ("val", "test")}
  old = {s: reference.Evaluator(data, s, **kw) for s in ("val", "test")}
  for dim, params in fixtures.items():
    score = bpr_mf.score_all
    got = metrics.evaluate_splits(new, score, params)
    want = {s: old[s](score, params) for s in old}
    note = f"NDCG@20 val {got['val']['NDCG@20']:.4f}, identical: {got == want}"
    g = f"eval d={dim}"
    chunks = jnp.arange(5120, dtype=jnp.int32).reshape(-1, 256) % data.num_users
    scores_only = jax.jit(lambda p: jax.lax.map(lambda u: jnp.max(score(p, u), -1), chunks))
    table.add(g, "scores alone (matmul, all users)", _time(lambda: scores_only(params), repeats))
    table.add(g, "previous: val", _time(lambda: old["val"](score, params), repeats), note)
    table.add(g, "previous: val + test", _time(
        lambda: [old[s](score, params) for s in old], repeats))
    table.add(g, "new: val", _time(lambda: new["val"](score, params), repeats))
    table.add(g, "new: val + test, one after the other", _time(
        lambda: [new[s](score, params) for s in new], repeats))
    table.add(g, "new: val + test in one pass", _time(
        lambda: metrics.evaluate_splits(new, score, params), repeats))


def pool_rows(table, data, params_s, params_t, repeats):
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  u, n = data.num_users, data.num_items
  for m, name, params in ((3000, "CD student pool top-3000", params_s),
                          (500, "teacher top-500 lists (RRD/DCD prepare)", params_t)):
    new = jax.jit(ranking.TopLists(bpr_mf.score_all, train, u, n, m, chunk=256).build)
    old = jax.jit(reference.TopLists(bpr_mf.score_all, train, u, n, m, chunk=256).build)
    with ranking.x64():
      got, want = new(params), old(params)
      same = all(np.array_equal(got[x], want[x]) for x in want)
      table.add("lists", f"previous: {name}", _time(lambda: old(params), repeats))
      table.add("lists", f"new: {name}", _time(lambda: new(params), repeats),
                f"identical: {same}")
  # A whole student-guided CD refresh (2 draws per user), as `bench_kd` times it: from each
  # chunk's pool (previous; today's pool) and by selecting the drawn ranks (new: CD's path).
  cfg = kd_citeulike.get_config("cd")
  log_probs = jnp.asarray(cd.rank_log_probs(3000, cfg.method.rank_temperature))
  previous = reference.TopLists(bpr_mf.score_all, train, u, n, 3000, chunk=256)
  lists = ranking.TopLists(bpr_mf.score_all, train, u, n, 3000, chunk=256)
  refreshes = {
      "previous: CD student-guided refresh (pool + draws)": lambda p, key: previous.all_rows(
          {}, p, lambda uu, it, va: tuple(
              jnp.take_along_axis(x, cd.draw_positions(key, uu, va, log_probs, 2), axis=-1)
              for x in (it, va))),
      "pool: CD student-guided refresh (today's pool + draws)": lambda p, key: lists.at_positions(
          {}, p, lambda uu, va: cd.draw_positions(key, uu, va, log_probs, 2), "pool"),
      "new: CD student-guided refresh (draws, then the drawn ranks selected)":
          lambda p, key: lists.at_positions(
              {}, p, lambda uu, va: cd.draw_positions(key, uu, va, log_probs, 2)),
  }
  with ranking.x64():
    want = jax.jit(next(iter(refreshes.values())))(params_s, jax.random.key(0))
    for name, fn in refreshes.items():
      refresh = jax.jit(fn)
      got = refresh(params_s, jax.random.key(0))
      same = all(np.array_equal(a, b) for a, b in zip(got, want))
      table.add("lists", name, _time(lambda: refresh(params_s, jax.random.key(0)), repeats),
                f"identical: {same}")


def list_rows(table, data, params_s, params_t, repeats):
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  u, n = data.num_users, data.num_items
  chunks = jnp.arange(-(-u // 256) * 256, dtype=jnp.int32).reshape(-1, 256) % u
  items = jax.random.randint(jax.random.key(0), (256, 500), 0, n)

  def capped(fn):
    return jax.jit(lambda p: jax.lax.map(
        lambda uu: fn(bpr_mf.score_all(p, uu), items, 600), chunks))

  old, new = capped(reference.capped_ranks), capped(dcd.capped_ranks)
  with ranking.x64():
    note = f"identical: {bool(jnp.array_equal(old(params_s), new(params_s)))}"
    table.add("lists", "previous: DCD student top-600 ranks", _time(
        lambda: old(params_s), repeats))
    table.add("lists", "new: DCD student top-600 ranks", _time(lambda: new(params_s), repeats),
              note)
  groups = jnp.asarray(metrics.popularity_groups(*data.split("train"), n, 2))

  def group(fn):
    return jax.jit(lambda p: jax.lax.map(lambda uu: fn(
        bpr_mf.score_all(p, uu), sparse.row_mask(train, uu, n), groups, 2, 1000), chunks))

  old, new = group(reference.group_lists), group(unkd.group_lists)
  with ranking.x64():
    a, b = old(params_t), new(params_t)
    note = f"identical: {all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b))}"
    table.add("lists", "previous: UnKD 2 groups x top-1000", _time(
        lambda: old(params_t), repeats))
    table.add("lists", "new: UnKD 2 groups x top-1000", _time(lambda: new(params_t), repeats),
              note)


def bd_rows(table, data, params_s, params_t, repeats):
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  u, n = data.num_users, data.num_items
  models = {"teacher": bpr_mf, "student": bpr_mf}

  class M:  # the two attributes `user_ranks` reads
    def __init__(self):
      self.score_all, self.name = bpr_mf.score_all, "bpr_mf"

  models = {"teacher": M(), "student": M()}
  chunks = jnp.arange(-(-u // 256) * 256, dtype=jnp.int32).reshape(-1, 256) % u
  params = {"teacher": params_t, "student": params_s}
  for label, fn in (("previous", reference.user_ranks), ("new", bd.user_ranks)):
    f = jax.jit(lambda p, fn=fn: jax.lax.map(
        lambda uu: jnp.sum(jnp.stack(fn(models, train, n, True, p, uu)), axis=(0, 2)), chunks))
    with ranking.x64():
      table.add("bd", f"{label}: BD exact rank refresh (both models)",
                _time(lambda: f(params), repeats))


def candidate_rows(table, data, params_s, repeats):
  train = sparse.DeviceCSR.from_numpy(*data.split("train"))
  n, c = data.num_items, 256
  users = jnp.arange(c, dtype=jnp.int32)
  scores = bpr_mf.score_all(params_s, users)
  exclude = sparse.row_mask(train, users, n)
  masked = jnp.where(exclude, -jnp.inf, scores)
  key = ranking.order_key(masked)
  scale = data.num_users / c

  def blocked(key, k, block=32):
    nb = -(-n // block)
    kp = jnp.pad(key, ((0, 0), (0, nb * block - n)), constant_values=ranking.EXCLUDED_KEY)
    bm = jnp.max(kp.reshape(c, nb, block), axis=-1)
    blocks = jnp.sort(ranking._top_k_lax(bm, min(k, nb)), axis=-1)
    cols = (blocks[:, :, None] * block + jnp.arange(block)).reshape(c, -1)
    g = jnp.take_along_axis(kp, cols, axis=-1)
    return jnp.take_along_axis(cols, ranking._top_k_lax(g, k), axis=-1)

  cands = {  # fn(masked scores, keys, k)
      "lax.top_k on floats (previous)": lambda m, key, k: jax.lax.top_k(m, k)[1],
      "lax.top_k on int32 keys": lambda m, key, k: jax.lax.top_k(key, k)[1],
      "top_k_keys 'lax' (lax.top_k on key floats)": lambda m, key, k: ranking.top_k_keys(
          key, k, "lax"),
      "blocked top-k (32-item blocks)": lambda m, key, k: blocked(key, k),
      "threshold pass": lambda m, key, k: ranking.top_k_keys(key, k, "threshold"),
      "full packed-key sort": lambda m, key, k: ranking.descending_order(m)[:, :k],
  }
  for k in (20, 100, 500, 1000, 3000):
    want = np.asarray(jax.lax.top_k(masked, k)[1])
    for name, fn in cands.items():
      if name == "lax.top_k on int32 keys" and k > 100:
        continue  # a full sort: see the sort row
      if name == "blocked top-k (32-item blocks)" and k > 500:
        continue  # more blocks than items
      if name == "threshold pass" and k < 256:
        continue
      f = jax.jit(functools.partial(fn, k=k))
      with ranking.x64():
        same = np.array_equal(np.asarray(f(masked, key)), want)
        wall, cpu = _time(lambda: f(masked, key), repeats)
      table.add(f"top-k k={k}", name, (wall * scale, cpu * scale), f"identical: {same}")
  # Rank by counting: one pass per held-out slot (here one slot per user).
  held = jnp.argmax(scores, axis=-1)
  ids = jnp.arange(n)

  @jax.jit
  def count(key, held):
    hk = jnp.take_along_axis(key, held[:, None], axis=-1)
    return jnp.sum(jnp.where((key > hk) | ((key == hk) & (ids < held[:, None])), 1.0, 0.0),
                   axis=-1)

  wall, cpu = _time(lambda: count(key, held), repeats)
  table.add("eval", "rank by counting: one count pass (per held-out slot)",
            (wall * scale, cpu * scale), "x slots per user (up to 20 needed at k = 20)")


def main(argv):
  del argv
  cfg = kd_citeulike.get_config("none")
  data = kdata.load(cfg.data)
  repeats = _REPEATS.value
  rows = set(_ROWS.value)
  print(f"# bench_topk: {data}, fixture {_FIXTURE.value}, backend {jax.default_backend()}, "
        f"load {_load()}", flush=True)
  fixtures = {int(d): _params(data, int(d), _FIXTURE.value, _TRAIN_EPOCHS.value)
              for d in _DIMS.value}
  params_s = fixtures.get(20) or _params(data, 20, _FIXTURE.value, _TRAIN_EPOCHS.value)
  params_t = fixtures.get(400) or _params(data, 400, _FIXTURE.value, _TRAIN_EPOCHS.value)
  print("| group | row | wall s | cpu s | load (1/5/15 min) | note |\n|---|---|---|---|---|---|")
  table = Table()
  if "eval" in rows:
    eval_rows(table, data, cfg, fixtures, repeats)
  if "pool" in rows:
    pool_rows(table, data, params_s, params_t, repeats)
  if "lists" in rows:
    list_rows(table, data, params_s, params_t, repeats)
  if "bd" in rows:
    bd_rows(table, data, params_s, params_t, repeats)
  if "candidates" in rows:
    candidate_rows(table, data, params_s, repeats)
  write_report({"fixture": _FIXTURE.value, "rows": table.rows}, data, repeats, _OUT.value)


if __name__ == "__main__":
  app.run(main)
