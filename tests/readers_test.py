"""Tests for the dumps people already have: RecBole `.inter` files, JSON lines, timestamps written
as dates, the dataset presets (`kdrec_jax.data.presets`) on fixture files in each dump's own
format (tests/fixtures/data), configs/data/preset.py and `launch.data`."""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import raises_data_error_at as _raises_at

from kdrec_jax import data
from kdrec_jax.data import DataError, presets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "data")


def _fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


def _write(tmp_path: pathlib.Path, name: str, text: str) -> str:
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return str(path)


def _labelled(cfg) -> tuple[data.Interactions, dict]:
  """load(cfg) and, per split, {user label: sorted item labels} (users with items only)."""
  inter = data.load(cfg)
  rec = data.prepare(cfg)
  out = {}
  for split in ("train", "val", "test"):
    indptr, indices = inter.split(split)
    out[split] = {str(rec.user_labels[u]): sorted(str(rec.item_labels[i])
                                                  for i in indices[indptr[u]:indptr[u + 1]])
                  for u in range(inter.num_users) if indptr[u + 1] > indptr[u]}
  return inter, out


def _sizes(inter: data.Interactions) -> tuple[int, int, int, int, int]:
  return (inter.num_users, inter.num_items, inter.num_train, len(inter.val_indices),
          len(inter.test_indices))


# ------------------------------------------------------------------------------ RecBole reader


def test_read_recbole_fixture():
  rec = data.read_recbole(_fixture("ml-100k.inter"))
  assert len(rec) == 13 and (rec.num_users, rec.num_items) == (3, 11)
  assert rec.user_labels.tolist() == ["196", "186", "22"]
  assert rec.items[:3].tolist() == [0, 1, 2] and rec.item_labels[:3].tolist() == [
      "242", "302", "377"]
  assert rec.ratings[:3].tolist() == [3.0, 3.0, 1.0]
  assert rec.timestamps[0] == 881250949.0
  assert rec.order.tolist() == list(range(2, 15))  # 1-based lines after the header


def test_read_recbole_any_order_extra_columns_string_ids(tmp_path):
  text = ("timestamp:float\tgenres:token_seq\trating:float\titem_id:token\tuser_id:token\t"
          "weight:float\n"
          "978300760\tDrama Comedy\t5\tOne Flew Over the Cuckoo's Nest (1975)\t1m_1\t0.5\n"
          "978302109\t\t3\tJames and the Giant Peach (1996)\t1m_1\t1\n"
          "\n"
          "978301968\tMusical\t4\tOne Flew Over the Cuckoo's Nest (1975)\t1m_2\t2\n")
  rec = data.read_recbole(_write(tmp_path, "ml-1m.inter", text))
  assert rec.user_labels.tolist() == ["1m_1", "1m_2"]
  assert rec.item_labels.tolist() == ["One Flew Over the Cuckoo's Nest (1975)",
                                      "James and the Giant Peach (1996)"]
  assert rec.users.tolist() == [0, 0, 1] and rec.items.tolist() == [0, 1, 0]
  assert rec.ratings.tolist() == [5.0, 3.0, 4.0]
  assert rec.timestamps.tolist() == [978300760.0, 978302109.0, 978301968.0]
  assert rec.order.tolist() == [2, 3, 5]
  kept = data.read_recbole(_write(tmp_path, "ml-1m.inter", text), min_rating=4)
  assert kept.order.tolist() == [2, 5]


def test_read_recbole_first_two_token_columns(tmp_path):
  text = "uid:token\tlabel:float\tiid:token\tcomment:token_seq\nu1\t1\ti9\ta b\nu2\t0\ti9\t\n"
  rec = data.read_recbole(_write(tmp_path, "x.inter", text))
  assert rec.user_labels.tolist() == ["u1", "u2"] and rec.item_labels.tolist() == ["i9"]
  assert rec.ratings is None and rec.timestamps is None
  # item_id named, user not: the user is the first other token column
  text = "item_id:token\tsession:token\nA\ts1\nB\ts1\n"
  rec = data.read_recbole(_write(tmp_path, "y.inter", text))
  assert rec.user_labels.tolist() == ["s1"] and rec.item_labels.tolist() == ["A", "B"]


