"""The one exception raised for bad or missing input data."""
from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


def location(path: PathLike, line: Optional[int] = None, field: Optional[str] = None) -> str:
  """Formats `path`, `path:line` or `path:line: field` for error messages (1-based line)."""
  out = os.fspath(path)
  if line is not None:
    out = f"{out}:{line}"
  if field:
    out = f"{out}: {field}"
  return out


class DataError(ValueError):
  """Bad, missing or unusable input data; the message names the file (and line when known)."""

  @classmethod
  def at(cls, path: PathLike, line: Optional[int], msg: str,
         field: Optional[str] = None) -> "DataError":
    """Builds `DataError(f"{path}:{line}: {msg}")`, optionally naming the field."""
    return cls(f"{location(path, line, field)}: {msg}")
