r"""Where a BD rank refresh's time goes: its parts timed on one chunk of users at CiteULike's size.

  python -m benchmarks.profile_refresh [--users 256] [--items 25181] [--repeats 3] [--out F]

Rows, each the median of `repeats` calls after a compiling one, for `users` random users x `items`
(d = 50 scores), scaled to the 5,219 users of a CiteULike refresh (x 5219 / users): the scores (a
matmul), exact ranks (the packed-key sort), histogram ranks (8,192 bins), BD's two weight
formulas, and one cumulative table (`ranking.weights_cdf`: cumsum + running max) alone and its
cumsum alone. A refresh needs two scores, two ranks, the weights and two tables.
"""
from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks.common import median_time, write_report
from kdrec_jax import ranking
from kdrec_jax.methods import bd

_USERS = flags.DEFINE_integer("users", 256, "Users in the timed chunk.")
_ITEMS = flags.DEFINE_integer("items", 25181, "Items.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per row.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON report here too.")


def main(argv):
  del argv
  c, n = _USERS.value, _ITEMS.value
  u = jax.random.normal(jax.random.key(0), (c, 50))
  items = jax.random.normal(jax.random.key(1), (n, 50))
  exclude = jax.random.uniform(jax.random.key(2), (c, n)) < 0.001
  scores = u @ items.T
  rank_t, rank_s = ranking.ranks(scores, exclude), ranking.ranks(-scores, exclude)
  weights = bd.discrepancy_weights(rank_t, rank_s, 1e-2, 1e-4)[0]
  parts = {
      "scores": (lambda a, b: a @ b.T, u, items),
      "exact_ranks": (ranking.ranks, scores, exclude),
      "histogram_ranks_8192": (lambda s, e: ranking.histogram_ranks(s, e, 8192)[0], scores,
                               exclude),
      "bd_weights": (lambda a, b: bd.discrepancy_weights(a, b, 1e-2, 1e-4), rank_t, rank_s),
      "cdf_table": (ranking.weights_cdf, weights),
      "cumsum_only": (lambda w: jnp.cumsum(w, axis=-1), weights),
  }
  rows = {"users_timed": c, "scale_to_users": 5219}
  with ranking.x64():
    for name, (fn, *args) in parts.items():
      f = jax.jit(fn)
      rows[name + "_s_per_5219_users"] = median_time(lambda: f(*args), _REPEATS.value) * 5219 / c
  write_report(rows, f"{c} users x {n} items", _REPEATS.value, _OUT.value)


if __name__ == "__main__":
  app.run(main)