@pytest.mark.parametrize("text,line,fragments", [
    ("user_id\titem_id\n1\t2\n", 1, ("header field 1 'user_id' is not 'name:type'",)),
    ("user_id:token\titem_id:int\n1\t2\n", 1, ("header field 2",)),
    ("user_id:token\trating:float\n1\t2\n", 1, ("needs two token columns",)),
    ("\nuser_id:token\titem_id:token\n", 1, ("empty first line",)),
    ("user_id:token\titem_id:token\trating:float\n1\t2\t3\n1\t2\n", 3,
     ("expected 3 tab-separated fields", "got 2")),
    ("user_id:token\titem_id:token\trating:float\n1\t2\t3\n1\t2\tfive\n", 3,
     ("field 3 (rating): 'five' is not a number",)),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnan\n", 2,
     ("field 3 (timestamp)", "not a finite number")),
    ("user_id:token\titem_id:token\n1\t2\n \t3\n", 3, ("field 1 (user): empty user id",)),
])
def test_read_recbole_bad_input(tmp_path, text, line, fragments):
  path = _write(tmp_path, "bad.inter", text)
  _raises_at(lambda: data.read_recbole(path), "bad.inter", line, *fragments)


def test_read_recbole_empty_and_header_only(tmp_path):
  _raises_at(lambda: data.read_recbole(_write(tmp_path, "e.inter", "")), "e.inter", None,
             "empty file")
  only = _write(tmp_path, "h.inter", "user_id:token\titem_id:token\n")
  _raises_at(lambda: data.read_recbole(only), "h.inter", None, "only a header")
  no_rating = _write(tmp_path, "r.inter", "user_id:token\titem_id:token\n1\t2\n")
  _raises_at(lambda: data.read_recbole(no_rating, min_rating=4), "r.inter", None,
             "needs a 'rating' column")


def test_delimited_hints_at_recbole_header():
  _raises_at(lambda: data.read_delimited(_fixture("ml-100k.inter"), sep="::",
                                         columns="user,item,rating,timestamp"),
             "ml-100k.inter", 1, "use format 'recbole'")


# ------------------------------------------------------------------------ JSON lines reader


YELP_FIELDS = "user=user_id,item=business_id,rating=stars,timestamp=date"


def test_read_json_lines_fixture():
  rec = data.read_json_lines(_fixture("yelp_academic_dataset_review.json"), YELP_FIELDS,
                             timestamp_format="iso")
  assert len(rec) == 10 and (rec.num_users, rec.num_items) == (3, 6)
  assert rec.user_labels[0] == "mh_-eMZ6K5RLWhZyISBhwA"
  assert rec.item_labels[0] == "XQfwVwDr-v0ZS3_CbbE5Xw"
  assert rec.ratings[:4].tolist() == [5.0, 4.0, 4.0, 3.0]
  first = datetime.datetime(2018, 7, 7, 22, 9, 11, tzinfo=datetime.timezone.utc)
  assert rec.timestamps[0] == first.timestamp()
  kept = data.read_json_lines(_fixture("yelp_academic_dataset_review.json"), YELP_FIELDS,
                              min_rating=4, timestamp_format="iso")
  assert kept.order.tolist() == [1, 2, 3, 5, 6, 7, 9, 10]


def test_read_json_lines_ids_numbers_and_mapping(tmp_path):
  text = ('{"u": 7, "i": "a", "r": "4.5", "t": 1700000000}\n\n'
          '{"u": "7", "i": 3, "r": 2, "t": 1700000001.5, "extra": [1, 2]}\n')
  path = _write(tmp_path, "x.jsonl", text)
  rec = data.read_json_lines(path, {"user": "u", "item": "i", "rating": "r", "timestamp": "t"})
  assert rec.user_labels.tolist() == ["7"] and rec.item_labels.tolist() == ["a", "3"]
  assert rec.ratings.tolist() == [4.5, 2.0]
  assert rec.timestamps.tolist() == [1700000000.0, 1700000001.5]
  assert rec.order.tolist() == [1, 3]
  only_ids = data.read_json_lines(path, "user=u,item=i")
  assert only_ids.ratings is None and only_ids.timestamps is None


