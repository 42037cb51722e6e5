r"""Where a training epoch's time goes on this machine: the BD config's warm-up and BD epochs timed
whole and with parts taken away, and the compiled epoch's kernel count.

  python -m benchmarks.profile_step [--config configs/bd_bpr_citeulike.py] [--repeats 3] \
      [--out results/bench/profile_cpu.json]

Rows (each the median of `repeats` epochs after one compiling epoch):
- `<phase>_adam`: the epoch as the config runs it (Adam over both models' full tables);
- `<phase>_sgd`: the same epoch with plain SGD (no moment tables): the difference is the cost
  of the dense Adam update over every embedding row at every step;
- `<phase>_no_update`: parameters left unchanged (`optax.set_to_zero`), so the unused gradient
  is compiled away: what sampling and the forward pass cost;
- `empty_scan`: the epoch's `lax.scan` over the same batches with a step that only counts
  (the loop's own overhead);
- `<phase>_kernels`: fusions/custom calls in the compiled epoch's HLO (per-step kernels, about).
"""
import re

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import optax

from benchmarks.common import median_time, write_report
from kdrec_jax import step as kstep
from kdrec_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bd_bpr_citeulike.py",
                                          "Config file.", lock_config=False)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per row.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON report here too.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  exp = train.Experiment(cfg)
  rows = {}
  for name, phase in (("warmup", kstep.Phase("warmup", train.MODELS, False)),
                      ("bd", "distill")):
    adam = train.build_phase(exp, phase).optimizers
    for variant, opts in (("adam", adam),
                          ("sgd", {m: optax.sgd(1e-3) for m in adam}),
                          ("no_update", {m: optax.set_to_zero() for m in adam})):
      program = train.build_phase(exp, phase, optimizers=opts)
      state = program.initial_state()
      if program.uses_refresh:
        state, _ = program.refresh(state, jax.random.key(0), 0)
      holder = {"state": program.replicate(state)}
      if variant == "adam":
        hlo = program.epoch.lower(holder["state"], exp.examples,
                                  jax.random.key(0)).compile().as_text()
        rows[f"{name}_kernels"] = len(re.findall(r"^\s*\S+ = \S+ (?:fusion|custom-call)\(",
                                                 hlo, re.M))
      counter = iter(range(10**6))

      def run():
        holder["state"], m = program.run_epoch(holder["state"], jax.random.key(next(counter)))
        return m

      rows[f"{name}_{variant}"] = median_time(run, _REPEATS.value)
    rows["steps_per_epoch"] = program.steps

  # The scan alone: a step that only counts (the loop and batching overhead).
  empty = train.build_phase(exp, "warmup", wrap_step=lambda step: (
      lambda state, batch, key: (state.replace(step=state.step + 1),
                                 {"examples": jnp.sum(batch["weight"])})))
  holder = {"state": empty.replicate(empty.initial_state())}

  def run_empty():
    holder["state"], m = empty.run_epoch(holder["state"], jax.random.key(0))
    return m

  rows["empty_scan"] = median_time(run_empty, _REPEATS.value)
  write_report(rows, exp.data, _REPEATS.value, _OUT.value)


if __name__ == "__main__":
  app.run(main)
