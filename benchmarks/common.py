"""Timing and reporting helpers shared by the benchmark scripts."""
import datetime
import json
import platform
import statistics
import time

import jax


def median_time(fn, repeats):
  """Median wall seconds of `repeats` calls of `fn` after one untimed (compiling) call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def write_report(rows: dict, data, repeats: int, out: str) -> None:
  """Prints the rows as JSON with date, jax version and hardware (and writes them to `out`)."""
  report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__, "backend": jax.default_backend(),
      "devices": [d.device_kind for d in jax.devices()],
      "host": platform.processor() or platform.machine(), "repeats": repeats,
      "data": repr(data), "seconds": rows,
  }
  text = json.dumps(report, indent=2)
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")

