r"""Times the pieces of the BD schedule on CiteULike at the reference sizes (T 50 / S 5, batch 128).

  python -m benchmarks.bench_bd [--config configs/bd_bpr_citeulike.py] [--repeats 5] \
      [--out results/bench/cpu.json]

Rows: one warm-up epoch (teacher and student together, as the schedule runs them), one BD epoch,
one rank refresh of both models (ranks of all unobserved items + sampling tables), one
full-ranking evaluation of all users (test split, one model). Each is the median of `repeats`
timed calls after one untimed call (compilation). Prints JSON with hardware and date.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks.common import median_time, write_report
from kdrec_jax import step as kstep
from kdrec_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bd_bpr_citeulike.py",
                                          "Config file.", lock_config=False)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions per row.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON report here too.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  exp = train.Experiment(cfg)
  rows = {}
  for name, phase in (("warmup_epoch", kstep.Phase("warmup", train.MODELS, False)),
                      ("bd_epoch", "distill")):
    program = train.build_phase(exp, phase)
    state = program.initial_state()
    if program.uses_refresh:
      state, _ = program.refresh(state, jax.random.key(0), 0)
    holder, counter = {"state": program.replicate(state)}, iter(range(10**6))

    def run():
      holder["state"], m = program.run_epoch(holder["state"], jax.random.key(next(counter)))
      return holder["state"].step, m

    rows[name] = median_time(run, _REPEATS.value)
    rows["steps_per_epoch"] = program.steps
    if program.phase.distill:
      state = holder["state"]
      rows["rank_refresh_both_models"] = median_time(
          lambda: program.refresh(state, jax.random.key(0), 0)[0].cache, _REPEATS.value)
      ev = exp.evaluators["test"]
      rows["full_eval_teacher_all_users"] = median_time(
          lambda: ev(exp.models["teacher"].score_all, state.params["teacher"]), _REPEATS.value)
      rows["full_eval_student_all_users"] = median_time(
          lambda: ev(exp.models["student"].score_all, state.params["student"]), _REPEATS.value)
  w, b, r = rows["warmup_epoch"], rows["bd_epoch"], rows["rank_refresh_both_models"]
  n_refresh = -(-cfg.distill.epochs // max(cfg.method.refresh_every, 1))
  rows["schedule_estimate_s"] = (cfg.warmup.epochs * w + cfg.distill.epochs * b + n_refresh * r)
  write_report(rows, exp.data, _REPEATS.value, _OUT.value)


if __name__ == "__main__":
  app.run(main)
