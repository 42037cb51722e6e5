"""Readers that turn interaction files into raw `Records` (before filtering and splitting).

Every reader reads plain or gzip-compressed text (detected from the file's magic bytes) and
raises `DataError` naming the file and the 1-based line for malformed input.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import os
import tempfile
import urllib.parse
import urllib.request
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from kdrec_jax.data.errors import DataError, PathLike
from kdrec_jax.data.interactions import Interactions

SHIPPED_CITEULIKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "citeulike-t",
                                 "users.dat.gz")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "kdrec_jax")
COLUMN_NAMES = ("user", "item", "rating", "timestamp", "_")


@dataclasses.dataclass(frozen=True, eq=False)
class Records:
  """Raw interactions as parallel arrays, one entry per record.

  `order` is each record's position in the source (file order); `user_labels[u]` and
  `item_labels[i]` give the original id of user `u` / item `i` when the ids were remapped.
  """
  source: str
  users: np.ndarray                       # int64 [N]
  items: np.ndarray                       # int64 [N]
  order: np.ndarray                       # int64 [N], file order
  num_users: int
  num_items: int
  timestamps: Optional[np.ndarray] = None  # float64 [N]
  ratings: Optional[np.ndarray] = None     # float64 [N]
  user_labels: Optional[np.ndarray] = None
  item_labels: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.users)

  def take(self, idx: np.ndarray) -> "Records":
    """The records at `idx` (a boolean mask or index array), ids unchanged."""
    pick = lambda a: None if a is None else a[idx]
    return dataclasses.replace(self, users=self.users[idx], items=self.items[idx],
                               order=self.order[idx], timestamps=pick(self.timestamps),
                               ratings=pick(self.ratings))


def _exists_or_raise(path: PathLike) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise DataError(f"{path}: file {what}")
  return path


@contextlib.contextmanager
def open_text(path: PathLike) -> Iterator[io.TextIOBase]:
  """Opens `path` as text, decompressing gzip transparently; missing file -> DataError."""
  path = _exists_or_raise(path)
  with open(path, "rb") as f:
    magic = f.read(2)
  if magic == b"\x1f\x8b":
    f = gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline=None)
  else:
    f = open(path, "rt", encoding="utf-8", errors="surrogateescape", newline=None)
  try:
    yield f
  except (OSError, EOFError) as e:
    raise DataError(f"{path}: cannot read file: {e}") from e
  finally:
    f.close()


def _lines(f: io.TextIOBase) -> Iterator[tuple[int, str]]:
  """(1-based line number, line without the newline); strips a leading BOM."""
  for lineno, line in enumerate(f, 1):
    if lineno == 1 and line.startswith("\ufeff"):
      line = line[1:]
    yield lineno, line.rstrip("\r\n")


def _parse_int(path: str, lineno: int, token: str, field: str, what: str = "id") -> int:
  """A non-negative decimal integer (no signs other than '-', no underscores)."""
  digits = token[1:] if token.startswith("-") else token
  if not (digits.isascii() and digits.isdigit()):
    raise DataError.at(path, lineno, f"{token!r} is not an integer", field)
  value = int(token)
  if value < 0:
    raise DataError.at(path, lineno, f"negative {what} {value}", field)
  return value


def _parse_float(path: str, lineno: int, token: str, field: str) -> float:
  try:
    value = float(token)
  except ValueError:
    raise DataError.at(path, lineno, f"{token!r} is not a number", field) from None
  if not np.isfinite(value):
    raise DataError.at(path, lineno, f"{token!r} is not a finite number", field)
  return value


def read_citeulike(path: PathLike) -> Records:
  """Reads CiteULike `users.dat`: line k (0-based) is user k, `count item_1 ... item_count`.

  Items keep the order in which they are listed. A user without items must be written as `0`;
  an empty line is an error.
  """
  path = os.fspath(path)
  users, items = [], []
  num_users = 0
  with open_text(path) as f:
    for lineno, line in _lines(f):
      num_users = lineno
      tokens = line.split()
      if not tokens:
        raise DataError.at(path, lineno, "empty line (a user without items is written '0')")
      count = _parse_int(path, lineno, tokens[0], "count", "count")
      ids = [_parse_int(path, lineno, t, f"item {k}") for k, t in enumerate(tokens[1:], 1)]
      if count != len(ids):
        raise DataError.at(path, lineno, f"count {count} does not match {len(ids)} item ids")
      users.extend([lineno - 1] * len(ids))
      items.extend(ids)
  if num_users == 0:
    raise DataError(f"{path}: empty file")
  items_arr = np.asarray(items, np.int64)
  return Records(source=path, users=np.asarray(users, np.int64), items=items_arr,
                 order=np.arange(len(items_arr), dtype=np.int64), num_users=num_users,
                 num_items=int(items_arr.max()) + 1 if len(items_arr) else 0)


def _parse_columns(columns: Union[str, Sequence[str]]) -> tuple[str, ...]:
  if isinstance(columns, str):
    columns = columns.split(",")
  cols = tuple(c.strip().lower() for c in columns)
  for c in cols:
    if c not in COLUMN_NAMES:
      raise ValueError(f"unknown column {c!r}; expected one of {', '.join(COLUMN_NAMES)}")
  for c in ("user", "item", "rating", "timestamp"):
    if cols.count(c) > 1:
      raise ValueError(f"column {c!r} is given more than once in {','.join(cols)}")
  if "user" not in cols or "item" not in cols:
    raise ValueError(f"columns {','.join(cols)} must include 'user' and 'item'")
  return cols


def read_delimited(path: PathLike, sep: Optional[str] = None,
                   columns: Union[str, Sequence[str]] = ("user", "item"), header: bool = False,
                   min_rating: Optional[float] = None) -> Records:
  """Reads one interaction per line, e.g. MovieLens `user::item::rating::timestamp`.

  Args:
    path: the file (plain or gzip).
    sep: field separator (',', '\\t', '::', ...); None or '' splits on whitespace.
    columns: the name of each field, in order: 'user', 'item', 'rating', 'timestamp', or '_'
      to skip a field; a list or a comma-separated string. Every line needs exactly this many.
    header: skip the first line.
    min_rating: drop records whose rating is below this (needs a 'rating' column).

  Returns:
    Records with user/item ids numbered from 0 in order of first appearance; the original
    strings are in `user_labels` / `item_labels`. Blank lines are skipped.
  """
  path = os.fspath(path)
  cols = _parse_columns(columns)
  if min_rating is not None and "rating" not in cols:
    raise DataError(f"{path}: min_rating={min_rating} needs a 'rating' column "
                    f"(columns are {','.join(cols)})")
  sep = sep or None
  ui, ii = cols.index("user"), cols.index("item")
  ri = cols.index("rating") if "rating" in cols else None
  ti = cols.index("timestamp") if "timestamp" in cols else None
  user_ids: dict[str, int] = {}
  item_ids: dict[str, int] = {}
  users, items, ratings, stamps, order = [], [], [], [], []
  seen_data = False
  with open_text(path) as f:
    for lineno, line in _lines(f):
      if header and lineno == 1:
        continue
      if not line.strip():
        continue
      seen_data = True
      fields = line.split(sep)
      if len(fields) != len(cols):
        raise DataError.at(path, lineno, f"expected {len(cols)} fields ({','.join(cols)}), "
                           f"got {len(fields)}")
      fields = [x.strip() for x in fields]
      for k, name in ((ui, "user"), (ii, "item")):
        if not fields[k]:
          raise DataError.at(path, lineno, f"empty {name} id", f"field {k + 1} ({name})")
      rating = None
      if ri is not None:
        rating = _parse_float(path, lineno, fields[ri], f"field {ri + 1} (rating)")
      if ti is not None:
        stamp = _parse_float(path, lineno, fields[ti], f"field {ti + 1} (timestamp)")
      if min_rating is not None and rating < min_rating:
        continue
      users.append(user_ids.setdefault(fields[ui], len(user_ids)))
      items.append(item_ids.setdefault(fields[ii], len(item_ids)))
      order.append(lineno)
      if ri is not None:
        ratings.append(rating)
      if ti is not None:
        stamps.append(stamp)
  if not seen_data:
    raise DataError(f"{path}: empty file" + (" (only a header)" if header else ""))
  return Records(
      source=path, users=np.asarray(users, np.int64), items=np.asarray(items, np.int64),
      order=np.asarray(order, np.int64), num_users=len(user_ids), num_items=len(item_ids),
      timestamps=np.asarray(stamps, np.float64) if ti is not None else None,
      ratings=np.asarray(ratings, np.float64) if ri is not None else None,
      user_labels=np.asarray(list(user_ids), dtype=object),
      item_labels=np.asarray(list(item_ids), dtype=object))


def _read_pairs(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
  """`user item [ignored ...]` integer pairs, whitespace- or comma-separated."""
  path = os.fspath(path)
  users, items = [], []
  with open_text(path) as f:
    for lineno, line in _lines(f):
      if not line.strip():
        continue
      fields = line.split(",") if "," in line else line.split()
      if len(fields) < 2:
        raise DataError.at(path, lineno, f"expected 'user item', got {len(fields)} field(s)")
      users.append(_parse_int(path, lineno, fields[0].strip(), "field 1 (user)"))
      items.append(_parse_int(path, lineno, fields[1].strip(), "field 2 (item)"))
  return np.asarray(users, np.int64), np.asarray(items, np.int64)


def _rows(users: np.ndarray, items: np.ndarray, num_users: int) -> list[np.ndarray]:
  """Per-user arrays of unique item ids."""
  if len(users):
    pairs = np.unique(np.stack([users, items], 1), axis=0)
    users, items = pairs[:, 0], pairs[:, 1]
  bounds = np.searchsorted(users, np.arange(num_users + 1))
  return [items[bounds[u]:bounds[u + 1]] for u in range(num_users)]


def read_splits(train: PathLike, val: PathLike, test: PathLike,
                name: Optional[str] = None) -> Interactions:
  """Reads a ready-made split: three files of `user item` integer pairs.

  Ids are kept as they are (not reindexed); num_users / num_items are the largest id + 1 over
  all three files. Duplicate pairs are dropped. Only the train file must be non-empty.
  """
  paths = [os.fspath(p) for p in (train, val, test)]
  for p in paths:
    _exists_or_raise(p)
  parts = [_read_pairs(p) for p in paths]
  if not len(parts[0][0]):
    raise DataError(f"{paths[0]}: empty file (no training interactions)")
  num_users = max(int(u.max()) + 1 for u, _ in parts if len(u))
  num_items = max(int(i.max()) + 1 for _, i in parts if len(i))
  rows = [_rows(u, i, num_users) for u, i in parts]
  if name is None:
    name = os.path.basename(os.path.dirname(os.path.abspath(paths[0]))) or paths[0]
  return Interactions.from_rows(name, num_items, *rows)


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def download(url: str, sha256: str, cache_dir: PathLike = DEFAULT_CACHE_DIR) -> str:
  """Downloads `url` into `cache_dir` once and returns the local path.

  The file is written to a temporary name in `cache_dir` and renamed into place only when its
  sha256 matches; a cached file with the right hash is reused without downloading.
  """
  sha256 = (sha256 or "").strip().lower()
  if not sha256:
    raise DataError(f"{url}: a sha256 checksum is required to download")
  scheme = urllib.parse.urlparse(url).scheme
  if scheme not in ("http", "https", "file"):
    raise DataError(f"{url}: unsupported URL scheme {scheme!r} (use http or https)")
  cache_dir = os.path.expanduser(os.fspath(cache_dir))
  name = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path)) or "download"
  target = os.path.join(cache_dir, name)
  if os.path.isfile(target) and _sha256_file(target) == sha256:
    return target
  os.makedirs(cache_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
  try:
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
      for block in iter(lambda: response.read(1 << 20), b""):
        h.update(block)
        out.write(block)
    actual = h.hexdigest()
    if actual != sha256:
      raise DataError(f"{url}: sha256 mismatch: expected {sha256}, got {actual}")
    os.replace(tmp, target)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise DataError(f"{url}: download failed: {e}") from e
    raise
  return target