@pytest.mark.parametrize("text,line,fragments", [
    ('{"user_id": "a", "business_id": "b", "stars": 4, "date": "2012-01-03 15:28:18"}\n'
     '{"user_id": "a", "business_id": "b", "stars": 4,\n', 2, ("not valid JSON",)),
    ('["a", "b"]\n', 1, ("expected a JSON object, got list",)),
    ('{"user_id": "a", "stars": 4, "date": "2012-01-03"}\n', 1,
     ("no key 'business_id' (item)",)),
    ('{"user_id": true, "business_id": "b", "stars": 4, "date": "2012-01-03"}\n', 1,
     ("key 'user_id' (user): True is not a string or integer id",)),
    ('{"user_id": " ", "business_id": "b", "stars": 4, "date": "2012-01-03"}\n', 1,
     ("empty user id",)),
    ('{"user_id": "a", "business_id": "b", "stars": "many", "date": "2012-01-03"}\n', 1,
     ("key 'stars' (rating): 'many' is not a number",)),
    ('{"user_id": "a", "business_id": "b", "stars": null, "date": "2012-01-03"}\n', 1,
     ("None is not a number or a string",)),
    ('\n{"user_id": "a", "business_id": "b", "stars": 4, "date": "03/01/2012"}\n', 2,
     ("key 'date' (timestamp): '03/01/2012' is not an ISO-8601 date/time",)),
])
def test_read_json_lines_bad_input(tmp_path, text, line, fragments):
  path = _write(tmp_path, "reviews.json", text)
  _raises_at(lambda: data.read_json_lines(path, YELP_FIELDS, timestamp_format="iso"),
             "reviews.json", line, *fragments)


def test_json_fields_spec_errors(tmp_path):
  path = _write(tmp_path, "x.jsonl", '{"u": 1, "i": 2}\n')
  for bad in ("user=u", "user=u,item", "user=u,item=i,stars=s", "user=u,user=v,item=i"):
    with pytest.raises(ValueError, match="json_fields"):
      data.read_json_lines(path, bad)
  _raises_at(lambda: data.read_json_lines(path, "user=u,item=i", min_rating=4), "x.jsonl",
             None, "needs a 'rating' field")
  _raises_at(lambda: data.read_json_lines(_write(tmp_path, "e.jsonl", "\n"), "user=u,item=i"),
             "e.jsonl", None, "empty file")


# --------------------------------------------------------------- timestamps written as dates


def test_timestamp_formats(tmp_path):
  path = _write(tmp_path, "t.tsv", "u\ti\tTue Apr 03 18:00:09 +0000 2012\n"
                "u\tj\tWed Apr 04 01:00:09 +0900 2012\n")
  rec = data.read_delimited(path, sep="\t", columns="user,item,timestamp",
                            timestamp_format=presets.FOURSQUARE_TIME)
  assert rec.timestamps.tolist() == [1333476009.0, 1333476009.0 - 2 * 3600]  # 16:00:09 UTC
  iso = _write(tmp_path, "g.tsv", "0\t2010-10-19T23:55:27Z\t1\n0\t2010-10-19 23:55:27\t2\n"
               "0\t2010-10-20T01:55:27+02:00\t3\n")
  rec = data.read_delimited(iso, sep="\t", columns="user,timestamp,item", timestamp_format="iso")
  assert rec.timestamps.tolist() == [1287532527.0] * 3  # no offset = UTC


def test_timestamp_format_errors(tmp_path):
  lines = open(_fixture("dataset_TSMC2014_NYC.txt"), encoding="latin-1").read().splitlines()
  lines[3] = "\t".join(lines[3].split("\t")[:7] + ["2012-04-03 18:00:09"])
  path = tmp_path / "dataset_TSMC2014_NYC.txt"
  path.write_text("\n".join(lines) + "\n", encoding="latin-1")
  _raises_at(lambda: data.load(presets.foursquare_nyc(str(path))), "dataset_TSMC2014_NYC.txt",
             4, "field 8 (timestamp): '2012-04-03 18:00:09' is not a time in the format "
             "'%a %b %d %H:%M:%S %z %Y'")
  iso = _write(tmp_path, "g.txt", "0\t2010-10-19T23:55:27Z\t30.2\t-97.7\t22847\n"
               "0\tyesterday\t30.2\t-97.7\t22847\n")
  _raises_at(lambda: data.load(presets.gowalla(iso)), "g.txt", 2,
             "field 2 (timestamp): 'yesterday' is not an ISO-8601 date/time")


# ------------------------------------------------------------------ presets on the fixtures


