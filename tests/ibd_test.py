"""Tests for kdrec_jax.methods.ibd: the record bitsets, the feedback sets and weights, the
per-round statistics (against numpy and hand values, jitted and not), the refresh's tables,
beta = 0 == BD bit for bit (pair and user batches), 4 devices == 1, the record holding exactly
the draws, and a run resumed mid-round equal bit for bit to an uninterrupted one."""
from __future__ import annotations

import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO_ROOT, apply_overrides, load_config_module, quick_config
from kdrec_jax import methods, models, parallel, ranking, sparse, train
from kdrec_jax.checkpoint import PhaseCheckpoints
from kdrec_jax.data.interactions import Interactions
from kdrec_jax.methods import bd, ibd

MODELS = train.MODELS
DIRS = ibd.DIRECTIONS
IBD_CONFIG = load_config_module(os.path.join(REPO_ROOT, "configs", "ibd_citeulike.py"))

needs_4_devices = pytest.mark.skipif(len(jax.devices()) < 4,
                                     reason="needs 4 (fake) devices; see conftest.py")


def _np(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def np_pack(mask: np.ndarray) -> np.ndarray:
  """numpy reference of ibd.pack_bits: item i is bit i % 32 of word i // 32."""
  n = mask.shape[-1]
  w = -(-n // 32)
  bits = np.zeros(mask.shape[:-1] + (w * 32,), np.uint64)
  bits[..., :n] = mask.astype(bool)
  bits = bits.reshape(mask.shape[:-1] + (w, 32))
  return (bits << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


def bit_count(words) -> np.ndarray:
  """Set bits per row of a uint32 bitset [U, W]."""
  return np.unpackbits(np.ascontiguousarray(np.asarray(words)).view(np.uint8), axis=-1).sum(-1)


# ---------------------------------------------------------------------------------------------
# pure functions, jitted and not, against numpy and hand values
# ---------------------------------------------------------------------------------------------

# One user, 6 items. d: the student's discrepancy (the teacher's is -d); item 4 is a masked
# positive; item 3 was not sampled last round.
D = np.array([[5.0, 0.0, -3.0, 2.0, 7.0, 4.0]], np.float32)
KEEP = np.array([[True, True, True, True, False, True]])
SAMPLED = np.array([[True, True, True, False, True, True]])
BASE = np.array([[1.0, 2.0, 3.0, 4.0, 0.0, 5.0]], np.float32)


class IBDChexTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_pack_unpack(self):
    rng = np.random.default_rng(0)
    mask = rng.random((3, 70)) < 0.3  # 70 items: 3 words, the last one partial
    words = self.variant(ibd.pack_bits)(mask)
    chex.assert_shape(words, (3, ibd.num_words(70)))
    assert words.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(words), np_pack(mask))
    back = self.variant(lambda w: ibd.unpack_bits(w, 70))(words)
    np.testing.assert_array_equal(np.asarray(back), mask)
    full = np.ones((1, 64), bool)  # bit 31 set in every word: no sign trouble
    np.testing.assert_array_equal(np.asarray(self.variant(ibd.pack_bits)(full)),
                                  np.full((1, 2), 0xFFFFFFFF, np.uint32))

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_record_items_matches_numpy(self):
    """Pair batches: the bits of the (user, item) draws with ok, duplicates and all, OR-ed into
    what the record held."""
    rng = np.random.default_rng(1)
    num_users, num_items = 5, 70
    before = rng.random((num_users, num_items)) < 0.1
    users = rng.integers(0, num_users, 60).astype(np.int32)
    items = rng.integers(0, num_items, 60).astype(np.int32)
    users[10:20], items[10:20] = users[0], items[0]  # repeated draws
    items[20:25] = items[0] // 32 * 32 + np.arange(5)  # several bits of one word, one user
    users[20:25] = users[0]
    ok = rng.random(60) < 0.8
    got = self.variant(ibd.record_items)(jnp.asarray(np_pack(before)), users, items, ok)
    want = before.copy()
    want[users[ok], items[ok]] = True
    np.testing.assert_array_equal(np.asarray(got), np_pack(want))

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_record_rows_matches_numpy(self):
    """User batches: each row's 0/1 mask OR-ed into its user's record; a user may repeat (a
    padding row), rows without ok are skipped."""
    rng = np.random.default_rng(2)
    num_users, num_items = 6, 40
    before = rng.random((num_users, num_items)) < 0.1
    users = np.array([3, 1, 3, 5, 0, 1], np.int32)
    masks = rng.random((6, num_items)) < 0.3
    ok = np.array([True, True, True, False, True, False])
    got = self.variant(ibd.record_rows)(jnp.asarray(np_pack(before)), users,
                                        jnp.asarray(np_pack(masks)), ok)
    want = before.copy()
    for b in np.flatnonzero(ok):
      want[users[b]] |= masks[b]
    np.testing.assert_array_equal(np.asarray(got), np_pack(want))

  @chex.variants(with_jit=True, without_jit=True)
  def test_feedback_weights_hand_example(self):
    """Sampled last round and still discrepant: (1 + beta); corrected (d <= delta), unsampled
    or masked items: BD's weight."""
    beta = 1.0

    def weights(d, sampled, keep, base):
      f = ibd.feedback_set(d, sampled, keep, 0.0)
      return f, ibd.reweight(base, f, beta)

    f, w = self.variant(weights)(D, SAMPLED, KEEP, BASE)
    np.testing.assert_array_equal(np.asarray(f), [[True, False, False, False, False, True]])
    np.testing.assert_array_equal(np.asarray(w), [[2.0, 2.0, 3.0, 4.0, 0.0, 10.0]])
    # The teacher's direction (d_T = -d): item 2 is the one the student still ranks higher.
    f_t, _ = self.variant(weights)(-D, SAMPLED, KEEP, BASE)
    np.testing.assert_array_equal(np.asarray(f_t), [[False, False, True, False, False, False]])
    # delta = 4.5: only item 0 (d = 5) is still "not corrected".
    f_d = self.variant(lambda *a: ibd.feedback_set(*a, 4.5))(D, SAMPLED, KEEP)
    np.testing.assert_array_equal(np.asarray(f_d), [[True, False, False, False, False, False]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_strict_rule_hand_example(self):
    """Strict: also no progress, d^(r) >= kappa d^(r-1)."""
    d_prev = np.array([[6.0, 1.0, 0.0, 0.0, 0.0, 4.0]], np.float32)
    keep_prev = np.ones((1, 6), bool)
    for kappa, want in ((1.0, [False, False, False, False, False, True]),   # item 0 progressed
                        (0.5, [True, False, False, False, False, True])):   # 5 >= 0.5 * 6
      got = self.variant(lambda d, s, k, dp, kp, kappa=kappa: ibd.feedback_set(
          d, s, k, 0.0, (dp, kp), kappa))(D, SAMPLED, KEEP, d_prev, keep_prev)
      np.testing.assert_array_equal(np.asarray(got), [want])
    masked_before = keep_prev.copy()
    masked_before[0, 5] = False
    got = self.variant(lambda d, s, k, dp, kp: ibd.feedback_set(d, s, k, 0.0, (dp, kp)))(
        D, SAMPLED, KEEP, d_prev, masked_before)
    np.testing.assert_array_equal(np.asarray(got), np.zeros((1, 6), bool))

  @chex.variants(with_jit=True, without_jit=True)
  def test_history_decay_hand_example(self):
    """gamma = 0.5 over two rounds: H = 0.5 1[G1] + 1[G2], weights BD * (1 + beta H)."""
    g1 = np.array([[1, 0, 0, 0, 0, 1]], bool)
    g2 = np.array([[0, 1, 0, 0, 0, 1]], bool)

    def two_rounds(g1, g2, base):
      h = ibd.update_history(jnp.zeros(g1.shape, jnp.float32), g1, 0.5)
      h = ibd.update_history(h, g2, 0.5)
      return h, ibd.reweight(base, h, 2.0)

    h, w = self.variant(two_rounds)(g1, g2, BASE)
    np.testing.assert_allclose(np.asarray(h), [[0.5, 1.0, 0.0, 0.0, 0.0, 1.5]])
    np.testing.assert_allclose(np.asarray(w), [[2.0, 6.0, 3.0, 4.0, 0.0, 20.0]])

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_round_stats_by_hand(self):
    d = np.concatenate([D, D])
    sampled = np.concatenate([SAMPLED, np.zeros_like(SAMPLED)])  # user 1 drew nothing
    keep = np.concatenate([KEEP, KEEP])
    chosen = ibd.feedback_set(d, sampled, keep, 0.0)
    boosted = np.zeros_like(sampled)  # e.g. the shallow stage
    d_prev = d + 1.0

    def stats(d, s, k, c, b, dp, kp):
      per_user = ibd.round_stats(d, s, k, 0.0, c, b, (dp, kp))
      return per_user, ibd.summarize(per_user, 2)

    per_user, total = self.variant(stats)(d, sampled, keep, chosen, boosted, d_prev, keep)
    # User 0 drew items 0, 1, 2, 4, 5; item 4 is masked; items 1 and 2 (d 0, -3) are corrected.
    want = {"sampled": [5, 0], "corrected": [2, 0], "reselected": [2, 0], "boosted": [0, 0],
            "d_sum": [5 + 0 - 3 + 4, 0], "d_count": [4, 0],
            "d_prev_sum": [6 + 1 - 2 + 5, 0], "d_prev_count": [4, 0]}
    assert set(per_user) == set(want) | {"d_hist"}
    for k, v in want.items():
      np.testing.assert_allclose(np.asarray(per_user[k]), v, err_msg=k)
    # The histogram of user 0's recorded discrepancies 5, 0, -3, 4: bins [0, 10) x3, [-10, 0) x1.
    hist = np.zeros((2, len(ibd.HIST_EDGES) + 1))
    zero_bin = ibd.HIST_EDGES.index(0) + 1  # the bin [0, 10)
    hist[0, zero_bin], hist[0, zero_bin - 1] = 3, 1
    np.testing.assert_array_equal(np.asarray(per_user["d_hist"]), hist)
    np.testing.assert_array_equal(np.asarray(total["d_hist"]), hist.sum(0))
    np.testing.assert_allclose(
        [float(total[k]) for k in ("sampled", "corrected", "reselected", "boosted", "mean_d",
                                   "mean_d_prev")],
        [2.5, 1.0, 1.0, 0.0, 6 / 4, 10 / 4])
    empty = ibd.summarize(ibd.round_stats(d, np.zeros_like(sampled), keep, 0.0, chosen,
                                          boosted), 2)
    assert np.isnan(float(empty["mean_d"])) and "mean_d_prev" not in empty

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_random_subset(self):
    rng = np.random.default_rng(3)
    eligible = rng.random((64, 50)) < 0.4
    eligible[0] = False
    sizes = rng.integers(0, 30, 64).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), 64)
    got = np.asarray(self.variant(ibd.random_subset)(keys, eligible, sizes))
    assert not (got & ~eligible).any()  # only eligible items
    np.testing.assert_array_equal(got.sum(1), np.minimum(sizes, eligible.sum(1)))  # exact size
    again = np.asarray(self.variant(ibd.random_subset)(jax.random.split(jax.random.key(1), 64),
                                                      eligible, sizes))
    assert (again != got).any()  # a different key, a different set


def test_random_subset_is_uniform():
  """Every eligible item is picked with probability size / |eligible|."""
  n = 4000
  eligible = np.zeros((n, 12), bool)
  eligible[:, [1, 2, 4, 7, 8, 11]] = True
  got = np.asarray(jax.jit(ibd.random_subset)(jax.random.split(jax.random.key(2), n),
                                              jnp.asarray(eligible), jnp.full(n, 2)))
  freq = got.mean(0)
  np.testing.assert_array_equal(freq[~eligible[0]], 0.0)
  se = np.sqrt((1 / 3) * (2 / 3) / n)
  assert np.abs(freq[eligible[0]] - 1 / 3).max() < 4.5 * se, freq


# ---------------------------------------------------------------------------------------------
# the refresh: iBD's tables are BD's times the feedback factor
# ---------------------------------------------------------------------------------------------

def tiny_setup(model: str = "bpr_mf", **overrides):
  """iBD on 6 users x 12 items (teacher size 4, student 3), rounds of 2 epochs."""
  rows_train = [[0, 1, 2], [3, 4], [5, 6, 7, 0], [1, 8], [2, 9, 4, 11], [6]]
  val = [[3], [5], [], [9], [1], [7]]
  test = [[4], [6], [8], [], [3], [2]]
  data = Interactions.from_rows("tiny", 12, rows_train, val, test)
  cfg = dict(name="ibd", refresh_every=2, tau=5.0, lambda_ts=0.5, lambda_st=0.5, eps_t=0.3,
             eps_e=0.2, num_samples=2, rank_sign="paper", mask_positives=True,
             bpr_negative="uniform", table_budget_mb=2048, refresh_chunk=4,
             **IBD_CONFIG.ibd_settings())
  cfg.update(overrides)
  cfg = ml_collections.ConfigDict(cfg)
  fields = dict(init_std=1.0) if model == "bpr_mf" else dict(dropout=0.5)
  mods = {m: models.make(ml_collections.ConfigDict(dict(name=model, dim=d, **fields)),
                         data.num_users, data.num_items, data=data)
          for m, d in (("teacher", 4), ("student", 3))}
  method = methods.make(cfg, mods, data)
  params = lambda seed: {m: mods[m].init(jax.random.key(seed + i))  # noqa: E731
                         for i, m in enumerate(MODELS)}
  return data, mods, method, params, cfg


def np_feedback(ranks, sampled, cfg, prev_ranks=None):
  """numpy: {dir: (BD weights, F)} from the ranks {'teacher', 'student'} [U, I] and the records
  {dir: bool [U, I]}."""
  r_t, r_s = (ranks[m].astype(np.float64) for m in MODELS)
  keep = (r_t > 0) & (r_s > 0)
  d = r_s - r_t if cfg.rank_sign == "paper" else r_t - r_s
  base = {"student": np.where(keep, np.tanh(np.maximum(cfg.eps_t * d, 0)), 0.0),
          "teacher": np.where(keep, np.exp(-cfg.eps_e * d), 0.0)}
  out = {}
  for name, dd in (("student", d), ("teacher", -d)):
    f = sampled[name] & keep & (dd > cfg.delta)
    if prev_ranks is not None:
      p_t, p_s = (prev_ranks[m].astype(np.float64) for m in MODELS)
      pd = p_s - p_t if name == "student" else p_t - p_s
      f &= (p_t > 0) & (p_s > 0) & (dd >= cfg.kappa * pd)
    out[name] = (base[name], f)
  return out


def _positives(data) -> np.ndarray:
  """bool [U, I]: the training positives."""
  pos = np.zeros((data.num_users, data.num_items), bool)
  indptr, indices = data.split("train")
  for u in range(data.num_users):
    pos[u, indices[indptr[u]:indptr[u + 1]]] = True
  return pos


def _random_record(data, seed):
  """{dir: bool [U, I]}: random non-positive items per user."""
  rng = np.random.default_rng(seed)
  pos = _positives(data)
  return {n: (rng.random(pos.shape) < 0.5) & ~pos for n in DIRS}


@pytest.mark.parametrize("mode", [dict(), dict(strict=True, kappa=0.8), dict(gamma=0.5),
                                  dict(rank_sign="notebook")])
@pytest.mark.slow
def test_refresh_tables_are_bd_times_feedback(mode):
  data, mods, method, params, cfg = tiny_setup(**mode)
  beta = cfg.beta
  snapshot, prev = params(10), params(20)
  sampled = _random_record(data, 0)
  carry = method.init_carry()
  carry["record"] = {n: jnp.asarray(np_pack(sampled[n])) for n in DIRS}
  if cfg.strict:
    carry["prev"] = prev
  history = {n: np.random.default_rng(5).random((data.num_users, data.num_items)) * 0.5
             for n in DIRS}
  if cfg.gamma:
    carry["history"] = {n: jnp.asarray(history[n], jnp.float32) for n in DIRS}
  users = jnp.arange(data.num_users)
  train_csr = sparse.DeviceCSR.from_numpy(*data.split("train"))
  rank = lambda p: dict(zip(MODELS, _np(bd.user_ranks(  # noqa: E731
      mods, train_csr, data.num_items, True, p, users))))
  want = np_feedback(rank(snapshot), sampled, cfg, rank(prev) if cfg.strict else None)
  refresh = jax.jit(method.refresh)
  for epoch, active in ((0, False), (1, False), (2, True), (5, True)):  # rounds 0, 0, 1, 2
    with ranking.x64():
      cache, new_carry = _np(refresh({}, snapshot, carry, jax.random.key(0), epoch))
    for name in DIRS:
      base, f = want[name]
      x = f.astype(np.float64) * active
      if cfg.gamma:
        x = cfg.gamma * history[name] + x
        np.testing.assert_allclose(new_carry["history"][name], x, rtol=1e-6)
      np.testing.assert_allclose(np.diff(cache[f"table_{name}"], axis=1, prepend=0),
                                 base * (1 + beta * x), rtol=1e-5, atol=1e-6, err_msg=name)
      stats = cache["metrics"][name]
      assert float(stats["sampled"]) == pytest.approx(sampled[name].sum() / data.num_users)
      assert float(stats["reselected"]) == pytest.approx(f.sum() / data.num_users)
      assert float(stats["boosted"]) == pytest.approx(f.sum() * active / data.num_users)
      # The new round starts with an empty record.
      np.testing.assert_array_equal(new_carry["record"][name], 0)
    assert int(cache["metrics"]["round"]) == epoch // 2
    assert float(cache["metrics"]["feedback"]) == float(active)
    assert want["student"][1].any() and want["teacher"][1].any()  # a non-trivial test
    if cfg.strict:  # the next round's d^(r-1) comes from these params
      chex.assert_trees_all_equal(new_carry["prev"], _np(snapshot))


@pytest.mark.slow
def test_over_budget_feedback_and_random_control():
  """Over the table budget the cache keeps G per user as bits and each step reweights its
  users' weights; CDAE masks drawn that way equal those drawn from the tables. The random
  control up-weights as many items per user, among those BD can draw."""
  kw = dict(num_samples=3, eps_t=0.2)
  data, mods, method, params, cfg = tiny_setup("cdae", **kw)
  _, _, over, _, _ = tiny_setup("cdae", table_budget_mb=0, **kw)
  _, _, rand, _, _ = tiny_setup("cdae", table_budget_mb=0, feedback="random", **kw)
  snapshot = params(3)
  carry = method.init_carry()
  sampled = _random_record(data, 1)
  carry["record"] = {n: jnp.asarray(np_pack(sampled[n])) for n in DIRS}
  with ranking.x64():
    tables = jax.jit(method.refresh)({}, snapshot, carry, jax.random.key(0), 2)[0]
    cache = jax.jit(over.refresh)({}, snapshot, carry, jax.random.key(0), 2)[0]
    cache_r = jax.jit(rand.refresh)({}, snapshot, carry, jax.random.key(0), 2)[0]
  for c in (tables, cache, cache_r):
    c.pop("metrics")
  assert set(cache) == {"snapshot", "feedback"}
  train_csr = sparse.DeviceCSR.from_numpy(*data.split("train"))
  ranks = dict(zip(MODELS, _np(bd.user_ranks(mods, train_csr, data.num_items, True, snapshot,
                                              jnp.arange(data.num_users)))))
  want = np_feedback(ranks, sampled, cfg)
  for name in DIRS:
    got = np.asarray(ibd.unpack_bits(cache["feedback"][name], data.num_items))
    np.testing.assert_array_equal(got, want[name][1])
    g = np.asarray(ibd.unpack_bits(cache_r["feedback"][name], data.num_items))
    base, f = want[name]
    np.testing.assert_array_equal(g.sum(1), np.minimum(f.sum(1), (base > 0).sum(1)))
    assert not (g & (base == 0)).any()
  users = jnp.asarray(np.repeat(np.arange(data.num_users), 50).astype(np.int32))
  keys = jax.random.split(jax.random.key(4), len(users))
  draw = lambda m, c: _np(jax.jit(lambda c, u, k: m.sample(  # noqa: E731
      {"cache": c}, {"user": u}, k, None))(c, users, keys))
  chex.assert_trees_all_equal(draw(method, tables), draw(over, cache))


def test_config_and_errors(citeulike_file):
  for arg in ("bpr", "cdae,quick", "neumf"):
    cfg = IBD_CONFIG.get_config(arg)
    assert cfg.method.name == "ibd" and cfg.method.beta == 1.0 and not cfg.control
  assert IBD_CONFIG.get_config("cdae").method.num_samples == 5
  # the protocol's arms: the same config as the b1 one with the arm's flags set by hand
  for arm, keys in (("b05", dict(beta=0.5)), ("b1", {}), ("b2", dict(beta=2.0)),
                    ("strict", dict(strict=True)), ("random", dict(feedback="random"))):
    by_hand = IBD_CONFIG.get_config("neumf,quick")
    by_hand.method.update(keys)
    assert IBD_CONFIG.get_config(f"neumf,{arm},quick").to_dict() == by_hand.to_dict(), arm
  for bad in ("lightgcn", "cdae,neumf", "cdae,b1,b2", "cdae,b3"):
    with pytest.raises(ValueError, match="one model"):
      IBD_CONFIG.get_config(bad)
  for bad, match in ((dict(feedback="nope"), "feedback"), (dict(refresh_every=0), "refresh"),
                     (dict(beta=-1.0), ">= 0")):
    with pytest.raises(ValueError, match=match):
      tiny_setup(**bad)


# ---------------------------------------------------------------------------------------------
# training: beta = 0 is BD, 4 devices == 1, the record holds the draws, resume
# ---------------------------------------------------------------------------------------------

def ibd_config(data_path: str, cdae: bool = False, **overrides):
  """The quick BD test config on the synthetic data, as iBD (refresh every epoch, so rounds
  >= 1 have feedback); CDAE teacher 8 / student 3 with `cdae`."""
  cfg = quick_config(data_path, num_devices=1)
  cfg.method.name = "ibd"
  cfg.method.update(IBD_CONFIG.ibd_settings())
  if cdae:
    cfg.teacher = ml_collections.ConfigDict(dict(name="cdae", dim=8, dropout=0.5,
                                                 num_negatives=5))
    cfg.student = ml_collections.ConfigDict(dict(name="cdae", dim=3, dropout=0.5,
                                                 num_negatives=5))
    cfg.batch_size = 16
    cfg.method.update(dict(tau=2.0, num_samples=5))
  return apply_overrides(cfg, overrides)


def _train(cfg, epochs: int, num_devices: int = 1):
  """`epochs` distillation epochs from the seed's fresh models, each after a refresh; returns
  (state, [epoch metrics], [refresh statistics])."""
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill", num_devices=num_devices)
  state = program.initial_state()
  metrics, stats = [], []
  for e in range(epochs):
    state, st = program.refresh(state, jax.random.key(100), e)
    stats.append(st)
    state = program.replicate(state)  # as the phase loop does: one compilation
    state, m = program.run_epoch(state, jax.random.key(100 + e), e)
    metrics.append(_np(m))
  return _np(state), metrics, [_np(s) for s in stats]


@pytest.mark.slow
@pytest.mark.parametrize("cdae", [False, True])
def test_beta_zero_is_bd_bit_for_bit(citeulike_file, cdae):
  """Same seed, 2 epochs (refreshes at 0, shallow, and 1, with feedback; strict and history
  on): identical params, optimizer states and epoch metrics."""
  kw = dict(cdae=cdae, method__strict=True, method__gamma=0.5)
  s_i, m_i, st_i = _train(ibd_config(citeulike_file, method__beta=0.0, **kw), 2)
  s_b, m_b, st_b = _train(ibd_config(citeulike_file, method__name="bd", **kw), 2)
  assert all(s is None for s in st_b)
  for m in MODELS:
    chex.assert_trees_all_equal((s_i.params[m], s_i.opt[m]), (s_b.params[m], s_b.opt[m]))
  for a, b in zip(m_i, m_b):
    chex.assert_trees_all_equal(a, b)
  # The feedback did select items: only beta = 0 made them count nothing.
  assert float(st_i[1]["feedback"]) == 1.0 and float(st_i[0]["feedback"]) == 0.0
  for name in DIRS:
    assert float(st_i[0][name]["sampled"]) == 0.0
    now = {k: float(v) for k, v in st_i[1][name].items() if k != "d_hist"}
    assert now["sampled"] > 0 and now["boosted"] > 0
    assert now["corrected"] + now["reselected"] <= now["sampled"] + 1e-6


def _logged(method, by_users: bool):
  """`method` whose carry also counts every recorded draw in a dense int32 [U, I] 'log' (a
  plain scatter-add of the gathered draws: the reference for the bitsets)."""
  def update_carry(carry, batch, samples):
    new = method.update_carry({k: v for k, v in carry.items() if k != "log"}, batch, samples)
    users = parallel.gather(batch["user"])
    log = {}
    for name in DIRS:
      picked, valid = samples[name]
      ok = parallel.gather((batch["weight"] > 0) & valid).astype(jnp.int32)
      if by_users:
        log[name] = carry["log"][name].at[users].add(
            parallel.gather(picked).astype(jnp.int32) * ok[:, None])
      else:
        items = parallel.gather(picked)
        log[name] = carry["log"][name].at[users[:, None], items].add(
            jnp.broadcast_to(ok[:, None], items.shape))
    return dict(new, log=log)
  return method._replace(update_carry=update_carry)


@pytest.mark.slow
@needs_4_devices
@pytest.mark.parametrize("cdae", [False, True])
def test_4_devices_equal_1_and_record_holds_the_draws(citeulike_file, cdae):
  cfg = ibd_config(citeulike_file, cdae=cdae, method__gamma=0.5, method__strict=True)
  exp = train.Experiment(cfg)
  by_users = cdae
  method = _logged(exp.method, by_users)
  program = {n: train.build_phase(exp, "distill", num_devices=n, method=method)
             for n in (1, 4)}
  shape = (exp.data.num_users, exp.data.num_items)
  empty_log = lambda: {n: jnp.zeros(shape, jnp.int32) for n in DIRS}  # noqa: E731
  with_log = lambda state: state.replace(carry=dict(state.carry, log=empty_log()))  # noqa: E731
  without_log = lambda state: state.replace(carry={k: v for k, v in state.carry.items()  # noqa
                                                   if k != "log"})
  # Round 0 on one device, then the refresh of round 1 (with feedback): the common start.
  state, _ = program[1].refresh(program[1].initial_state(), jax.random.key(0), 0)
  state, _ = program[1].run_epoch(with_log(state), jax.random.key(1), 0)
  state, stats = program[1].refresh(without_log(state), jax.random.key(0), 1)
  assert float(stats["student"]["boosted"]) > 0
  start = _np(with_log(state))  # uncommitted copies, placed by each mesh
  out = {n: _np(program[n].run_epoch(jax.tree.map(jnp.asarray, start), jax.random.key(2), 1))
         for n in (4, 1)}
  (s4, m4), (s1, m1) = out[4], out[1]
  chex.assert_trees_all_equal(s4.carry, s1.carry)  # records, log, history, prev
  for m in MODELS:
    chex.assert_trees_all_close(s4.params[m], s1.params[m], rtol=1e-4, atol=1e-5)
  for k in m1:
    np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-4, err_msg=k)
  for name in DIRS:
    drawn = s1.carry["log"][name] > 0
    recorded = np.asarray(ibd.unpack_bits(s1.carry["record"][name], exp.data.num_items))
    np.testing.assert_array_equal(recorded, drawn, err_msg=name)
    per_user = drawn.sum(1)
    assert per_user.min() > 0
    if not by_users:  # at most one distinct item per training pair (num_samples = 1)
      assert np.all(per_user <= np.diff(exp.data.split("train")[0]))
    assert not (drawn & _positives(exp.data)).any()  # positives are masked


def _resume_config(citeulike_file, **kw):
  # Refreshes at distill epochs 0 and 3 (round 1 has feedback); only phase ends and budget stops
  # checkpoint. The carry holds the records, the previous params (strict) and H (gamma).
  settings = dict(distill__epochs=5, method__refresh_every=3, checkpoint_every=100,
                  control=False, method__strict=True, method__gamma=0.5)
  settings.update(kw)
  return ibd_config(citeulike_file, **settings)


def _refresh_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "refresh" in r]


