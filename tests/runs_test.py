"""Seeds and grids as one vmapped program (kdrec_jax/runs.py): N runs give the N single runs'
metrics, each run keeps its own best epoch, grid keys outside the traced hyperparameters form
groups, a stopped multi-run workdir resumes, memory is bounded, and the command line reaches it."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import kd_config
from kdrec_jax import runs, train
from kdrec_jax import workdir as wd
from launch import flags_util


@pytest.fixture(scope="module")
def teacher(citeulike_file, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("runs") / "teacher")
  train.train_and_evaluate(kd_config(citeulike_file, "teacher", num_devices=1, warmup__epochs=3,
                                     warmup__patience=0), path)
  return path


def _config(citeulike_file, teacher, method, seeds=None, grid=None, **kw):
  cfg = kd_config(citeulike_file, method, num_devices=1, eval_every=1, teacher_init=teacher,
                  **kw)
  if seeds or grid:
    with cfg.unlocked():
      cfg.runs = ml_collections.ConfigDict(dict(seeds=tuple(seeds or ()), grid=grid or {}))
  return cfg


def _distill(results):
  return {k: v for k, v in results["phases"]["distill"].items() if k != "seconds"}


def test_expand_names_and_groups(citeulike_file):
  cfg = kd_config(citeulike_file, "rrd")
  with cfg.unlocked():
    cfg.runs = ml_collections.ConfigDict(dict(
        seeds=(0, 1), grid={"method": {"lambda_rrd": (0.1, 1.0), "top_m": (20, 30)}}))
  got = runs.expand(cfg)
  assert [r.name for r in got][:3] == ["lambda_rrd0.1_top_m20_s0", "lambda_rrd0.1_top_m20_s1",
                                       "lambda_rrd0.1_top_m30_s0"]
  assert len(got) == 8
  # lambda_rrd is traced (one program), top_m changes shapes: two groups of four runs.
  groups = runs.groups(cfg, got, {"method.lambda_rrd"})
  assert [len(g) for g in groups] == [4, 4]
  assert {dict(r.values)["method.top_m"] for r in groups[0]} == {20}
  one = runs.run_config(cfg, got[3])
  assert one.seed == 1 and one.method.top_m == 30 and "runs" not in one
  cfg.runs.grid = {"method": {"nope": (1, 2)}}
  with pytest.raises(ValueError, match="method.nope"):
    runs.expand(cfg)


def test_command_line_runs_flags():
  rest, got = flags_util._pop_runs(["--config=c.py", "--config.runs.seeds=0,1,2",
                                    "--config.runs.grid.method.lambda_kd=0.1,0.5",
                                    "--config.runs.budget_mb=512", "--workdir=w"])
  assert rest == ["--config=c.py", "--workdir=w"]
  assert got == {"seeds": (0, 1, 2), "grid": {"method": {"lambda_kd": (0.1, 0.5)}},
                 "budget_mb": 512.0}
  with pytest.raises(SystemExit):
    flags_util._pop_runs(["--config.runs.seeds=a"])


def test_live_runs_slice_and_put_back():
  """`take` of the live runs and `put` back (shared leaves from the slice's side: a donating step
  returns them as new buffers); `_scatter` spreads a slice's outputs into a full tree, or into
  zeros where there is none of that structure yet (a refresh's first cache after a resume)."""
  tree = {"a": jnp.arange(6.0).reshape(3, 2), "shared": jnp.ones(4)}
  axes = {"a": 0, "shared": None}
  idx = np.array([0, 2])
  sub = runs.take(tree, axes, idx)
  np.testing.assert_array_equal(sub["a"], [[0, 1], [4, 5]])
  sub = {"a": sub["a"] + 10, "shared": jnp.zeros(4)}
  out = runs.put(tree, axes, idx, sub)
  np.testing.assert_array_equal(out["a"], [[10, 11], [2, 3], [14, 15]])
  np.testing.assert_array_equal(out["shared"], np.zeros(4))
  stats = {"x": jnp.array([5.0, 7.0])}
  np.testing.assert_array_equal(runs._scatter(stats, idx, 3)["x"], [5, 0, 7])
  np.testing.assert_array_equal(runs._scatter(stats, idx, 3, {"x": jnp.ones(3)})["x"], [5, 1, 7])
  np.testing.assert_array_equal(runs._scatter(stats, idx, 3, {})["x"], [5, 0, 7])


def test_memory_is_bounded_with_a_clear_message():
  runs.check_fits(2**20, 3, available_mb=100.0, budget_mb=8192)
  with pytest.raises(ValueError, match=r"runs: 3 runs need about 3 MiB.*more than 1 MiB"):
    runs.check_fits(2**20, 3, available_mb=2.0, budget_mb=8192)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rrd", "none"])
def test_vmapped_seeds_equal_the_single_runs(citeulike_file, teacher, tmp_path, method):
  """N = 3 seeds as one program against three single runs. On the CPU the metrics come out
  identical (vmap keeps each run's float operations); the comparison allows 1e-6 for backends
  where batching the runs' matmuls reassociates their sums."""
  kw = dict(distill__epochs=3, distill__patience=0)
  many = train.train_and_evaluate(_config(citeulike_file, teacher, method, seeds=(0, 1, 2), **kw),
                                  str(tmp_path / "many"))
  assert sorted(many) == ["s0", "s1", "s2"]
  for seed in (0, 1, 2):
    one = train.train_and_evaluate(_config(citeulike_file, teacher, method, seed=seed, **kw),
                                   str(tmp_path / f"one{seed}"))
    a, b = _distill(one), _distill(many[f"s{seed}"])
    for model in ("teacher", "student"):
      for split in ("val", "test"):
        for name, v in a[model][split].items():
          assert b[model][split][name] == pytest.approx(v, abs=1e-6), (seed, model, name)
    # Each run's folder is a single run's: results.json, metrics.jsonl, config.json.
    folder = tmp_path / "many" / f"s{seed}"
    assert json.load(open(folder / "config.json"))["config"]["seed"] == seed
    lines = [json.loads(x) for x in open(folder / "metrics.jsonl")]
    assert {x["epoch"] for x in lines if "loss_student" in x} == {1, 2, 3}


def _numbers(row):
  """{dotted key: number} of a metrics line, less the timings."""
  return {k: v for k, v in wd._flat(row).items() if isinstance(v, (int, float))
          and k.rsplit(".", 1)[-1] not in ("seconds", "seconds_per_epoch", "examples_per_s")}


def _lines(workdir):
  """(phase, epoch, what, numbers) of each metrics.jsonl line of the distillation phase."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["phase"], r["epoch"], "final" if r.get("final") else
           "eval" if "eval" in r else "refresh" if "refresh" in r else "losses", _numbers(r))
          for r in rows if r.get("phase") == "distill"]


def _same_lines(a, b, where):
  """The same lines, values equal up to float32 rounding (a batch's loss summed in another
  order: relative 1e-7 seen)."""
  assert [x[:3] for x in a] == [x[:3] for x in b], where
  for x, y in zip(a, b):
    assert x[3] == pytest.approx(y[3], rel=1e-5, abs=1e-6), (where, x[:3])


@pytest.mark.slow
def test_per_run_early_stopping_and_resume(citeulike_file, teacher, tmp_path, monkeypatch):
  """A grid of the KD weight (traced: one program): each run stops at its own best validation
  epoch, as its single run does, and is left out of the epochs after its stop (the other run's
  losses and validations after it are still its single run's); a sweep stopped every 4 epochs
  (so once between the two stops) resumes to the same results and lines."""
  grid = {"method": {"lambda_rrd": (0.0, 3.0)}}
  # A large step size: the validation curves wander, so the runs peak at different epochs.
  kw = dict(distill__epochs=12, distill__patience=2, distill__student__lr=0.05)
  partial = []  # the live runs of every epoch or refresh that left a stopped run out
  put = runs.put
  monkeypatch.setattr(runs, "put", lambda tree, axes, idx, sub: (
      partial.append(tuple(int(i) for i in idx)), put(tree, axes, idx, sub))[1])
  whole = train.train_and_evaluate(_config(citeulike_file, teacher, "rrd", grid=grid, **kw),
                                   str(tmp_path / "whole"))
  best = {}
  for lam in (0.0, 3.0):
    one = train.train_and_evaluate(
        _config(citeulike_file, teacher, "rrd", method__lambda_rrd=lam, **kw),
        str(tmp_path / f"one{lam}"))
    got = _distill(whole[f"lambda_rrd{lam}_s0"])
    assert got["best_epoch"] == one["phases"]["distill"]["best_epoch"]
    assert got["student"]["test"] == pytest.approx(one["phases"]["distill"]["student"]["test"],
                                                   abs=1e-6)
    best[lam] = (got["best_epoch"], got["epochs"])
    # Its metrics.jsonl reads as the single run's: the same lines and values, none after its
    # stop.
    _same_lines(_lines(tmp_path / "whole" / f"lambda_rrd{lam}_s0"), _lines(tmp_path / f"one{lam}"),
                lam)
  assert best[0.0] != best[3.0]  # (best epoch, stop epoch): (7, 9) and (6, 8)
  # Between the two stops only the run that stops last trains (its epochs and RRD's refreshes).
  last = max(best, key=lambda lam: best[lam][1])
  assert best[last][1] > min(b[1] for b in best.values())
  assert partial and set(partial) == {((0.0, 3.0).index(last),)}
  path = str(tmp_path / "stopped")
  cfg = _config(citeulike_file, teacher, "rrd", grid=grid, max_epochs_per_run=4, **kw)
  for _ in range(6):
    resumed = train.train_and_evaluate(cfg, path)
    if all("distill" in r["phases"] for r in resumed.values()):
      break
  for name in whole:
    assert _distill(resumed[name])["student"] == _distill(whole[name])["student"], name
    _same_lines(_lines(os.path.join(path, name)), _lines(tmp_path / "whole" / name), name)
  assert os.path.isdir(os.path.join(path, "checkpoints", "distill"))