def test_movielens_1m_ratings_dat():
  inter, rows = _labelled(presets.movielens_1m(_fixture("ratings.dat")))
  assert inter.name == "ml-1m"
  assert _sizes(inter) == (2, 11, 7, 2, 2)  # user 3 has 4 ratings (< 5)
  assert rows["test"] == {"1": ["2355"], "2": ["1537"]}  # latest by time, not last in file
  assert rows["val"] == {"1": ["1197"], "2": ["647"]}
  only_good = data.load(presets.movielens_1m(_fixture("ratings.dat"), min_rating=4,
                                             min_user_interactions=3))
  assert _sizes(only_good) == (2, 7, 3, 2, 2)  # user 3 keeps 2 ratings of >= 4 stars


def test_movielens_100k_u_data_and_recbole_inter_agree():
  inter, rows = _labelled(presets.movielens_100k(_fixture("u.data")))
  assert inter.name == "ml-100k" and _sizes(inter) == (2, 9, 6, 2, 2)
  assert rows["test"] == {"196": ["393"], "186": ["242"]}
  assert rows["val"] == {"196": ["381"], "186": ["265"]}
  assert rows["train"]["186"] == ["302", "346", "474"]  # the tied timestamps stay in train
  for cfg in (presets.recbole(_fixture("ml-100k.inter")),
              presets.movielens_100k(_fixture("ml-100k.inter"), format="recbole")):
    other, other_rows = _labelled(cfg)
    assert other.name == "ml-100k" and _sizes(other) == _sizes(inter)
    assert other_rows == rows
    for split in ("train", "val", "test"):
      for a, b in zip(inter.split(split), other.split(split)):
        np.testing.assert_array_equal(a, b)


def test_amazon_ratings_5core():
  inter, rows = _labelled(presets.amazon_ratings(_fixture("ratings_Beauty.csv")))
  assert inter.name == "ratings_Beauty"
  assert _sizes(inter) == (5, 5, 15, 5, 5)  # A14VAT5EAX3D9S and B00000DMBU fall out
  assert rows["test"] == {"A2XVJBSRI3SWDI": ["0000589012"], "A1RLQXYNCMWRWN": ["0000589012"],
                          "AAX7M9DKCYHVI": ["0000032034"], "A3SGXH7AUHU8GW": ["0000031895"],
                          "A1D87F6ZCVE5NK": ["0000589012"]}
  assert rows["val"]["AAX7M9DKCYHVI"] == ["0000031909"]


def test_amazon_2018_and_2023_layouts(tmp_path):
  lines = open(_fixture("ratings_Beauty.csv")).read().splitlines()
  swapped = [",".join([f[1], f[0], f[2], f[3]]) for f in (x.split(",") for x in lines)]
  path = _write(tmp_path, "Beauty.csv", "\n".join(swapped) + "\n")
  ms = ["user_id,parent_asin,rating,timestamp"] + [
      ",".join(f[:3] + [str(int(f[3]) * 1000)]) for f in (x.split(",") for x in lines)]
  path23 = _write(tmp_path, "All_Beauty.csv", "\n".join(ms) + "\n")
  _, expected = _labelled(presets.amazon_ratings(_fixture("ratings_Beauty.csv")))
  assert _labelled(presets.amazon_2018(path))[1] == expected
  assert _labelled(presets.amazon_2023(path23))[1] == expected


def test_foursquare_holds_out_last_checkins_by_time(tmp_path):
  cfg = presets.foursquare_nyc(_fixture("dataset_TSMC2014_NYC.txt"))
  inter, rows = _labelled(cfg)
  assert inter.name == "foursquare-nyc"
  # 470 (7 rows, 4 venues) and 1083 (6 rows, 3 venues) have > 5 rows; 69 has 5
  assert _sizes(inter) == (3, 13, 7, 3, 3)
  venue = {k: v for k, v in zip("ABCIJLM", [
      "49bbd6c0f964a520f4531fe3", "4a43c0aef964a520c6a61fe3", "4c5cc7b485a1e21e00d35711",
      "4bd14d5a9854d13a4b5ab4a1", "4d3ddb2d3e7e8cfa0a8b2e4d", "4a99de8ef964a5207f3120e3",
      "4e3a3d5c7d8b4fe7a2a6e3f1"])}
  # 470's last check-in (hour 60) is at A, visited before; the last elsewhere is B (hour 50)
  assert rows["test"] == {"470": [venue["A"]], "979": [venue["J"]], "1083": [venue["M"]]}
  assert rows["val"] == {"470": [venue["B"]], "979": [venue["I"]], "1083": [venue["L"]]}
  # the same file sorted by (user, time) gives the same split
  lines = open(_fixture("dataset_TSMC2014_NYC.txt"), "rb").read().splitlines()
  times = data.read_delimited(_fixture("dataset_TSMC2014_NYC.txt"), sep="\t",
                              columns=cfg.columns, timestamp_format=cfg.timestamp_format)
  order = np.lexsort((times.timestamps, times.users))
  path = tmp_path / "sorted.txt"
  path.write_bytes(b"\n".join(lines[k] for k in order) + b"\n")
  assert _labelled(presets.foursquare_nyc(str(path)))[1] == rows


