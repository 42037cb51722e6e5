r"""Trains a teacher and a student and distils between them, as the config says.

  python -m launch.train --config configs/bd_bpr_citeulike.py:quick --workdir /tmp/bd_quick \
      [--config.distill.epochs=10 ...]

Writes <workdir>/metrics.jsonl, <workdir>/results.json and orbax checkpoints; rerunning the same
command resumes. A Colab cell can call `kdrec_jax.train.train_and_evaluate(config, workdir)`.
"""
import logging as logging_std
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from kdrec_jax import train
from kdrec_jax.data import DataError
from launch.flags_util import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics, results and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])


class _DropLibraryInfo(logging_std.Filter):
  """Keeps third-party INFO chatter (orbax's per-save lines) out of the progress log."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "site-packages" not in record.pathname


def main(argv):
  del argv
  logging.set_stderrthreshold("info")
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (DataError, FileNotFoundError, train.WorkdirError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
