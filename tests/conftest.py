"""Shared test setup: 4 fake CPU devices, a small synthetic CiteULike-format dataset and quick
configs pointed at it (BD, and the teacher->student protocol)."""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile

# A persistent compilation cache for this session (and the launcher subprocesses, which inherit
# the environment): the train tests build the same programs several times (each resumed run makes
# a new Experiment), and on CPU compiling, not running, dominates their time. Results are
# unaffected. An existing JAX_COMPILATION_CACHE_DIR is respected.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="kdrec_jax_test_cache_")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import chex  # noqa: E402  (after the cache settings: importing chex imports jax)

# 4 fake CPU devices. Must happen before any JAX operation (pytest imports conftest.py before the
# test modules); it sets XLA_FLAGS, which the launcher subprocesses inherit.
chex.set_n_cpu_devices(4)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO_ROOT, "configs", "bd_bpr_citeulike.py")

NUM_USERS, NUM_ITEMS, NUM_CLUSTERS = 120, 150, 5


def synthetic_citeulike_lines(num_users: int = NUM_USERS, num_items: int = NUM_ITEMS,
                              num_clusters: int = NUM_CLUSTERS, seed: int = 0) -> list[str]:
  """users.dat lines (`count item ids...`): each user has 8-25 items, ~85% from its cluster.

  Item i belongs to cluster i % num_clusters, so a low-rank model can learn the structure.
  """
  rng = np.random.default_rng(seed)
  items = np.arange(num_items)
  lines = []
  for u in range(num_users):
    cluster = u % num_clusters
    n = int(rng.integers(8, 26))
    inside = items[items % num_clusters == cluster]
    outside = items[items % num_clusters != cluster]
    n_in = min(int(round(0.85 * n)), len(inside))
    chosen = np.concatenate([rng.choice(inside, n_in, replace=False),
                             rng.choice(outside, n - n_in, replace=False)])
    rng.shuffle(chosen)
    lines.append(" ".join(str(x) for x in [len(chosen), *chosen]))
  return lines


@pytest.fixture(scope="session")
def citeulike_file(tmp_path_factory) -> str:
  """Path of a synthetic 120-user x 150-item users.dat (every item appears)."""
  lines = synthetic_citeulike_lines()
  used = {int(t) for line in lines for t in line.split()[1:]}
  assert used == set(range(NUM_ITEMS)), "every item should occur so num_items is 150"
  path = tmp_path_factory.mktemp("data") / "synthetic.dat"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def load_config_module(path: str = CONFIG_FILE):
  """The config file at `path` (default: configs/bd_bpr_citeulike.py) as a module."""
  name = os.path.splitext(os.path.basename(path))[0] + "_config"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_overrides(cfg, overrides: dict):
  """Sets dotted config names written with '__' for '.', e.g. {'distill__epochs': 4}."""
  for name, value in overrides.items():
    *parents, leaf = name.split("__")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture(autouse=True)
def _quiet_logs():
  """absl INFO progress lines off during tests (warnings and errors still show)."""
  from absl import logging
  old = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  yield
  logging.set_verbosity(old)


def quick_config(data_path: str, **overrides):
  """`get_config('quick')` on `data_path` with tiny epochs; `overrides` use dotted names with
  '__' for '.', e.g. quick_config(p, distill__epochs=4)."""
  cfg = load_config_module().get_config("quick")
  cfg.data.path = data_path
  cfg.warmup.epochs = 2
  cfg.distill.epochs = 2
  cfg.method.refresh_every = 1
  cfg.batch_size = 32
  cfg.eval.ks = (5, 10)
  cfg.eval.chunk_size = 64
  cfg.log_every = 1
  cfg.checkpoint_every = 1
  cfg.eval_every = 0
  return apply_overrides(cfg, overrides)


@pytest.fixture
def make_config(citeulike_file):
  """`make_config(**overrides)` -> a quick config on the synthetic dataset."""
  return lambda **overrides: quick_config(citeulike_file, **overrides)


KD_CONFIG_FILE = os.path.join(REPO_ROOT, "configs", "kd_citeulike.py")


def kd_config(data_path: str, method: str, **overrides):
  """`configs/kd_citeulike.py:<method>,quick` shrunk to the synthetic data: teacher d=8,
  student d=4, batch 64, 2 + 2 epochs, small lists; `overrides` as in `quick_config`."""
  cfg = load_config_module(KD_CONFIG_FILE).get_config(method + ",quick")
  cfg.data.path = data_path
  cfg.teacher.dim, cfg.student.dim = 8, 4
  cfg.batch_size = 64
  cfg.warmup.epochs = 2
  cfg.distill.epochs = 2 if cfg.distill.epochs else 0  # ':teacher' has no distillation phase
  cfg.eval.chunk_size = 64
  small = dict(pool_size=40, top_m=30, num_interesting=5, num_uninteresting=10, top_k=5,
               num_dynamic_samples=10, dynamic_start_epoch=1, num_experts=3, num_samples=3,
               top_l=30)
  for k, v in small.items():
    if k in cfg.method:
      cfg.method[k] = v
  return apply_overrides(cfg, overrides)


def assert_only_student_moved(before, after, context=None) -> None:
  """A distillation epoch from state `before` to `after` left every teacher parameter unchanged
  and moved some student parameter (by more than 1e-5)."""
  import jax
  for a, b in zip(jax.tree.leaves(after.params["teacher"]),
                  jax.tree.leaves(before.params["teacher"])):
    np.testing.assert_array_equal(a, b, err_msg=str(context or ""))
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(after.params["student"]),
                                                jax.tree.leaves(before.params["student"]))]
  assert max(moved) > 1e-5, context


def raises_data_error_at(fn, fname: str, line=None, *fragments: str) -> str:
  """Calls `fn`, which must raise a DataError naming `fname` (and `fname:line:` when `line` is
  given) with every fragment in its message; returns the message."""
  from kdrec_jax.data import DataError
  with pytest.raises(DataError) as info:
    fn()
  msg = str(info.value)
  assert fname in msg, msg
  if line is not None:
    assert f"{fname}:{line}:" in msg, msg
  for frag in fragments:
    assert frag in msg, msg
  return msg