def test_foursquare_knobs_change_what_is_held_out():
  path = _fixture("dataset_TSMC2014_NYC.txt")
  first = _labelled(presets.foursquare_nyc(path, repeats="first"))[1]
  assert first["test"]["470"] == ["4bc7086715a7ef3bef9878da"]  # D: the last *new* venue
  by_file = _labelled(presets.foursquare_nyc(path, loo_order="file"))[1]
  assert by_file["test"]["470"] == ["4a43c0aef964a520c6a61fe3"]  # B: last in the file
  distinct = data.load(presets.foursquare_nyc(path, count_repeats=False))
  assert distinct.num_users == 1  # only 979 has > 5 distinct venues
  assert presets.foursquare_tky(path).name == "foursquare-tky"


def test_gowalla_newest_first_file():
  inter, rows = _labelled(presets.gowalla(_fixture("loc-gowalla_totalCheckins.txt"),
                                          min_user_interactions=3, min_item_interactions=1,
                                          kcore=False))
  assert inter.name == "gowalla" and _sizes(inter) == (2, 6, 5, 2, 2)
  assert rows["test"] == {"0": ["22847"], "1": ["420315"]}
  assert rows["val"] == {"0": ["420315"], "1": ["16516"]}
  _raises_at(lambda: data.load(presets.gowalla(_fixture("loc-gowalla_totalCheckins.txt"))),
             "loc-gowalla_totalCheckins.txt", None, "no interactions left after filtering",
             "min_user_interactions=10")


def test_yelp_reviews():
  inter, rows = _labelled(presets.yelp(_fixture("yelp_academic_dataset_review.json"),
                                       min_user_interactions=2, min_item_interactions=1,
                                       kcore=False))
  assert inter.name == "yelp" and _sizes(inter) == (2, 4, 3, 2, 2)
  u1, u2 = "mh_-eMZ6K5RLWhZyISBhwA", "OyoGAe7OKpv6SyGZT5g77Q"
  # u1's latest review (2019, 3 stars) is below the threshold: the 2018 one is the test item
  assert rows["test"] == {u1: ["XQfwVwDr-v0ZS3_CbbE5Xw"], u2: ["kxX2SOes4o-D3ZQBkiMRfA"]}
  assert rows["val"] == {u1: ["kxX2SOes4o-D3ZQBkiMRfA"], u2: ["XQfwVwDr-v0ZS3_CbbE5Xw"]}


PRESET_FIXTURES = [
    ("recbole", "ml-100k.inter"), ("movielens_1m", "ratings.dat"),
    ("movielens_100k", "u.data"), ("amazon_ratings", "ratings_Beauty.csv"),
    ("foursquare_nyc", "dataset_TSMC2014_NYC.txt"), ("gowalla", "loc-gowalla_totalCheckins.txt"),
    ("yelp", "yelp_academic_dataset_review.json"),
]


@pytest.mark.parametrize("preset,fname", PRESET_FIXTURES)
def test_preset_malformed_line_names_file_and_line(tmp_path, preset, fname):
  lines = open(_fixture(fname), "rb").read().splitlines()
  lines[2] = b"garbage"
  (tmp_path / fname).write_bytes(b"\n".join(lines) + b"\n")
  _raises_at(lambda: data.load(presets.get(preset, str(tmp_path / fname))), fname, 3)


