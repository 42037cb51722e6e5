r"""Fingerprints of every `:quick` config: the final metrics of each phase (timings dropped), to
show that a change keeps the numbers.

  python -m benchmarks.quick_fingerprints run OUT.json [SUBSTRING ...]
  python -m benchmarks.quick_fingerprints compare BEFORE.json AFTER.json

`run` trains each `:quick` config in a temporary workdir (`python -m launch.train`) and writes
{config argument: results.json's phases} to OUT (configs already in OUT are skipped unless
SUBSTRINGs select them; ~40 min on a 2-core CPU). `compare` prints, per config of BEFORE, how
many values it compares with AFTER and which differ; configs renamed since (the switch rows that
keep an earlier default) are looked up under their new names. The recorded fingerprints are in
`results/bench/quick_check/`.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

CONFIGS = (
    ["configs/bd_bpr_citeulike.py:quick", "configs/bd_cdae_citeulike.py:quick",
     "configs/bd_lightgcn_citeulike.py:quick", "configs/bd_neumf_citeulike.py:quick"]
    + [f"configs/ibd_citeulike.py:bpr,{a},quick"
       for a in ("b05", "b1", "b2", "strict", "random")]
    + ["configs/ibd_citeulike.py:cdae,quick", "configs/ibd_citeulike.py:neumf,quick"]
    + [f"configs/kd_citeulike.py:{m},quick"
       for m in ("teacher", "none", "cd", "cd_teacher_redraw", "rd_renorm", "de", "rrd",
                 "de_rrd", "dcd_kds", "ftd", "htd", "unkd_intended", "cd_teacher", "rd", "dcd",
                 "unkd", "rce_kd", "hetcomp")]
    + [f"configs/td_citeulike.py:{m},quick" for m in ("teacher", "none", "ftd", "htd")]
    + [f"configs/unkd_protocol.py:citeulike,{m},quick"
       for m in ("teacher", "none", "unkd,pair_swap=intended", "cd", "rrd", "unkd")])
# Arms whose earlier default became a switch row: old argument fragment -> new.
RENAMED = {"kd_citeulike.py:dcd,": "kd_citeulike.py:dcd_kds,",
           "kd_citeulike.py:rd,": "kd_citeulike.py:rd_renorm,",
           "kd_citeulike.py:cd_teacher,": "kd_citeulike.py:cd_teacher_redraw,",
           "kd_citeulike.py:unkd,": "kd_citeulike.py:unkd_intended,",
           "unkd_protocol.py:citeulike,unkd,":
               "unkd_protocol.py:citeulike,unkd,pair_swap=intended,"}
TIMINGS = {"seconds", "wall_seconds"}


def _without_timings(x):
  if isinstance(x, dict):
    return {k: _without_timings(v) for k, v in x.items() if k not in TIMINGS}
  return x


def run(out_path: str, only: list[str]) -> None:
  out = json.load(open(out_path)) if os.path.exists(out_path) else {}
  for arg in CONFIGS:
    if (only and not any(o in arg for o in only)) or (arg in out and not only):
      continue
    with tempfile.TemporaryDirectory() as workdir:
      start = time.time()
      proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", arg, "--workdir",
                             workdir], capture_output=True, text=True)
      if proc.returncode:
        print(f"FAILED {arg}:\n{proc.stderr[-2000:]}", flush=True)
        continue
      with open(os.path.join(workdir, "results.json")) as f:
        out[arg] = _without_timings(json.load(f)["phases"])
      print(f"{arg}: {time.time() - start:.0f} s", flush=True)
    with open(out_path, "w") as f:
      json.dump(out, f, indent=1, sort_keys=True)


def _flat(x, prefix=""):
  if isinstance(x, dict):
    for k, v in x.items():
      yield from _flat(v, f"{prefix}/{k}")
  else:
    yield prefix, x


def compare(before_path: str, after_path: str) -> int:
  """Prints the comparison; returns the number of configs with a differing or missing value."""
  before, after = json.load(open(before_path)), json.load(open(after_path))
  bad = 0
  for arg in before:
    new = arg
    for old_part, new_part in RENAMED.items():
      new = new.replace(old_part, new_part)
    if new not in after:
      print(f"{arg}: not in {after_path}")
      bad += 1
      continue
    # BD's student_beats_teacher is a run-time flag that the redesign moved; not a metric.
    b = {k: v for k, v in _flat(before[arg]) if "student_beats_teacher" not in k}
    a = dict(_flat(after[new]))
    differ = sorted(k for k in b if k in a and a[k] != b[k])
    missing = sorted(k for k in b if k not in a)
    bad += bool(differ or missing)
    print(f"{arg}{' -> ' + new if new != arg else ''}: {len(b) - len(missing)} values compared, "
          f"{len(differ)} differ{': ' + ', '.join(differ[:4]) if differ else ''}"
          f"{f', {len(missing)} missing' if missing else ''}")
  return bad


def main(argv):
  if len(argv) >= 2 and argv[0] == "run":
    run(argv[1], argv[2:])
  elif len(argv) == 3 and argv[0] == "compare":
    compare(argv[1], argv[2])
  else:
    sys.exit(__doc__)


if __name__ == "__main__":
  main(sys.argv[1:])
