"""A live progress line for a training phase (terminal or notebook), and durations as text."""
from __future__ import annotations

import sys
import time

import numpy as np


def duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
  """A live progress line for a phase: rewritten in place on a terminal, an updating line in a
  notebook, nothing when stderr is piped to a file (the log lines say it all there)."""

  def __init__(self, phase: str, total: int, start: int):
    self.phase, self.total, self.start, self.t0 = phase, total, start, time.time()
    self.text, self.handle, self.stream = "", None, sys.stderr
    self.mode = "tty" if getattr(sys.stderr, "isatty", lambda: False)() else None
    if self.mode is None and "ipykernel" in sys.modules:
      try:  # only inside a running kernel (ipykernel may merely be imported)
        from IPython import display, get_ipython
        if getattr(get_ipython(), "kernel", None) is not None:
          self.handle = display.display(display.Pretty(""), display_id=True)
          self.mode = "notebook" if self.handle is not None else None
      except Exception:  # noqa: BLE001 - no display: no progress line
        self.mode = None

  def eta(self, epoch: int) -> float:
    done = epoch - self.start
    return (time.time() - self.t0) / done * (self.total - epoch) if done > 0 else float("nan")

  def update(self, epoch: int, text: str | None = None) -> None:
    if text is not None:
      self.text = text
    if self.mode is None:
      return
    frac = epoch / max(self.total, 1)
    bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
    eta = self.eta(epoch)
    line = (f"[{self.phase}] {bar} {epoch}/{self.total} epochs  {self.text}"
            + (f"  {duration(eta)} left" if np.isfinite(eta) else ""))
    if self.mode == "tty":
      self.stream.write("\r" + line + "\x1b[K")
      self.stream.flush()
    else:
      from IPython import display
      self.handle.update(display.Pretty(line))

  def clear(self) -> None:
    """Before a log line: the terminal's progress line is erased (it is redrawn after)."""
    if self.mode == "tty":
      self.stream.write("\r\x1b[K")
      self.stream.flush()
