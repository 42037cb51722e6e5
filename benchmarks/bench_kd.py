r"""Times each teacher->student method's pieces on the RCE-KD protocol (CiteULike-t, MF 400 -> 20,
batch 2048, 49 steps per epoch).

  python -m benchmarks.bench_kd [--methods none,cd,...] [--repeats 3] \
      [--lightgcn] [--out results/bench/kd_cpu.json]

Rows per method: one distillation epoch (the train steps: sampling, both losses, the student's
(and the method's) update), one refresh (the per-epoch state: CD's pool and draws, RRD's
interesting/uninteresting sets, DCD's re-ranking and draws), the one-off prepare (the teacher's
top-M lists) and one validation evaluation of the student (done every epoch by the protocol),
and validation and test in one pass (`metrics.evaluate_splits`, what KDs does every epoch);
`per_epoch` = epoch + refresh (when the method refreshes every epoch) + evaluation. Plus the
teacher's own warm-up epoch and evaluation. Each row is the median of `repeats` timed calls
after one untimed (compiling) call. Prints JSON with hardware and date.
"""
import json

from absl import app
from absl import flags
import jax

from benchmarks.common import median_time, write_report
from configs import kd_citeulike
from kdrec_jax import metrics, train

_METHODS = flags.DEFINE_list("methods", [m for m in kd_citeulike.METHODS if m != "teacher"],
                             "Methods to time (configs/kd_citeulike.py arguments).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per row.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON report here too.")
_LIGHTGCN = flags.DEFINE_bool("lightgcn", False, "The LightGCN -> LightGCN settings (teacher d "
                              "2000, 3 layers; student d 20): configs/kd_citeulike.py ',lightgcn'.")


def _time_phase(exp, phase, repeats):
  """(epoch seconds, refresh seconds or None, prepare seconds or None) for `phase`."""
  program = train.build_phase(exp, phase)
  phase = program.phase
  state = program.initial_state()
  times = {}
  if phase.distill:
    frozen = {"teacher": state.params["teacher"]}
    times["prepare"] = median_time(lambda: exp.prepare(frozen), 1)
    if program.uses_refresh:
      times["refresh"] = median_time(
          lambda: program.refresh(state, jax.random.key(0), 0)[0].cache, repeats)
      state, _ = program.refresh(state, jax.random.key(0), 0)
  holder, counter = {"state": program.replicate(state)}, iter(range(10**6))

  def run():
    holder["state"], m = program.run_epoch(holder["state"], jax.random.key(next(counter)), 1)
    return holder["state"].step, m

  times["epoch"] = median_time(run, repeats)
  times["steps_per_epoch"] = program.steps
  learner = "student" if "student" in phase.train else "teacher"
  ev = exp.evaluators["val"]
  times[f"eval_val_{learner}"] = median_time(
      lambda: ev(exp.models[learner].score_all, holder["state"].params[learner]), repeats)
  both = {s: exp.evaluators[s] for s in ("val", "test")}  # KDs evaluates both every epoch
  times[f"eval_val_test_{learner}"] = median_time(
      lambda: metrics.evaluate_splits(both, exp.models[learner].score_all,
                                      holder["state"].params[learner]), repeats)
  times["per_epoch"] = (times["epoch"] + times[f"eval_val_{learner}"]
                        + (times.get("refresh", 0.0) if exp.method.refresh_every == 1 else 0.0))
  return times


def main(argv):
  del argv
  rows = {}
  for name in ["teacher", *_METHODS.value]:
    cfg = kd_citeulike.get_config(name + (",lightgcn" if _LIGHTGCN.value else ""))
    exp = train.Experiment(cfg)
    rows[name] = _time_phase(exp, "warmup" if name == "teacher" else "distill",
                             _REPEATS.value)
    print(name, json.dumps(rows[name]), flush=True)
  write_report(rows, exp.data, _REPEATS.value, _OUT.value)


if __name__ == "__main__":
  app.run(main)
