r"""A dataset preset (`kdrec_jax.data.presets`) as a config, alone or in place of a training
config's data.

  # the dataset alone, for `launch.data` (config.data + config.eval.popularity_groups):
  python -m launch.data --config configs/data/preset.py:movielens_1m \
      --config.data.path=~/data/ml-1m/ratings.dat

  # any training config with its `data` replaced by the preset's (arg: <preset>,<file>[:<arg>]):
  python -m launch.train \
      --config configs/data/preset.py:foursquare_tky,configs/bd_bpr_citeulike.py \
      --workdir /tmp/bd_tky --config.data.path=~/data/dataset_TSMC2014_TKY.txt

Presets: recbole, movielens_1m, movielens_100k, amazon_ratings, amazon_2018, amazon_2023,
foursquare_nyc, foursquare_tky, gowalla, yelp (docs/DATA.md). The preset's whole `data`
section, split included, replaces the training config's; change any key with
`--config.data.<key>=...`.
"""
import importlib.util
import os

import ml_collections

from kdrec_jax.data import presets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config([arg])` of the config file `path[:arg]` (relative to the working directory or
  to the repository root)."""
  path, colon, arg = spec.partition(":")
  if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO_ROOT, path)):
    path = os.path.join(REPO_ROOT, path)
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  name = os.path.splitext(os.path.basename(path))[0] + "_inner_config"
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if colon else module.get_config()


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  name, _, inner = arg.partition(",")
  if not name:
    raise ValueError(f"config arg: '<preset>[,<config file>[:<arg>]]' with a preset of "
                     f"{', '.join(presets.PRESETS)}")
  data = presets.get(name)
  if not inner:
    return ml_collections.ConfigDict(dict(
        data=data, eval=ml_collections.ConfigDict(dict(popularity_groups=4))))
  config = _load_config(inner)
  config.data = data
  return config
