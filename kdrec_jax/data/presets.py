"""Data configs for the dumps people usually download, as functions returning a `data` ConfigDict.

Each preset says how its file is written (format, separator, column order, header, timestamp)
and picks a protocol (rating threshold, minimum counts, split); every key can be changed with
keyword arguments here or `--config.data.<key>=...` on the command line. docs/DATA.md lists
them with one command each.

  from kdrec_jax import data
  cfg = data.presets.movielens_1m("~/data/ml-1m/ratings.dat")
  inter = data.load(cfg)

On the command line, `configs/data/preset.py:<name>` is a config with the preset as its `data`
(for `python -m launch.data`), and `configs/data/preset.py:<name>,<config file>[:<arg>]` is that
training config with its `data` replaced by the preset's (for `python -m launch.train`).
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections

from kdrec_jax.data.config import data_config

# Foursquare's utcTimestamp, e.g. 'Tue Apr 03 18:00:09 +0000 2012'.
FOURSQUARE_TIME = "%a %b %d %H:%M:%S %z %Y"


def _preset(path: str, defaults: dict, overrides: dict) -> ml_collections.ConfigDict:
  return data_config(**{**defaults, "path": path, **overrides})


def recbole(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """A RecBole atomic interaction file (`.inter`, e.g. `ml-100k.inter`, `ml-1m.inter`).

  File: a typed tab-separated header (`user_id:token  item_id:token  rating:float
  timestamp:float`, any order, extra columns ignored), then one record per line; ids are strings.
  Protocol: every record is an interaction, users with >= 5 of them, leave-one-out by time
  (latest -> test, the one before -> val; needs a `timestamp` column, else set
  `loo_order='file'`). The name comes from the file (`ml-100k.inter` -> 'ml-100k').
  """
  return _preset(path, dict(format="recbole", min_user_interactions=5, loo_order="timestamp"),
                 overrides)


def movielens_1m(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """MovieLens `ratings.dat` (ML-1M; ML-10M has the same layout): `user::item::rating::timestamp`,
  no header, timestamps in seconds.

  Protocol (the usual implicit-feedback one, e.g. NCF's): every rating is an interaction
  (`min_rating=4` keeps only 4 and 5 stars), users with >= 5 ratings (every ML-1M user has
  >= 20), leave-one-out by time. For RecBole's `ml-1m.inter` add `format='recbole'`.
  """
  return _preset(path, dict(
      name="ml-1m", format="delimited", sep="::", columns="user,item,rating,timestamp",
      header=False, min_user_interactions=5, loo_order="timestamp"), overrides)


def movielens_100k(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """MovieLens-100K `u.data`: `user<TAB>item<TAB>rating<TAB>timestamp`, no header.

  Protocol as `movielens_1m` (every user of ML-100K has >= 20 ratings). For RecBole's
  `ml-100k.inter` add `format='recbole'`.
  """
  return _preset(path, dict(
      name="ml-100k", format="delimited", sep="\t", columns="user,item,rating,timestamp",
      header=False, min_user_interactions=5, loo_order="timestamp"), overrides)


def amazon_ratings(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """Amazon 2014 "ratings only" CSVs (e.g. `ratings_Books.csv`, `ratings_Beauty.csv`):
  `user,item,rating,timestamp`, no header, timestamps in seconds (2018: `amazon_2018`, 2023:
  `amazon_2023`).

  Protocol: every rating is an interaction (`min_rating=4` for 4-5 stars only), the 5-core
  (users and items with >= 5 interactions, repeated until it holds), leave-one-out by time. The
  name comes from the file.
  """
  return _preset(path, dict(
      format="delimited", sep=",", columns="user,item,rating,timestamp", header=False,
      min_user_interactions=5, min_item_interactions=5, kcore=True, loo_order="timestamp"),
      overrides)


def amazon_2018(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """Amazon 2018 "ratings only" CSVs (e.g. `Books.csv`): `item,user,rating,timestamp` (the item
  first), no header; the protocol of `amazon_ratings`."""
  return amazon_ratings(path, **{"columns": "item,user,rating,timestamp", **overrides})


def amazon_2023(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """Amazon Reviews 2023 rating files (e.g. `Books.csv` of `rating_only/`): a header line
  `user_id,parent_asin,rating,timestamp`, timestamps in milliseconds (only their order is
  used); the protocol of `amazon_ratings` (its 5-core files are already 5-cores)."""
  return amazon_ratings(path, **{"header": True, **overrides})


def _foursquare(name: str, path: str, overrides: dict) -> ml_collections.ConfigDict:
  return _preset(path, dict(
      name=name, format="delimited", sep="\t", columns="user,item,_,_,_,_,_,timestamp",
      header=False, timestamp_format=FOURSQUARE_TIME, repeats="last", count_repeats=True,
      min_user_interactions=6, min_item_interactions=0, loo_order="timestamp"), overrides)


def foursquare_nyc(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """Foursquare TSMC2014 New York check-ins, `dataset_TSMC2014_NYC.txt`.

  File: tab-separated, no header: userId, venueId, venueCategoryId, venueCategory, latitude,
  longitude, timezoneOffset, utcTimestamp ('Tue Apr 03 18:00:09 +0000 2012'); userId is the
  user and venueId (a hex string) the item. The file is Latin-1; only the ids and times are used.
  Protocol (the BD paper's data notebook, with its row-order assumption made explicit): users
  with > 5 check-in rows, repeat check-ins counted (`count_repeats`); the notebook then keeps
  repeats as rows, but a user's items here are a set, so each (user, venue) becomes one
  interaction at its last check-in (`repeats='last'`); leave-one-out by time, sorted stably by
  (user, time) whatever the file's row order: the venue of each user's last check-in is the test
  item, the venue of the last check-in elsewhere before it the validation item.
  """
  return _foursquare("foursquare-nyc", path, overrides)


def foursquare_tky(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """Foursquare TSMC2014 Tokyo check-ins, `dataset_TSMC2014_TKY.txt` (the BD paper's
  Foursquare): the layout and protocol of `foursquare_nyc`."""
  return _foursquare("foursquare-tky", path, overrides)


def gowalla(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """Gowalla check-ins from SNAP, `loc-gowalla_totalCheckins.txt(.gz)`.

  File: tab-separated, no header: user, check-in time (ISO-8601, '2010-10-19T23:55:27Z'),
  latitude, longitude, location id.
  Protocol: one interaction per (user, location) at its last check-in, the 10-core on those
  (users and locations with >= 10, repeated until it holds, as in NGCF / LightGCN), leave-one-out
  by time. NGCF and LightGCN then split each user's items 80/20 at random instead:
  `split='ratio', val_ratio=0.0, test_ratio=0.2, ratio_order='random'`.
  """
  return _preset(path, dict(
      name="gowalla", format="delimited", sep="\t", columns="user,timestamp,_,_,item",
      header=False, timestamp_format="iso", repeats="last", min_user_interactions=10,
      min_item_interactions=10, kcore=True, loo_order="timestamp"), overrides)


def yelp(path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """Yelp reviews, `yelp_academic_dataset_review.json` of the Yelp Open Dataset.

  File: one JSON object per line with (among others) user_id, business_id, stars and date
  ('2016-03-09 00:44:42').
  Protocol: reviews with >= 4 stars are interactions, the 10-core (users and businesses with
  >= 10, repeated until it holds), leave-one-out by time.
  """
  return _preset(path, dict(
      name="yelp", format="jsonl",
      json_fields="user=user_id,item=business_id,rating=stars,timestamp=date",
      timestamp_format="iso", min_rating=4.0, min_user_interactions=10,
      min_item_interactions=10, kcore=True, loo_order="timestamp"), overrides)


PRESETS: dict[str, Callable[..., ml_collections.ConfigDict]] = {
    "recbole": recbole,
    "movielens_1m": movielens_1m,
    "movielens_100k": movielens_100k,
    "amazon_ratings": amazon_ratings,
    "amazon_2018": amazon_2018,
    "amazon_2023": amazon_2023,
    "foursquare_nyc": foursquare_nyc,
    "foursquare_tky": foursquare_tky,
    "gowalla": gowalla,
    "yelp": yelp,
}


def get(name: str, path: str = "", **overrides: Any) -> ml_collections.ConfigDict:
  """The preset called `name` (a key of `PRESETS`) on `path`, with `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"unknown data preset {name!r}; expected one of {', '.join(PRESETS)}")
  return PRESETS[name](path, **overrides)
