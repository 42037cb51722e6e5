"""Per-row uniforms for dense per-item masks: `ranking.uniform_rows` vs `jax.random.uniform`
vmapped over one key per row, at a CDAE batch (128 users x 25,181 items).

  python -m benchmarks.bench_uniform_rows [--repeats 20]

Prints JSON (median milliseconds per call, after one compiling call) with hardware and date.
"""
import datetime
import json
import statistics
import time

from absl import app
from absl import flags
import jax

from kdrec_jax import ranking

_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per row.")


def _ms(fn, keys):
  jax.block_until_ready(fn(keys))
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(keys))
    times.append(time.perf_counter() - t0)
  return 1000 * statistics.median(times)


def main(argv):
  del argv
  rows, items = 128, 25_181
  keys = jax.random.split(jax.random.key(0), rows)
  hashed = jax.jit(lambda ks: ranking.uniform_rows(ks, items))
  threefry = jax.jit(jax.vmap(lambda k: jax.random.uniform(k, (items,))))
  print(json.dumps({
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__, "backend": jax.default_backend(), "shape": [rows, items],
      "ms": {"uniform_rows": _ms(hashed, keys), "jax_random_uniform": _ms(threefry, keys)},
  }, indent=2))


if __name__ == "__main__":
  app.run(main)
