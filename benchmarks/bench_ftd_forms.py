r"""FTD's loss and gradient in its two exact forms at the RCE-KD protocol's shapes (6,144 entity
slots per step: 2,048 users + 4,096 items; student d = 20, teacher d = 400; 10% padding).

  python -m benchmarks.bench_ftd_forms [--repeats 3] [--runs 3]

Prints, per form ('pairs': the n x n similarity matrices; 'gram': the d x d products), the median
seconds of one jitted `jax.value_and_grad(ftd.ftd_loss)` call after a compiling one, and the
loss values (equal to float32 rounding). With `--runs N`, also the guarded Gram form for N
students as one program (`jax.vmap` over `parallel.RUN_AXIS`, as `kdrec_jax.runs` trains them)
and the same vmap without the axis name (the guard's `lax.cond` then computes both forms).
"""
import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import parallel
from kdrec_jax.methods import ftd

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per form.")
_RUNS = flags.DEFINE_integer("runs", 0, "Also time N students as one vmapped program.")


def _median_seconds(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  n = 6144
  s = jnp.asarray(rng.normal(size=(n, 20)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(n, 400)), jnp.float32)
  mask = jnp.asarray(rng.random(n) < 0.9)
  for form in ("pairs", "gram"):
    fn = jax.jit(jax.value_and_grad(functools.partial(ftd.ftd_loss, form=form)))
    seconds = _median_seconds(fn, s, t, mask)
    print(f"{form}: loss+grad {1000 * seconds:.1f} ms (median of {_REPEATS.value}), "
          f"loss {float(fn(s, t, mask)[0]):.2f}")
  if _RUNS.value:
    students = jnp.stack([s * (1 + 0.01 * r) for r in range(_RUNS.value)])
    per_run = jax.value_and_grad(functools.partial(ftd.ftd_loss, form="gram"))
    for label, axis_name in (("the run axis (only_if)", parallel.RUN_AXIS),
                             ("an unnamed vmap (lax.cond)", None)):
      fn = jax.jit(jax.vmap(per_run, (0, None, None), axis_name=axis_name))
      print(f"{_RUNS.value} runs under {label}: loss+grad "
            f"{1000 * _median_seconds(fn, students, t, mask):.1f} ms")


if __name__ == "__main__":
  app.run(main)
