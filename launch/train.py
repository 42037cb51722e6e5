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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (default: the "
    "JAX_COORDINATOR_ADDRESS environment variable). Unset: one process.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-host: the number of processes (default: JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-host: this process's index (default: JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def _distributed() -> None:
  """Joins a multi-host run (`jax.distributed.initialize`) when a coordinator is given by flag
  or environment; every process then runs the same command with its own process id."""
  import os
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return
  count = _NUM_PROCESSES.value or os.environ.get("JAX_NUM_PROCESSES")
  index = _PROCESS_ID.value if _PROCESS_ID.value is not None else os.environ.get("JAX_PROCESS_ID")
  if count is None or index is None:
    sys.exit("error: a multi-host run needs --num_processes and --process_id (or "
             "JAX_NUM_PROCESSES and JAX_PROCESS_ID) with the coordinator address")
  import jax
  jax.distributed.initialize(address, num_processes=int(count), process_id=int(index))
  logging.info("Process %d of %d (coordinator %s); %d local of %d devices.", jax.process_index(),
               jax.process_count(), address, jax.local_device_count(), jax.device_count())


class _DropLibraryInfo(logging_std.Filter):
  """Keeps third-party INFO chatter (orbax's per-save lines) out of the progress log."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "site-packages" not in record.pathname


def main(argv):
  del argv
  logging.set_stderrthreshold("info")
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  try:
    _distributed()
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (DataError, FileNotFoundError, train.WorkdirError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
