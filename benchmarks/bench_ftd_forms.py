r"""FTD's loss and gradient in its two exact forms at the RCE-KD protocol's shapes (6,144 entity
slots per step: 2,048 users + 4,096 items; student d = 20, teacher d = 400; 10% padding).

  python -m benchmarks.bench_ftd_forms [--repeats 3]

Prints, per form ('pairs': the n x n similarity matrices; 'gram': the d x d products), the median
seconds of one jitted `jax.value_and_grad(ftd.ftd_loss)` call after a compiling one, and the
loss values (equal to float32 rounding).
"""
import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax.methods import ftd

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per form.")


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  n = 6144
  s = jnp.asarray(rng.normal(size=(n, 20)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(n, 400)), jnp.float32)
  mask = jnp.asarray(rng.random(n) < 0.9)
  for form in ("pairs", "gram"):
    fn = jax.jit(jax.value_and_grad(functools.partial(ftd.ftd_loss, form=form)))
    jax.block_until_ready(fn(s, t, mask))
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      value, grad = fn(s, t, mask)
      jax.block_until_ready(grad)
      times.append(time.perf_counter() - start)
    print(f"{form}: loss+grad {1000 * float(np.median(times)):.1f} ms (median of "
          f"{_REPEATS.value}), loss {float(value):.2f}")


if __name__ == "__main__":
  app.run(main)
