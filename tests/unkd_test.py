"""UnKD: quota rounding by hand, the per-group teacher lists against numpy argsort, the tie-free
pair sampler against its closed form (both pair swaps; the reference's against a numpy port of
the authors' loop, with its exact degenerate-pair rate), the loss against numpy, and an
end-to-end run whose results carry the popularity-bias metrics."""
from __future__ import annotations

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import kd_config
from kdrec_jax import methods, metrics, models, train
from kdrec_jax.methods import unkd
from losses_test import tiny_data
from ranking_test import CHI2_999, assert_frequencies


def test_group_quotas_by_hand():
  # lamda 0: equal ratios 1/G; Python's round is half to even.
  assert unkd.group_quotas([10.0, 2.0], 2, 0.0) == [1, 1]  # the CiteULike setting
  assert unkd.group_quotas([9.0, 5.0, 3.0, 1.0], 30, 0.0) == [8, 8, 8, 8]  # 7.5 -> 8: 32 pairs
  assert unkd.group_quotas([9.0, 5.0, 3.0], 10, 0.0) == [4, 3, 3]  # 3 + 3 + 3 < 10: first +1
  assert unkd.group_quotas([9.0, 5.0, 3.0, 1.0], 2, 0.0) == [1, 1, 0, 0]  # 0.5 -> 0; +1, +1
  # lamda 1, mean popularities (30, 10, 2): reversed 2, 22, 30 (sum 54) -> ratios 0.04 -> 0.1
  # (floor), 0.41, 0.56; normalised by 1.07 and times 10: 0.93, 3.83, 5.23 -> 1, 4, 5.
  assert unkd.group_quotas([30.0, 10.0, 2.0], 10, 1.0) == [1, 4, 5]
  # lamda 2: 0.01, 0.1681, 0.3136 (sum 0.4917) -> 0.20, 3.42, 6.38 -> 0, 3, 6; 9 < 10: first +1.
  assert unkd.group_quotas([30.0, 10.0, 2.0], 10, 2.0) == [1, 3, 6]
  assert unkd.group_quotas([4.0], 3, 0.0) == [3]


def pair_probs(n: int, temperature: float) -> np.ndarray:
  """P(min = i, max = j) ∝ 2 q_i q_j for i < j (0-based), as an [n, n] upper-triangular table."""
  q = np.exp(-np.arange(1, n + 1) / temperature)
  p = np.triu(2 * q[:, None] * q[None, :], k=1)
  return p / p.sum()


def reference_pair_probs(n: int, temperature: float) -> np.ndarray:
  """swap='reference': P(pos = i, neg = j) ∝ q_i q_j for i < j (the first draw was the better)
  and P(pos = neg = i) ∝ q_i sum_{j > i} q_j (the first draw was the worse: both slots hold the
  better item). [n, n], upper triangle with diagonal."""
  q = np.exp(-np.arange(1, n + 1) / temperature)
  p = np.triu(q[:, None] * q[None, :], k=1)
  p[np.diag_indices(n)] = p.sum(axis=1)
  return p / p.sum()


def np_reference_kd_sampling(rng, weights: np.ndarray, dis_n: int, reps: int):
  """Port of the authors' `UnKD.KD_sampling` inner loop for one (user, group), `reps` times:
  draw two vectors of dis_n positions with replacement ∝ weights; redraw both until no slot is
  tied; then for each slot where the first draw is worse, their swap through 0-d tensor views,
  which leaves both slots holding the second (better) draw. Returns (pos, neg) positions."""
  p = weights / weights.sum()
  pos, neg = [], []
  for _ in range(reps):
    while True:
      s1 = rng.choice(len(p), dis_n, p=p)
      s2 = rng.choice(len(p), dis_n, p=p)
      if np.all(s1 != s2):
        break
    for l in range(dis_n):
      if s1[l] > s2[l]:
        s1[l] = s2[l]  # `s = samples1[l]` is a view: after this write it reads samples2[l]
        s2[l] = s1[l]  # `samples2[l] = s`: samples2[l] unchanged
    pos.extend(s1.tolist())
    neg.extend(s2.tolist())
  return np.array(pos), np.array(neg)


class SamplerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_truncated_geometric_frequencies(self):
    n, temp = 6, 2.0
    u = jax.random.uniform(jax.random.key(0), (20_000,))
    got = self.variant(functools.partial(unkd.truncated_geometric, temperature=temp))(
        u, jnp.full(u.shape, n))
    assert_frequencies(np.asarray(got), np.exp(-np.arange(1, n + 1) / temp))
    # n = 1 always gives position 0; positions never reach n.
    one = self.variant(functools.partial(unkd.truncated_geometric, temperature=temp))(
        u[:10], jnp.ones(10, jnp.int32))
    assert np.all(np.asarray(one) == 0)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_pairs_follow_the_closed_form_without_ties(self):
    n, temp, rows = 6, 2.0, 10_000
    # Per row three slots: 6 positions, 1 position (no untied pair exists) and 2 positions.
    sizes = jnp.tile(jnp.array([[n, 1, 2, n]], jnp.int32), (rows, 1))
    keys = jax.random.split(jax.random.key(3), rows)
    better, worse, ok = self.variant(functools.partial(unkd.sample_pairs, temperature=temp))(
        keys, sizes)
    better, worse, ok = np.asarray(better), np.asarray(worse), np.asarray(ok)
    chex.assert_shape(better, (rows, 4))
    assert ok[:, [0, 2, 3]].all() and not ok[:, 1].any()
    assert np.all(better[ok] < worse[ok])  # no ties; the positive is the better-ranked one
    assert np.all(worse[ok] < np.asarray(sizes)[ok])
    assert np.all((better[:, 2] == 0) & (worse[:, 2] == 1))
    # Chi-square of the (min, max) cells against P ∝ 2 q_i q_j, i < j.
    p = pair_probs(n, temp)
    cells = np.concatenate([better[:, 0] * n + worse[:, 0], better[:, 3] * n + worse[:, 3]])
    counts = np.bincount(cells, minlength=n * n).reshape(n, n)
    live = p > 0
    assert counts[~live].sum() == 0
    expected = len(cells) * p[live]
    assert expected.min() >= 5
    stat = float(np.sum((counts[live] - expected) ** 2 / expected))
    assert stat < CHI2_999[int(live.sum()) - 1], stat
    # The slots of one row are independent draws: the two 6-position slots differ somewhere.
    assert np.any(cells[:rows] != cells[rows:])

  @pytest.mark.slow
  def test_reference_swap_against_a_port_of_the_authors_loop(self):
    """swap='reference' against the exact cell probabilities and a numpy port of
    `sample.py::UnKD.KD_sampling` (its 0-d-view swap written out); half the pairs degenerate."""
    n, temp, rows, dis_n = 5, 2.0, 12_000, 2
    q = np.exp(-np.arange(1, n + 1) / temp)
    want = reference_pair_probs(n, temp)
    keys = jax.random.split(jax.random.key(11), rows)
    first, second, ok = jax.jit(functools.partial(unkd.sample_pairs, temperature=temp,
                                                  swap="reference"))(
        keys, jnp.full((rows, dis_n), n, jnp.int32))
    first, second = np.asarray(first).ravel(), np.asarray(second).ravel()
    assert np.asarray(ok).all() and np.all(first <= second)
    port = np_reference_kd_sampling(np.random.default_rng(0), q, dis_n, rows)
    for pos, neg in ((first, second), port):
      counts = np.bincount(pos * n + neg, minlength=n * n).reshape(n, n)
      live = want > 0
      assert counts[~live].sum() == 0
      expected = len(pos) * want[live]
      assert expected.min() >= 5
      stat = float(np.sum((counts[live] - expected) ** 2 / expected))
      assert stat < CHI2_999[int(live.sum()) - 1], stat
      # The degenerate (better, better) pairs: each untied pair with probability exactly 1/2.
      rate, sd = np.mean(pos == neg), 0.5 / np.sqrt(len(pos))
      assert abs(rate - 0.5) < 4 * sd, rate
    # Same draws, the two swaps: 'reference' keeps the better item and the second draw.
    f_int, s_int, _ = unkd.sample_pairs(keys[:50], jnp.full((50, dis_n), n, jnp.int32), temp)
    f_ref, s_ref, _ = unkd.sample_pairs(keys[:50], jnp.full((50, dis_n), n, jnp.int32), temp,
                                        swap="reference")
    np.testing.assert_array_equal(f_ref, f_int)
    assert set(np.asarray(s_ref).ravel()) <= set(np.asarray(f_int).ravel()) | set(
        np.asarray(s_int).ravel())
    assert np.all((np.asarray(s_ref) == np.asarray(s_int)) | (np.asarray(s_ref) ==
                                                               np.asarray(f_int)))
    with self.assertRaisesRegex(ValueError, "pair_swap"):
      unkd.sample_pairs(keys[:2], jnp.full((2, 1), n, jnp.int32), temp, swap="fixed")

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_group_lists_match_numpy_argsort(self):
    rng = np.random.default_rng(0)
    c, n, length = 7, 30, 6
    scores = rng.integers(0, 5, (c, n)).astype(np.float32)  # many ties: lower id first
    observed = rng.random((c, n)) < 0.3
    groups = rng.integers(-1, 3, n).astype(np.int32)
    groups[:4] = 3  # group 3 has 4 items: fewer than `length` slots
    items, valid = self.variant(functools.partial(unkd.group_lists, num_groups=4,
                                                  length=length))(
        jnp.asarray(scores), jnp.asarray(observed), jnp.asarray(groups))
    items, valid = np.asarray(items), np.asarray(valid)
    chex.assert_shape(items, (c, 4, length))
    for u in range(c):
      for g in range(4):
        cand = np.flatnonzero((groups == g) & ~observed[u])
        want = cand[np.argsort(-scores[u, cand], kind="stable")][:length]
        k = int(valid[u, g].sum())
        assert k == len(want) and valid[u, g, :k].all()  # the valid slots are a prefix
        np.testing.assert_array_equal(items[u, g, :k], want)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _tiny_method(lambda_kd: float, num_pairs: int):
  """(UnKD on `tiny_data` with BPR-MF teacher d 4 / student d 2, its models' params)."""
  data = tiny_data()
  mods = {m: models.make(ml_collections.ConfigDict(dict(name="bpr_mf", dim=d, init_std=0.7)),
                         data.num_users, data.num_items) for m, d in (("teacher", 4),
                                                                      ("student", 2))}
  cfg = ml_collections.ConfigDict(dict(name="unkd", lambda_kd=lambda_kd, num_groups=2, top_l=5,
                                       rank_temperature=20.0, num_pairs=num_pairs,
                                       group_weight_power=0.0))
  return methods.make(cfg, mods, data), {m: mods[m].init(jax.random.key(i))
                                         for i, m in enumerate(mods)}


class LossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_pair_loss_matches_numpy(self):
    rng = np.random.default_rng(1)
    zp, zn = rng.normal(0, 3, (2, 4, 3)).astype(np.float32)
    valid = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0], [0, 1, 0]], bool)
    got = self.variant(unkd.pair_loss)(zp, zn, valid)
    want = [np.mean(-np.log(_sigmoid(zp[b] - zn[b]))[valid[b]]) if valid[b].any() else 0.0
            for b in range(4)]
    chex.assert_shape(got, (4,))
    chex.assert_trees_all_close(got, np.array(want, np.float32), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_all_masked_is_zero_with_finite_gradients(self):
    f = lambda zp, zn: jnp.sum(unkd.pair_loss(zp, zn, jnp.zeros((2, 3), bool)))  # noqa: E731
    zp, zn = jnp.full((2, 3), 50.0), jnp.full((2, 3), -50.0)
    self.assertEqual(float(self.variant(f)(zp, zn)), 0.0)
    grads = self.variant(jax.grad(f, argnums=(0, 1)))(zp, zn)
    chex.assert_tree_all_finite(grads)
    assert all(float(jnp.abs(g).sum()) == 0 for g in grads)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_method_loss_matches_numpy(self):
    method, params = _tiny_method(0.5, 2)
    assert method.learners == ("student",) and method.refresh_every == 1
    users = jnp.array([0, 2, 2, 4], jnp.int32)  # user 2 twice: counted per training pair
    weight = jnp.array([1.0, 1.0, 1.0, 0.0])
    pos = jnp.array([[5, 9], [1, 3], [1, 3], [0, 1]], jnp.int32)
    neg = jnp.array([[6, 2], [4, 8], [4, 8], [2, 3]], jnp.int32)
    valid = jnp.array([[True, True], [True, False], [True, False], [True, True]])
    batch = {"user": users, "weight": weight}
    out, aux = self.variant(method.loss)(params, batch, (pos, neg, valid), method.hparams)
    p = {k: np.asarray(v, np.float64) for k, v in params["student"].items()}
    u = np.asarray(users)
    zp = np.einsum("bd,bnd->bn", p["user"][u], p["item"][np.asarray(pos)])
    zn = np.einsum("bd,bnd->bn", p["user"][u], p["item"][np.asarray(neg)])
    per_row = [np.mean(-np.log(_sigmoid(zp[b] - zn[b]))[np.asarray(valid)[b]]) for b in range(4)]
    want = float(np.dot(np.asarray(weight), per_row))
    np.testing.assert_allclose(float(aux["unkd"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(out["student"]), 0.5 * want, rtol=1e-5)
    g = jax.grad(lambda prm: method.loss(prm, batch, (pos, neg, valid),
                                         method.hparams)[0]["student"])(params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g["teacher"]))
    assert np.abs(np.asarray(g["student"]["item"])).sum() > 0

  @pytest.mark.slow
  def test_reference_degenerate_pairs_against_the_authors_loss(self):
    """A port of `sample.py::UnKD.sample_diff` (mean over a row's pairs of
    -log(sigma(z_p - z_n) + 1e-10)) on rows holding (better, better) pairs: each adds log 2 to
    its row's mean and nothing to the gradient."""
    method, params = _tiny_method(1.0, 3)
    users = jnp.array([0, 1, 3], jnp.int32)
    pos = jnp.array([[5, 9, 2], [4, 4, 6], [7, 0, 0]], jnp.int32)
    neg = jnp.array([[5, 1, 2], [8, 4, 1], [7, 0, 0]], jnp.int32)  # 5 of 9 pairs degenerate
    valid = jnp.ones((3, 3), bool)
    batch = {"user": users, "weight": jnp.ones(3)}
    loss = lambda prm: method.loss(prm, batch, (pos, neg, valid),  # noqa: E731
                                   method.hparams)[0]["student"]
    p = {k: np.asarray(v, np.float64) for k, v in params["student"].items()}
    u = np.asarray(users)
    zp = np.einsum("bd,bnd->bn", p["user"][u], p["item"][np.asarray(pos)])
    zn = np.einsum("bd,bnd->bn", p["user"][u], p["item"][np.asarray(neg)])
    per_row = np.mean(-np.log(_sigmoid(zp - zn) + 1e-10), axis=-1)
    np.testing.assert_allclose(float(loss(params)), per_row.sum(), rtol=1e-6)
    assert per_row[2] == pytest.approx(np.log(2.0))
    # The gradient is that of the informative pairs alone, still divided by all 3 pairs.
    g = jax.grad(loss)(params)["student"]
    informative = np.asarray(pos) != np.asarray(neg)
    zeroed = (jnp.where(informative, pos, 0), jnp.where(informative, neg, 0), valid)
    g2 = jax.grad(lambda prm: method.loss(prm, batch, zeroed,
                                          method.hparams)[0]["student"])(params)["student"]
    chex.assert_trees_all_close(g, g2, atol=1e-7)
    assert float(jnp.abs(g["user"][3]).sum()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("swap", ["reference", "intended"])
def test_prepare_and_refresh_on_the_synthetic_data(citeulike_file, swap):
  for budget in (2048, 0):  # lists stored once, or recomputed from the teacher every refresh
    cfg = kd_config(citeulike_file, "unkd", num_devices=1, method__top_l=12,
                    method__num_pairs=5, method__lists_budget_mb=budget, method__list_chunk=32)
    if swap == "intended":
      cfg.method.pair_swap = "intended"
    else:  # the configs name it; the method's default is the same
      assert cfg.method.pair_swap == "reference"
      del cfg.method["pair_swap"]
    exp = train.Experiment(cfg)
    data = exp.data
    teacher = exp.models["teacher"].init(jax.random.key(0))
    static = exp.prepare({"teacher": teacher})
    assert bool(static) == bool(budget)
    cache, _ = exp.refresh(static, {"teacher": teacher}, {}, jax.random.key(1), 0)
    pos, neg, ok = (np.asarray(cache[k]) for k in ("pos", "neg", "valid"))
    chex.assert_shape(pos, (data.num_users, 5))  # round(2.5) = 2 each; 4 < 5: group 0 +1
    assert ok.all()
    groups = metrics.popularity_groups(*data.split("train"), data.num_items, 2)
    scores = np.asarray(exp.models["teacher"].score_all(teacher, jnp.arange(data.num_users)))
    indptr, indices = data.split("train")
    for u in range(0, data.num_users, 9):
      seen = set(indices[indptr[u]:indptr[u + 1]].tolist())
      for j in range(5):
        g = 0 if j < 3 else 1
        cand = np.array([i for i in np.flatnonzero(groups == g) if i not in seen])
        order = cand[np.argsort(-scores[u, cand], kind="stable")][:12].tolist()
        # Both items come from the user's group list, the positive ranked above the negative
        # ('reference': or both the same item).
        if swap == "intended":
          assert order.index(pos[u, j]) < order.index(neg[u, j])
        else:
          assert order.index(pos[u, j]) <= order.index(neg[u, j])
    if swap == "reference":
      assert abs(np.mean(pos == neg) - 0.5) < 4 * 0.5 / np.sqrt(pos.size)
    else:
      assert not np.any(pos == neg)
    if budget:
      first = (pos, neg)
    else:  # the same draws whether the lists were stored or recomputed
      np.testing.assert_array_equal(pos, first[0])
      np.testing.assert_array_equal(neg, first[1])
  again, _ = exp.refresh(static, {"teacher": teacher}, {}, jax.random.key(2), 1)
  assert not np.array_equal(np.asarray(again["pos"]), pos)


@pytest.mark.slow
def test_intended_swap_reproduces_the_earlier_unkd(citeulike_file):
  """pair_swap='intended' draws exactly this library's UnKD pairs before the switch (recorded
  from that code, same keys); 'reference' keeps the positives and, in about half the slots,
  repeats the positive as the negative."""
  out = {}
  for swap in ("intended", "reference"):
    cfg = kd_config(citeulike_file, "unkd", num_devices=1, method__top_l=12,
                    method__num_pairs=5, method__pair_swap=swap)
    exp = train.Experiment(cfg)
    teacher = exp.models["teacher"].init(jax.random.key(0))
    cache, _ = exp.refresh(exp.prepare({"teacher": teacher}), {"teacher": teacher}, {}, jax.random.key(1), 0)
    out[swap] = np.asarray(cache["pos"]), np.asarray(cache["neg"])
  pos, neg = out["intended"]
  np.testing.assert_array_equal(pos[:3], [[141, 25, 2, 51, 29], [48, 104, 27, 66, 66],
                                          [56, 68, 68, 131, 96]])
  np.testing.assert_array_equal(neg[:3], [[118, 120, 120, 29, 103], [55, 56, 85, 94, 108],
                                          [114, 100, 71, 76, 131]])
  ref_pos, ref_neg = out["reference"]
  np.testing.assert_array_equal(ref_pos, pos)
  assert np.all((ref_neg == neg) | (ref_neg == pos))


def test_protocol_config_overrides():
  from conftest import REPO_ROOT, load_config_module
  module = load_config_module(os.path.join(REPO_ROOT, "configs", "unkd_protocol.py"))
  cfg = module.get_config("citeulike,unkd")
  assert (cfg.method.pair_swap, cfg.method.lambda_kd) == ("reference", 1.0)
  cfg = module.get_config("ml1m,unkd,pair_swap=intended,lambda_kd=0.5")
  assert (cfg.method.pair_swap, cfg.method.lambda_kd) == ("intended", 0.5)
  with pytest.raises(ValueError, match="not a setting"):
    module.get_config("citeulike,unkd,swap=intended")


@pytest.mark.slow
def test_end_to_end_results_have_bias_metrics(citeulike_file, tmp_path):
  cfg = kd_config(citeulike_file, "unkd", num_devices=1, method__top_l=20, warmup__epochs=1,
                  distill__epochs=1)
  results = train.train_and_evaluate(cfg, str(tmp_path / "unkd"))
  assert set(results["phases"]) == {"warmup", "distill"}
  with open(os.path.join(tmp_path, "unkd", "results.json")) as f:
    saved = json.load(f)
  groups = saved["popularity_groups"]
  assert groups["asked"] == 4 and groups["num_groups"] == len(groups["items"]) >= 1
  assert sum(groups["items"]) == 150
  for split in ("val", "test"):
    student = saved["phases"]["distill"]["student"][split]
    for g in range(groups["num_groups"]):
      for k in cfg.eval.ks:
        for name in (f"Recall@{k}/g{g}", f"NDCG@{k}/g{g}", f"Share@{k}/g{g}"):
          assert 0.0 <= student[name] <= 1.0, (split, name)
    shares = sum(student[f"Share@10/g{g}"] for g in range(groups["num_groups"]))
    assert shares == pytest.approx(1.0, abs=1e-6)  # every item is in some group here
  # The per-epoch validations leave the bias metrics out.
  records = [json.loads(line) for line in
             open(os.path.join(tmp_path, "unkd", "metrics.jsonl")).read().splitlines()]
  evals = [r for r in records if "eval" in r and not r.get("final")]
  assert evals and all("Share@10/g0" not in v["val"] for r in evals for v in r["eval"].values())
  assert np.isfinite([r["unkd"] for r in records if "unkd" in r]).all()
