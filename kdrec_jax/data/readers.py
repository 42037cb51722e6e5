"""Readers that turn interaction files into raw `Records` (before filtering and splitting).

Every reader reads plain or gzip-compressed text (detected from the file's magic bytes) and
raises `DataError` naming the file and the 1-based line for malformed input. Formats: CiteULike
`users.dat` (`read_citeulike`), one delimited record per line (`read_delimited`: MovieLens,
Amazon CSVs, Foursquare, Gowalla), RecBole atomic `.inter` files (`read_recbole`), JSON lines
(`read_json_lines`: Yelp reviews) and ready-made splits (`read_splits`).
"""
from __future__ import annotations

import array
import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import os
import tempfile
import urllib.parse
import urllib.request
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from kdrec_jax.data.errors import DataError, PathLike
from kdrec_jax.data.interactions import Interactions

SHIPPED_CITEULIKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "citeulike-t",
                                 "users.dat.gz")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "kdrec_jax")
COLUMN_NAMES = ("user", "item", "rating", "timestamp", "_")
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
JSON_ROLES = ("user", "item", "rating", "timestamp")


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


def _parse_timestamp(path: str, lineno: int, token: str, field: str, fmt: str = "") -> float:
  """Seconds since the epoch from `token`, read as `fmt` says.

  `fmt`: '' = a number (seconds, as in MovieLens and RecBole files); 'iso' = an ISO-8601 date or
  date and time ('2010-10-19T23:55:27Z', '2016-03-09 00:44:42'); anything else = a
  `datetime.strptime` format, e.g. '%a %b %d %H:%M:%S %z %Y' for Foursquare's
  'Tue Apr 03 18:00:09 +0000 2012'. Times without a UTC offset are taken as UTC.
  """
  if not fmt:
    return _parse_float(path, lineno, token, field)
  try:
    if fmt == "iso":
      when = datetime.datetime.fromisoformat(token)
    else:
      when = datetime.datetime.strptime(token, fmt)
  except ValueError:
    what = "an ISO-8601 date/time" if fmt == "iso" else f"a time in the format {fmt!r}"
    raise DataError.at(path, lineno, f"{token!r} is not {what}", field) from None
  if when.tzinfo is None:
    when = when.replace(tzinfo=datetime.timezone.utc)
  return when.timestamp()


