"""Fault injection for the kill -9 tests: named points in the training loop where a test can
make the process kill itself with SIGKILL, so a kill lands exactly there (mid-epoch, mid-save,
mid-evaluation, mid-write) rather than wherever a timer happens to fire.

Set `KDREC_JAX_KILL_AT=<point>:<n>` in a process's environment to have it SIGKILL itself the
n-th time it reaches `point`. Unset (always, outside those tests) every call is a dict lookup.
"""
from __future__ import annotations

import os
import signal

POINTS = ("epoch", "eval", "checkpoint", "results")
_seen: dict[str, int] = {}


def point(name: str) -> None:
  """Marks `name` reached; dies here if the environment asks for it (see the module doc)."""
  spec = os.environ.get("KDREC_JAX_KILL_AT")
  if not spec:
    return
  target, _, count = spec.partition(":")
  if target != name:
    return
  _seen[name] = _seen.get(name, 0) + 1
  if _seen[name] == int(count or 1):
    os.kill(os.getpid(), signal.SIGKILL)