def test_preset_registry_and_overrides():
  assert set(presets.PRESETS) >= {"recbole", "movielens_1m", "movielens_100k", "amazon_ratings",
                                  "foursquare_nyc", "foursquare_tky", "gowalla", "yelp"}
  cfg = presets.get("yelp", "/x.json", min_rating=3.0)
  assert (cfg.path, cfg.min_rating, cfg.format) == ("/x.json", 3.0, "jsonl")
  with pytest.raises(ValueError, match="unknown data preset"):
    presets.get("netflix")
  with pytest.raises(ValueError, match="unknown data config keys"):
    presets.movielens_1m(min_ratings=4)
  # the optional keys stay out of default_data_config (existing workdirs' config records)
  assert not set(data.OPTIONAL_KEYS) & set(data.default_data_config().keys())


def test_tab_separator_from_the_command_line():
  cfg = presets.movielens_100k(_fixture("u.data"), sep="\\t")  # as --config.data.sep='\t'
  assert _sizes(data.load(cfg)) == (2, 9, 6, 2, 2)


# ------------------------------------------------------- configs/data/preset.py, launch.data


def _preset_config(arg: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "preset_config", os.path.join(REPO_ROOT, "configs", "data", "preset.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_preset_config_file():
  alone = _preset_config("gowalla")
  assert alone.data.format == "delimited" and alone.eval.popularity_groups == 4
  train = _preset_config("foursquare_tky,configs/bd_bpr_citeulike.py:quick")
  assert train.data.name == "foursquare-tky" and train.method.name == "bd"
  assert train.warmup.epochs == 20  # ':quick' reached the training config
  with pytest.raises(ValueError, match="unknown data preset"):
    _preset_config("nope")


def test_statistics_on_fixture():
  from launch import data as launch_data
  inter = data.load(presets.recbole(_fixture("ml-100k.inter")))
  stats = launch_data.statistics(inter, num_groups=2)
  assert stats["name"] == "ml-100k"
  assert (stats["users"], stats["items"], stats["interactions"]) == (2, 9, 10)
  assert stats["density"] == pytest.approx(10 / 18)
  assert (stats["train"], stats["val"], stats["test"]) == (6, 2, 2)
  assert (stats["users_with_train"], stats["users_with_val"], stats["users_with_test"]) == (
      2, 2, 2)
  assert stats["items_without_train"] == 3  # 393, 381 and 265 are only held out
  # val 381 (196), 265 (186): both cold; test 393 (cold), 242 (one training pair, user 196)
  assert (stats["val_cold"], stats["test_cold"]) == (2, 1)
  assert (stats["val_item_popularity"], stats["test_item_popularity"]) == (0.0, 0.5)
  assert stats["per_user"] == dict(min=5, median=5.0, mean=5.0, max=5)
  assert stats["per_item"]["max"] == 2  # 242
  groups = stats["popularity_groups"]
  assert (groups["asked"], groups["made"]) == (2, 2)
  assert [g["items"] for g in groups["groups"]] == [3, 3]
  assert [g["train_interactions"] for g in groups["groups"]] == [3, 3]
  assert [g["share"] for g in groups["groups"]] == [0.5, 0.5]
  assert launch_data.statistics(inter, num_groups=0)["popularity_groups"] is None
  json.dumps(stats)
  text = launch_data.format_statistics(stats)
  assert "users          2" in text and "train 6, val 2, test 2" in text
  assert "2 made (2 asked)" in text
  assert ("cold-item pairs val 2, test 1; items' mean training popularity val 0.0, test 0.5"
          in text)


@pytest.mark.slow
def test_launch_data_run_reports_bad_data_on_one_line(capsys):
  from launch import data as launch_data
  cfg = _preset_config("movielens_1m")
  cfg.data.path = _fixture("ml-100k.inter")  # a RecBole file read as ratings.dat
  assert launch_data.run(cfg) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: ") and "ml-100k.inter:1:" in err
  assert launch_data.num_groups_of(cfg) == 4
  cfg.eval.popularity_groups = 0
  assert launch_data.num_groups_of(cfg) == 0


@pytest.mark.slow
def test_launch_data_command():
  proc = subprocess.run(
      [sys.executable, "-m", "launch.data", "--config", "configs/data/preset.py:foursquare_nyc",
       f"--config.data.path={_fixture('dataset_TSMC2014_NYC.txt')}",
       "--config.eval.popularity_groups=2"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "dataset        foursquare-nyc" in out
  assert "users          3" in out and "items          13" in out
  assert "train 7, val 3, test 3" in out
  assert "popularity groups:" in out
