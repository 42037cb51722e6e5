"""Base recommenders. `make(cfg, num_users, num_items)` returns a `Model`: pure functions with the
model's sizes bound, the interface every method and the train step use."""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

from kdrec_jax.models import bpr_mf


class Model(NamedTuple):
  """A base model as a bundle of pure functions.

  init(key) -> params
  score(params, users [B], items [B] or [B, n]) -> scores (logits)
  score_all(params, users [C]) -> [C, num_items]
  representations(params, users, items) -> (user_repr, item_repr)
  cf_loss(params, users [B], pos [B], neg [B], weight [B]) -> scalar, the model's own loss
  """
  name: str
  init: Callable[[Any], Any]
  score: Callable
  score_all: Callable
  representations: Callable
  cf_loss: Callable


def _bpr_cf_loss(params, users, pos, neg, weight):
  return bpr_mf.bpr_loss(bpr_mf.score(params, users, pos), bpr_mf.score(params, users, neg),
                         weight)


def make(cfg, num_users: int, num_items: int, data=None) -> Model:
  """Builds the model named by `cfg.name` ('bpr_mf') with the sizes in `cfg`.

  `data` (the training `Interactions`) is for models built on the interaction graph.
  """
  if cfg.name == "bpr_mf":
    return Model(
        name="bpr_mf",
        init=functools.partial(bpr_mf.init, num_users=num_users, num_items=num_items,
                               dim=cfg.dim, init_std=cfg.get("init_std", 0.1)),
        score=bpr_mf.score, score_all=bpr_mf.score_all,
        representations=bpr_mf.representations, cf_loss=_bpr_cf_loss)
  raise ValueError(f"unknown model {cfg.name!r}; available: bpr_mf")
