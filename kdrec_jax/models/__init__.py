"""Base recommenders. `make(cfg, num_users, num_items, data)` returns a `Model`: pure functions with
the model's sizes (and, for graph models, the training graph) bound, the interface every method and
the train step use. Models: 'bpr_mf', 'neumf', 'lightgcn' (trained on batches of (user, positive)
pairs) and 'cdae' (trained on batches of users)."""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import ranking, sparse
from kdrec_jax.models import bpr_mf, cdae, lightgcn, neumf

NAMES = ("bpr_mf", "neumf", "lightgcn", "cdae")


def _identity(params):
  return params


class Batching(NamedTuple):
  """What one training example is, and everything the train step does that depends on it, so
  the step never asks which kind a model is.

  kind: 'pairs' (a (user, positive) pair) or 'users' (a user with its whole training row).
  examples(data) -> {field: int32 [N]}: one epoch's training examples.
  context(batch, train, num_items) -> {...}: what the examples add to the losses' batch view
    (pairs: 'pos'; users: 'pos_mask' [B, I]).
  split_key(keys [B]) -> (negative-sampling keys [B], forward keys [B] or None).
  negatives(model, keys, ctx, train, num_items): the model's own negatives (pairs: one uniform
    unobserved item per pair [B]; users: `num_negatives` draws per positive as a 0/1 mask).
  outputs(model, params, ctx, keys): what the losses read (pairs: `model.prepare(params)`; users:
    the training-mode logits [B, I]).
  own_loss(model, outputs, ctx, neg): the model's own loss summed over the batch.
  """
  kind: str
  examples: Callable
  context: Callable
  split_key: Callable
  negatives: Callable
  outputs: Callable
  own_loss: Callable

  def __repr__(self) -> str:
    return self.kind


def _pair_examples(data):
  users, items = data.train_pairs()
  return {"user": jnp.asarray(users), "pos": jnp.asarray(items)}


def _user_examples(data):
  """Every user with a training row, once per epoch."""
  users = np.flatnonzero(np.diff(data.split("train")[0])).astype(np.int32)
  return {"user": jnp.asarray(users)}


def _split_keys(keys):
  return tuple(jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0))


PAIRS = Batching(
    kind="pairs", examples=_pair_examples,
    context=lambda batch, train, num_items: {"pos": batch["pos"]},
    split_key=lambda keys: (keys, None),
    negatives=lambda model, keys, ctx, train, num_items: ranking.uniform_negatives(
        keys, ctx["user"], train, num_items),
    outputs=lambda model, params, ctx, keys: model.prepare(params),
    own_loss=lambda model, out, ctx, neg: model.cf_loss(out, ctx["user"], ctx["pos"], neg,
                                                        ctx["weight"]))

USERS = Batching(
    kind="users", examples=_user_examples,
    context=lambda batch, train, num_items: {
        "pos_mask": sparse.row_mask(train, batch["user"], num_items)},
    split_key=_split_keys,
    negatives=lambda model, keys, ctx, train, num_items: ranking.draws_mask(
        keys, (~ctx["pos_mask"]).astype(jnp.float32),
        model.num_negatives * train.row_lengths[ctx["user"]])[0],
    outputs=lambda model, params, ctx, keys: model.forward(params, ctx["user"], keys),
    own_loss=lambda model, out, ctx, neg: model.cf_loss(out, ctx["pos_mask"], neg,
                                                        ctx["weight"]))


class Model(NamedTuple):
  """A base model as a bundle of pure functions.

  init(key) -> params
  score(params, users [B], items [B] or [B, n]) -> scores (logits)
  score_all(params, users [C]) -> [C, num_items]
  representations(params, users, items) -> (user_repr, item_repr)
  batching: what one training example is (a `Batching`: `PAIRS` or `USERS`), and so what the
    train step passes to `cf_loss`:
    'pairs': a (user, positive) pair;
      cf_loss(params, users [B], pos [B], neg [B], weight [B]) -> scalar (one negative per pair)
    'users': a user with its whole training row;
      forward(params, users [B], keys [B]) -> training-mode logits [B, I] (e.g. with dropout),
      cf_loss(logits, pos_mask [B, I], neg_mask [B, I], weight [B]) -> scalar, with
      `num_negatives` sampled negatives per positive in `neg_mask`.
  prepare(params) -> params': done once per train step on the params the losses of a pair batch
    read; every function above gives the same results and gradients on `prepare(params)` as on
    `params` (identity, except LightGCN: the propagated embeddings added, so one propagation
    serves every call).
  Teacher and student of one run share the batching; the distillation methods read the same
  outputs (params, prepared, for 'pairs'; the forward's logits for 'users').
  `batch_l2` (BPR-MF, LightGCN) adds c/2 * sum_b w_b (|e_u|^2 + |e_i|^2 + |e_j|^2) over the
  batch's rows of the layer-0 tables to `cf_loss`, the LightGCN/UnKD code's regulariser (their
  `decay` with a mean loss is c with this library's summed one).
  """
  name: str
  init: Callable[[Any], Any]
  score: Callable
  score_all: Callable
  representations: Callable
  cf_loss: Callable
  batching: Batching = PAIRS
  forward: Optional[Callable] = None
  num_negatives: int = 1
  prepare: Callable = _identity
  # The scale of the model's outputs: 'logits' (the default) or, for a model whose training
  # outputs go through a sigmoid (CDAE), what `probabilities` maps them to.
  probabilities: Optional[Callable] = None