class _RecordsBuilder:
  """Collects records line by line; user and item labels are numbered from 0 in order of first
  appearance (the original strings end up in `Records.user_labels` / `item_labels`)."""

  def __init__(self, path: str, with_ratings: bool, with_timestamps: bool):
    self.path = path
    self.with_ratings, self.with_timestamps = with_ratings, with_timestamps
    self.user_ids: dict[str, int] = {}
    self.item_ids: dict[str, int] = {}
    # typed arrays: 8 bytes a record per column (Yelp's reviews are ~7M records)
    self.users, self.items, self.order = array.array("q"), array.array("q"), array.array("q")
    self.ratings, self.stamps = array.array("d"), array.array("d")

  def add(self, lineno: int, user: str, item: str, rating: Optional[float] = None,
          stamp: Optional[float] = None) -> None:
    self.users.append(self.user_ids.setdefault(user, len(self.user_ids)))
    self.items.append(self.item_ids.setdefault(item, len(self.item_ids)))
    self.order.append(lineno)
    if self.with_ratings:
      self.ratings.append(rating)
    if self.with_timestamps:
      self.stamps.append(stamp)

  def build(self) -> Records:
    ints = lambda a: np.frombuffer(a, np.int64).copy()  # noqa: E731
    floats = lambda a: np.frombuffer(a, np.float64).copy()  # noqa: E731
    return Records(
        source=self.path, users=ints(self.users), items=ints(self.items), order=ints(self.order),
        num_users=len(self.user_ids), num_items=len(self.item_ids),
        timestamps=floats(self.stamps) if self.with_timestamps else None,
        ratings=floats(self.ratings) if self.with_ratings else None,
        user_labels=np.asarray(list(self.user_ids), dtype=object),
        item_labels=np.asarray(list(self.item_ids), dtype=object))


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
                   min_rating: Optional[float] = None, timestamp_format: str = "") -> Records:
  """Reads one interaction per line, e.g. MovieLens `user::item::rating::timestamp`.

  Args:
    path: the file (plain or gzip).
    sep: field separator (',', '\\t', '::', ...); None or '' splits on whitespace.
    columns: the name of each field, in order: 'user', 'item', 'rating', 'timestamp', or '_'
      to skip a field; a list or a comma-separated string. Every line needs exactly this many.
    header: skip the first line.
    min_rating: drop records whose rating is below this (needs a 'rating' column).
    timestamp_format: how the timestamp column is written: '' = seconds (a number), 'iso' =
      ISO-8601, or a `datetime.strptime` format (see `_parse_timestamp`).

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
  out = _RecordsBuilder(path, ri is not None, ti is not None)
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
        hint = (" (a RecBole typed header: use format 'recbole')"
                if lineno == 1 and ":token" in line else "")
        raise DataError.at(path, lineno, f"expected {len(cols)} fields ({','.join(cols)}), "
                           f"got {len(fields)}{hint}")
      fields = [x.strip() for x in fields]
      for k, name in ((ui, "user"), (ii, "item")):
        if not fields[k]:
          raise DataError.at(path, lineno, f"empty {name} id", f"field {k + 1} ({name})")
      rating = stamp = None
      if ri is not None:
        rating = _parse_float(path, lineno, fields[ri], f"field {ri + 1} (rating)")
      if ti is not None:
        stamp = _parse_timestamp(path, lineno, fields[ti], f"field {ti + 1} (timestamp)",
                                 timestamp_format)
      if min_rating is not None and rating < min_rating:
        continue
      out.add(lineno, fields[ui], fields[ii], rating, stamp)
  if not seen_data:
    raise DataError(f"{path}: empty file" + (" (only a header)" if header else ""))
  return out.build()


def _recbole_columns(path: str, header: str) -> tuple[int, int, Optional[int], Optional[int], int]:
  """(user, item, rating, timestamp, count) field indices from a RecBole typed header line."""
  typed = []
  for k, field in enumerate(header.split("\t"), 1):
    name, colon, kind = field.strip().rpartition(":")
    if not colon or not name or kind not in RECBOLE_TYPES:
      raise DataError.at(path, 1, f"header field {k} {field!r} is not 'name:type' with a type "
                         f"of {', '.join(RECBOLE_TYPES)} (RecBole atomic files start with a "
                         f"typed, tab-separated header such as 'user_id:token')")
    typed.append((name.lower(), kind))

  def named(name: str, kinds: tuple[str, ...]) -> Optional[int]:
    return next((k for k, (n, t) in enumerate(typed) if n == name and t in kinds), None)

  tokens = [k for k, (_, t) in enumerate(typed) if t == "token"]
  ui, ii = named("user_id", ("token",)), named("item_id", ("token",))
  if ui is None:
    ui = next((k for k in tokens if k != ii), None)
  if ii is None:
    ii = next((k for k in tokens if k != ui), None)
  if ui is None or ii is None:
    raise DataError.at(path, 1, f"header {header!r} needs two token columns (user_id:token and "
                       "item_id:token, or the first two token columns)")
  ri = named("rating", ("float", "token"))
  ti = named("timestamp", ("float", "token"))
  return ui, ii, ri, ti, len(typed)


def read_recbole(path: PathLike, min_rating: Optional[float] = None,
                 timestamp_format: str = "") -> Records:
  """Reads a RecBole atomic interaction file (`.inter`): a typed, tab-separated header, e.g.

      user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float

  then one record per line. Columns may come in any order and extra ones are ignored (as are all
  `token_seq` / `float_seq` ones). The user column is `user_id:token` and the item column
  `item_id:token`, else the first two token columns; `rating` and `timestamp` (float or token)
  are read when present. Ids are any strings (numbered from 0 in order of first appearance, the
  strings kept in `user_labels` / `item_labels`). Blank lines are skipped.

  Args:
    path: the file (plain or gzip).
    min_rating: drop records whose rating is below this (needs a `rating` column).
    timestamp_format: as in `read_delimited`; RecBole writes seconds, the default ''.
  """
  path = os.fspath(path)
  out = None
  seen_data = False
  with open_text(path) as f:
    for lineno, line in _lines(f):
      if out is None:
        if not line.strip():
          raise DataError.at(path, lineno, "empty first line (RecBole atomic files start with "
                             "a typed header such as 'user_id:token')")
        ui, ii, ri, ti, ncols = _recbole_columns(path, line)
        if min_rating is not None and ri is None:
          raise DataError(f"{path}: min_rating={min_rating} needs a 'rating' column (header "
                          f"{line!r})")
        out = _RecordsBuilder(path, ri is not None, ti is not None)
        continue
      if not line.strip():
        continue
      seen_data = True
      fields = line.split("\t")
      if len(fields) != ncols:
        raise DataError.at(path, lineno, f"expected {ncols} tab-separated fields (as in the "
                           f"header), got {len(fields)}")
      fields = [x.strip() for x in fields]
      for k, name in ((ui, "user"), (ii, "item")):
        if not fields[k]:
          raise DataError.at(path, lineno, f"empty {name} id", f"field {k + 1} ({name})")
      rating = stamp = None
      if ri is not None:
        rating = _parse_float(path, lineno, fields[ri], f"field {ri + 1} (rating)")
      if ti is not None:
        stamp = _parse_timestamp(path, lineno, fields[ti], f"field {ti + 1} (timestamp)",
                                 timestamp_format)
      if min_rating is not None and rating < min_rating:
        continue
      out.add(lineno, fields[ui], fields[ii], rating, stamp)
  if out is None:
    raise DataError(f"{path}: empty file")
  if not seen_data:
    raise DataError(f"{path}: no records (only a header)")
  return out.build()


def parse_json_fields(fields: Union[str, Mapping[str, str]]) -> dict[str, str]:
  """{role: JSON key} from 'user=user_id,item=business_id,rating=stars,timestamp=date' or a
  mapping; roles are user, item (both required), rating and timestamp."""
  if isinstance(fields, str):
    pairs = {}
    for part in (p.strip() for p in fields.split(",") if p.strip()):
      role, eq, key = part.partition("=")
      if not eq or not role.strip() or not key.strip():
        raise ValueError(f"json_fields: {part!r} is not 'role=key' (e.g. 'user=user_id')")
      if role.strip() in pairs:
        raise ValueError(f"json_fields: role {role.strip()!r} is given more than once")
      pairs[role.strip()] = key.strip()
    fields = pairs
  out = {str(r).strip().lower(): str(k) for r, k in dict(fields).items()}
  for role in out:
    if role not in JSON_ROLES:
      raise ValueError(f"json_fields: unknown role {role!r}; expected {', '.join(JSON_ROLES)}")
  if "user" not in out or "item" not in out:
    raise ValueError(f"json_fields must name the 'user' and 'item' keys, got {out}")
  return out


def _json_value(path: str, lineno: int, obj: dict, key: str, role: str) -> Any:
  if key not in obj:
    raise DataError.at(path, lineno, f"no key {key!r} ({role})")
  return obj[key]


def _json_id(path: str, lineno: int, obj: dict, key: str, role: str) -> str:
  value = _json_value(path, lineno, obj, key, role)
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise DataError.at(path, lineno, f"{value!r} is not a string or integer id",
                       f"key {key!r} ({role})")
  value = str(value).strip()
  if not value:
    raise DataError.at(path, lineno, f"empty {role} id", f"key {key!r} ({role})")
  return value


def _json_number(path: str, lineno: int, obj: dict, key: str, role: str,
                 timestamp_format: Optional[str] = None) -> float:
  """A rating (`timestamp_format` None) or a timestamp: a JSON number, or a string."""
  value = _json_value(path, lineno, obj, key, role)
  field = f"key {key!r} ({role})"
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    if not np.isfinite(value):
      raise DataError.at(path, lineno, f"{value!r} is not a finite number", field)
    return float(value)
  if not isinstance(value, str):
    raise DataError.at(path, lineno, f"{value!r} is not a number or a string", field)
  if timestamp_format is None:
    return _parse_float(path, lineno, value.strip(), field)
  return _parse_timestamp(path, lineno, value.strip(), field, timestamp_format)


def read_json_lines(path: PathLike, fields: Union[str, Mapping[str, str]] = "user=user_id,"
                    "item=item_id", min_rating: Optional[float] = None,
                    timestamp_format: str = "") -> Records:
  """Reads one JSON object per line, e.g. Yelp's `yelp_academic_dataset_review.json`:

      {"review_id": "...", "user_id": "...", "business_id": "...", "stars": 5.0, ...,
       "date": "2016-03-09 00:44:42"}

  Args:
    path: the file (plain or gzip).
    fields: which key holds each role, 'role=key,...' or a mapping (`parse_json_fields`); Yelp:
      'user=user_id,item=business_id,rating=stars,timestamp=date'. Ids are strings or integers;
      ratings numbers or numeric strings; timestamps numbers (seconds) or strings read as
      `timestamp_format` says. Other keys are ignored.
    min_rating: drop records whose rating is below this (needs a 'rating' field).
    timestamp_format: '' (seconds), 'iso' (Yelp's dates) or a `datetime.strptime` format.

  Returns:
    Records as `read_delimited` returns them. Blank lines are skipped.
  """
  path = os.fspath(path)
  roles = parse_json_fields(fields)
  if min_rating is not None and "rating" not in roles:
    raise DataError(f"{path}: min_rating={min_rating} needs a 'rating' field (json_fields "
                    f"{roles})")
  out = _RecordsBuilder(path, "rating" in roles, "timestamp" in roles)
  seen_data = False
  with open_text(path) as f:
    for lineno, line in _lines(f):
      if not line.strip():
        continue
      seen_data = True
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError.at(path, lineno, f"not valid JSON, column {e.colno}: {e.msg}") from None
      if not isinstance(obj, dict):
        raise DataError.at(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
      user = _json_id(path, lineno, obj, roles["user"], "user")
      item = _json_id(path, lineno, obj, roles["item"], "item")
      rating = stamp = None
      if "rating" in roles:
        rating = _json_number(path, lineno, obj, roles["rating"], "rating")
      if "timestamp" in roles:
        stamp = _json_number(path, lineno, obj, roles["timestamp"], "timestamp",
                             timestamp_format)
      if min_rating is not None and rating < min_rating:
        continue
      out.add(lineno, user, item, rating, stamp)
  if not seen_data:
    raise DataError(f"{path}: empty file")
  return out.build()


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
