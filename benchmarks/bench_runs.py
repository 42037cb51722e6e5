r"""Seeds as one vmapped program against the same seeds one after another: wall time and peak
memory of the distillation phase of `configs/kd_citeulike.py:<method>` on CiteULike-t.

  python -m benchmarks.bench_runs --method rrd --epochs 5 --runs 1,3,5 --out results/bench/runs.json

For every N: one process trains N seeds as one program (`kdrec_jax.runs`: N students, one shared
frozen teacher) for `--epochs` epochs, each with its refresh and a validation evaluation of every
run, and another process trains the N seeds one after another in one process (the programs
compiled once and reused, so that row is N times a single run without N compilations). Wall
seconds exclude compilation (the first epoch is untimed) and peak memory is the process's
maximum resident set (CPU) or the device's peak bytes in use (GPU). The teacher is a fresh
init: the timings do not depend on what it ranks.

  python -m benchmarks.bench_runs --method rrd --epochs 5 --runs 3 --live 1

With `--live K`: the vmapped program of each N with only K runs live (the others stopped early:
`RunsProgram.live`, their epochs, refreshes and evaluations skipped), against the vmapped
programs of K and of N runs, all live.
"""
import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

_METHOD = flags.DEFINE_string("method", "rrd", "configs/kd_citeulike.py argument.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Timed epochs (after one untimed compiling epoch).")
_RUNS = flags.DEFINE_list("runs", ["1", "3", "5"], "Numbers of seeds.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON report here too.")
_LIVE = flags.DEFINE_integer("live", 0, "If > 0: N vmapped runs of which this many are live "
                             "(the rest stopped early), against K and N vmapped runs, all live.")
_CHILD = flags.DEFINE_string("child", "", "Internal: 'vmap:N', 'loop:N' or 'vmap:N:K'.")


def _peak_mb() -> float:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, n: int, live: int) -> dict:
  import jax
  from configs import kd_citeulike
  from kdrec_jax import runs, train
  cfg = kd_citeulike.get_config(_METHOD.value)
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  teacher = exp.models["teacher"].init(jax.random.key(0))

  def timed(step_epoch, state):
    state = step_epoch(state, 0)  # compiles
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for e in range(1, _EPOCHS.value + 1):
      state = step_epoch(state, e)
    jax.block_until_ready(state)
    return time.perf_counter() - t0

  if mode == "vmap":
    keys = runs.keys_for(range(n))
    hp = {k: jax.numpy.full((n,), v, jax.numpy.float32) for k, v in exp.method.hparams.items()}
    prog = runs.RunsProgram(program, keys, hp, shared={"teacher"})
    state = prog.replicate(prog.initial_state({"teacher": teacher}))
    prog.live = np.arange(n) < live

    def one(state, e):
      if prog.uses_refresh:
        state, _ = prog.refresh(state, runs._vmap_fold_in(keys, 1 << 30), e)
        state = prog.replicate(state)
      state, _ = prog.run_epoch(state, runs._vmap_fold_in(keys, e), e)
      for r in range(live):
        exp.evaluate(prog.params_of(state, r), splits=("val",), models=("student",))
      return state
    seconds = timed(one, state)
  else:
    state0 = program.initial_state({"teacher": teacher})
    seconds = 0.0
    for r in range(n):
      key = jax.random.key(r)

      def one(state, e, key=key):
        if program.uses_refresh:
          state, _ = program.refresh(state, jax.random.fold_in(key, 1 << 30), e)
          state = program.replicate(state)
        state, _ = program.run_epoch(state, jax.random.fold_in(key, e), e)
        exp.evaluate(state.params, splits=("val",), models=("student",))
        return state
      seconds += timed(one, program.replicate(jax.tree.map(jax.numpy.copy, state0)))
  return {"mode": mode, "runs": n, "live": live, "seconds": seconds,
          "seconds_per_epoch": seconds / _EPOCHS.value, "peak_mb": _peak_mb()}


def main(argv):
  del argv
  if _CHILD.value:
    mode, n, *live = _CHILD.value.split(":")
    print("RESULT " + json.dumps(_child(mode, int(n), int((live or [n])[0]))), flush=True)
    return
  rows = []
  k = _LIVE.value
  children = ([f"vmap:{k}"] + [f"vmap:{n}{x}" for n in _RUNS.value for x in (f":{k}", "")] if k else
              [f"{mode}:{n}" for n in _RUNS.value for mode in ("vmap", "loop")])
  for child in children:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_runs",
                           f"--method={_METHOD.value}", f"--epochs={_EPOCHS.value}",
                           f"--child={child}"], capture_output=True, text=True,
                          env=dict(os.environ))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
      raise SystemExit(f"{child} failed:\n{proc.stderr[-3000:]}")
    rows.append(json.loads(line[-1][len("RESULT "):]))
    print(json.dumps(rows[-1]), flush=True)
  import jax
  report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
            "cpus": os.cpu_count(), "method": _METHOD.value, "epochs": _EPOCHS.value, "live": k,
            "rows": rows}
  print(json.dumps(report, indent=2))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