def _with_batch_l2(model: Model, coef: float) -> Model:
  """`model` whose `cf_loss` also pays coef/2 * sum_b w_b (|e_u|^2 + |e_pos|^2 + |e_neg|^2)."""
  if model.batching.kind != "pairs":
    raise ValueError(f"batch_l2: {model.name!r} does not train on (user, item) pairs")

  def cf_loss(params, users, pos, neg, weight):
    sq = lambda table, ids: jnp.sum(jnp.square(params[table][ids]), axis=-1)  # noqa: E731
    reg = jnp.sum(weight * (sq("user", users) + sq("item", pos) + sq("item", neg)))
    return model.cf_loss(params, users, pos, neg, weight) + 0.5 * coef * reg

  return model._replace(cf_loss=cf_loss)


def make(cfg, num_users: int, num_items: int, data=None) -> Model:
  """Builds the model named by `cfg.name` with the sizes in `cfg` (see `_make`), with the
  optional `batch_l2` regulariser (BPR-MF, LightGCN)."""
  model = _make(cfg, num_users, num_items, data)
  coef = float(cfg.get("batch_l2", 0.0) or 0.0)
  if coef:
    if model.name not in ("bpr_mf", "lightgcn"):
      raise ValueError(f"batch_l2 is defined for bpr_mf and lightgcn, not {model.name!r}")
    model = _with_batch_l2(model, coef)
  return model


def _make(cfg, num_users: int, num_items: int, data=None) -> Model:
  """Builds the model named by `cfg.name` (one of `NAMES`) with the sizes in `cfg`.

  bpr_mf: dim, init_std (0.1). neumf: dim, mlp_dim (dim), mlp_layers ((2 dim, dim)), init_std
  (0.01), item_chunk (32). lightgcn: dim, num_layers (2), init_std (0.1); needs `data`.
  cdae: dim (hidden size), dropout (0.5), num_negatives (5 per positive), init_std (1.0, the user
  embedding's); needs `data`.

  `data` (the training `Interactions`) is for models built on the interaction graph.
  """
  if cfg.name == "bpr_mf":
    return Model(
        name="bpr_mf",
        init=functools.partial(bpr_mf.init, num_users=num_users, num_items=num_items,
                               dim=cfg.dim, init_std=cfg.get("init_std", 0.1)),
        score=bpr_mf.score, score_all=bpr_mf.score_all,
        representations=bpr_mf.representations, cf_loss=bpr_mf.cf_loss)
  if cfg.name == "neumf":
    mlp_dim = cfg.get("mlp_dim", cfg.dim)
    layers = tuple(int(n) for n in cfg.get("mlp_layers", (2 * cfg.dim, cfg.dim)))
    return Model(
        name="neumf",
        init=functools.partial(neumf.init, num_users=num_users, num_items=num_items,
                               dim=cfg.dim, mlp_dim=mlp_dim, mlp_layers=layers,
                               init_std=cfg.get("init_std", 0.01)),
        score=neumf.score,
        score_all=functools.partial(neumf.score_all, item_chunk=cfg.get("item_chunk", 32)),
        representations=neumf.representations, cf_loss=neumf.cf_loss)
  if cfg.name == "lightgcn":
    data = _graph_data(cfg, data, num_users, num_items)
    graph = lightgcn.build_graph(*data.split("train"), num_items=num_items)
    bind = lambda f: functools.partial(f, graph=graph,  # noqa: E731
                                       num_layers=int(cfg.get("num_layers", 2)))
    return Model(
        name="lightgcn",
        init=functools.partial(lightgcn.init, num_users=num_users, num_items=num_items,
                               dim=cfg.dim, init_std=cfg.get("init_std", 0.1)),
        score=bind(lightgcn.score), score_all=bind(lightgcn.score_all),
        representations=bind(lightgcn.representations), cf_loss=bind(lightgcn.cf_loss),
        prepare=bind(lightgcn.prepare))
  if cfg.name == "cdae":
    data = _graph_data(cfg, data, num_users, num_items)
    train = sparse.DeviceCSR.from_numpy(*data.split("train"))
    bind = lambda f: functools.partial(f, train=train)  # noqa: E731
    return Model(
        name="cdae",
        init=functools.partial(cdae.init, num_users=num_users, num_items=num_items, dim=cfg.dim,
                               init_std=cfg.get("init_std", 1.0)),
        score=bind(cdae.score), score_all=bind(cdae.score_all),
        representations=bind(cdae.representations), cf_loss=cdae.cf_loss, batching=USERS,
        probabilities=jax.nn.sigmoid,
        forward=functools.partial(cdae.forward, train=train, dropout=cfg.get("dropout", 0.5)),
        num_negatives=int(cfg.get("num_negatives", 5)))
  raise ValueError(f"unknown model {cfg.name!r}; available: {', '.join(NAMES)}")


def _graph_data(cfg, data, num_users: int, num_items: int):
  """`data`, checked: models built on the training interactions need it, with matching sizes."""
  if data is None:
    raise ValueError(f"model {cfg.name!r} needs the training data: make(cfg, num_users, "
                     "num_items, data=interactions)")
  if (data.num_users, data.num_items) != (num_users, num_items):
    raise ValueError(f"{cfg.name}: data has {data.num_users} users x {data.num_items} items, "
                     f"expected {num_users} x {num_items}")
  return data