@pytest.mark.slow
def test_resumed_mid_round_is_bit_identical(citeulike_file, tmp_path):
  """2 warm-up + 5 distillation epochs, 3 per call: the first call stops after distillation
  epoch 1 (mid round 0), the second after epoch 4 (mid round 1, with feedback), so the third
  rebuilds a feedback cache from the snapshot's carry and continues the checkpointed record."""
  cfg_a = _resume_config(citeulike_file)
  workdir_a = str(tmp_path / "a")
  results_a = train.train_and_evaluate(cfg_a, workdir_a)
  cfg_b = _resume_config(citeulike_file, max_epochs_per_run=3)
  workdir_b = str(tmp_path / "b")
  seen = []
  for _ in range(5):
    results_b = train.train_and_evaluate(cfg_b, workdir_b)
    seen.append(sorted(results_b["phases"]))
    if "distill" in results_b["phases"]:
      break
  assert seen == [["warmup"], ["warmup"], ["distill", "warmup"]], seen
  for m in MODELS:
    assert results_b["phases"]["distill"][m] == results_a["phases"]["distill"][m]
  raw = {w: PhaseCheckpoints(os.path.join(w, "checkpoints"), "distill").restore_raw()
         for w in (workdir_a, workdir_b)}
  a, b = _np(raw[workdir_a]), _np(raw[workdir_b])
  assert set(a) == set(b) >= {"teacher", "student", "snapshot", "carry"}
  assert set(a["carry"]) == {"record", "prev", "history"}
  chex.assert_trees_all_equal(a, b)  # params, optimizer states, snapshot, carry: bit for bit
  assert bit_count(a["carry"]["record"]["student"]).sum() > 0
  # One statistics line per refresh (none repeated by the resumed calls), the same values.
  lines_a, lines_b = _refresh_lines(workdir_a), _refresh_lines(workdir_b)
  assert [r["epoch"] for r in lines_a] == [0, 3] and lines_a == lines_b
  r1 = lines_a[1]["refresh"]
  assert r1["feedback"] == 1.0 and r1["round"] == 1
  assert set(r1["student"]) == {"sampled", "corrected", "reselected", "boosted", "mean_d",
                                "mean_d_prev", "d_hist"}
  assert len(r1["student"]["d_hist"]) == len(lines_a[1]["refresh"]["d_hist_edges"]) + 1
  assert sum(r1["student"]["d_hist"]) > 0  # counts of the recorded items, all bins
  assert r1["student"]["sampled"] > 0 and lines_a[0]["refresh"]["student"]["mean_d"] is None
