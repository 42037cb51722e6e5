r"""BD beyond U x I memory: a synthetic catalogue with a realistic popularity skew, timed.

  python -m benchmarks.bench_scale --users 200000 --items 100000 [--pairs_per_user 20] \
      [--sampling_state auto] [--rank_buckets 0] [--epochs 1] [--out results/bench/x.json]

The data: item popularity Zipf-like (p_i ∝ (i + 1)^-alpha, alpha 0.8), user activity lognormal
with the given mean (at least 3 items), items of a user distinct. The run: the BPR-MF BD config
(`configs/bd_bpr_citeulike.py`, teacher d 50, student d 5) with the given batch, its sampling state
chosen as `launch.train` would (or forced). Rows: one rank refresh of both models, BD epochs
(seconds and training pairs per second), and the process's peak resident memory (on an
accelerator also the device's peak). The first
epoch's and refresh's time include compilation; both are also reported after it.
"""
import resource
import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks.common import write_report
from configs import bd_bpr_citeulike
from kdrec_jax import train
from kdrec_jax.data.interactions import Interactions
from kdrec_jax.methods import bd

_USERS = flags.DEFINE_integer("users", 200_000, "Users.")
_ITEMS = flags.DEFINE_integer("items", 100_000, "Items.")
_PAIRS = flags.DEFINE_float("pairs_per_user", 20.0, "Mean training interactions per user.")
_ALPHA = flags.DEFINE_float("alpha", 0.8, "Zipf exponent of item popularity.")
_STATE = flags.DEFINE_string("sampling_state", "auto", "BD sampling state (auto/tables/draws/"
                             "snapshot).")
_BUCKETS = flags.DEFINE_integer("rank_buckets", 0, "0: exact ranks; > 0: histogram ranks.")
_BUDGET = flags.DEFINE_integer("table_budget_mb", 2048, "BD's table budget.")
_BATCH = flags.DEFINE_integer("batch", 1024, "Training pairs per step.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "BD epochs timed.")
_REFRESHES = flags.DEFINE_integer("refreshes", 2, "Refreshes timed.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON report here too.")


def synthetic(num_users: int, num_items: int, mean: float, alpha: float, seed: int = 0
              ) -> Interactions:
  """Interactions with Zipf-like item popularity and lognormal user activity (train only)."""
  rng = np.random.default_rng(seed)
  counts = np.clip(rng.lognormal(np.log(mean) - 0.5, 1.0, num_users).round(), 3,
                   num_items // 10).astype(np.int64)
  cdf = np.cumsum(np.arange(1, num_items + 1, dtype=np.float64) ** -alpha)
  ids = rng.permutation(num_items).astype(np.int64)  # popularity not aligned with item ids
  users = np.repeat(np.arange(num_users, dtype=np.int64), counts)
  items = ids[np.minimum(np.searchsorted(cdf, rng.random(len(users)) * cdf[-1]), num_items - 1)]
  keys = np.unique(users * num_items + items)  # distinct items per user, user-major, sorted
  users, items = keys // num_items, (keys % num_items).astype(np.int32)
  indptr = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=num_users))])
  empty = (np.zeros(num_users + 1, np.int64), np.zeros(0, np.int32))
  out = Interactions(f"synthetic {num_users}x{num_items}", num_users, num_items, indptr, items,
                     *empty, *empty)
  out.validate()
  return out


def main(argv):
  del argv
  t0 = time.perf_counter()
  data = synthetic(_USERS.value, _ITEMS.value, _PAIRS.value, _ALPHA.value)
  cfg = bd_bpr_citeulike.get_config()
  cfg.batch_size = _BATCH.value
  cfg.eval.popularity_groups = 0
  cfg.method.update(dict(sampling_state=_STATE.value, rank_buckets=_BUCKETS.value,
                         table_budget_mb=_BUDGET.value))
  exp = train.Experiment(cfg, data=data)
  rows = {"data_seconds": time.perf_counter() - t0, "train_pairs": data.num_train,
          "max_user_pairs": data.max_row_length(),
          "sampling_state": bd.choose_sampling_state(cfg.method, data.num_users, data.num_items,
                                                     data.num_train, False),
          "tables_mb": bd.table_bytes(data.num_users, data.num_items) / 2**20,
          "draws_mb": bd.draws_bytes(data.num_train, cfg.method.refresh_every,
                                     cfg.method.num_samples) / 2**20,
          "available_mb_at_start": bd.available_mb()}
  program = train.build_phase(exp, "distill")
  start = program.initial_state()
  times = []
  for r in range(_REFRESHES.value):
    t = time.perf_counter()
    state, _ = program.refresh(start, jax.random.key(r), 0)
    jax.block_until_ready(state.cache)
    times.append(time.perf_counter() - t)
  rows["refresh_first_s"], rows["refresh_s"] = times[0], min(times[1:] or times)
  state = program.replicate(state)
  steps = program.steps
  times = []
  for e in range(_EPOCHS.value):
    t = time.perf_counter()
    state, m = program.run_epoch(state, jax.random.key(100 + e), e % cfg.method.refresh_every)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
    print(f"epoch {e}: {times[-1]:.1f} s", flush=True)
  rows["steps_per_epoch"] = steps
  rows["epoch_first_s"], rows["epoch_s"] = times[0], min(times[1:] or times)
  rows["examples_per_s"] = data.num_train / rows["epoch_s"]
  rows["valid_draws_share"] = float(m["valid_student"]) / float(m["examples"])
  rows["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:  # accelerators: the device's own peak
    rows["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  write_report(rows, data, 1, _OUT.value)


if __name__ == "__main__":
  app.run(main)
