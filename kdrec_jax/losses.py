"""The distillation losses, one convention for all (as optax's and rax's ranking losses).

Every loss here reads scores on the last axis and takes, by keyword:

  where:     bool mask, broadcastable to the per-entry losses; False entries are excluded
             (they contribute exactly 0 and get zero, finite gradients, whatever their scores,
             -inf included). A row whose entries are all excluded contributes 0.
  weights:   float weights, broadcastable to the per-entry losses, multiplying each entry.
  reduce_fn: how the per-entry losses [..., n] are reduced: `jnp.sum` (the default: this
             library's losses are sums over the batch) or None for the per-entry losses.

Scores are logits (raw model outputs); labels, when a loss has them, are targets in [0, 1].
The listwise loss has no labels: the order to learn is the order of its entries, above a pooled
set given as `pooled`.

    >>> import jax.numpy as jnp
    >>> float(sigmoid_cross_entropy(jnp.array([0.0, 0.0]), jnp.array([1.0, 0.0])))
    1.3862943649291992
    >>> float(log_sigmoid_loss(jnp.array([0.0, 5.0]), where=jnp.array([True, False])))
    0.6931471824645996
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

Reduce = Optional[Callable[[jax.Array], jax.Array]]

# Stands in for -inf in excluded slots of the listwise loss: exp() is 0 and gradients stay
# finite (a -inf score would make 0 * inf = nan in the backward pass of logsumexp).
_NEG = -1e9


def _finish(values, where, weights, reduce_fn: Reduce):
  if weights is not None:
    values = weights * values
  if where is not None:
    values = jnp.where(where, values, 0.0)
  return values if reduce_fn is None else reduce_fn(values)


def sigmoid_cross_entropy(scores: jax.Array, labels: jax.Array, *, where=None, weights=None,
                          reduce_fn: Reduce = jnp.sum) -> jax.Array:
  """Binary cross-entropy of sigma(scores) against soft `labels` in [0, 1], per entry:
  -labels log sigma(s) - (1 - labels) log sigma(-s). (BD: labels = sigma(z_guide / tau); CD:
  sigma((z_teacher + t2) / t1); both stop-gradient.)"""
  if where is not None:
    scores = jnp.where(where, scores, 0.0)  # finite gradients at excluded -inf scores
  return _finish(optax.sigmoid_binary_cross_entropy(scores, labels), where, weights, reduce_fn)


def log_sigmoid_loss(scores: jax.Array, *, where=None, weights=None,
                     reduce_fn: Reduce = jnp.sum) -> jax.Array:
  """-log sigma(scores) per entry: the logistic loss of scores that should be high. RD: the
  student's scores of the teacher's top items; BPR and UnKD: score differences z_pos - z_neg."""
  if where is not None:
    scores = jnp.where(where, scores, 0.0)
  return _finish(-jax.nn.log_sigmoid(scores), where, weights, reduce_fn)


def relaxed_ranking_loss(scores: jax.Array, pooled: jax.Array, *, where=None,
                         pooled_where=None, weights=None,
                         reduce_fn: Reduce = jnp.sum) -> jax.Array:
  """The relaxed ranking (Plackett-Luce) loss of RRD and DCD, per row of the last axis:

    -sum_k [ s_k - log( sum_{l >= k} exp s_l + sum_j exp p_j ) ]

  scores [..., K] in the order to learn, pooled [..., L] the items ranked below them in no
  particular order. `where` [..., K] / `pooled_where` [..., L] exclude slots; `weights`
  weights rows ([...]). Computed with log-sum-exps (no overflow, no clamping). Returns the
  per-row losses [...] when `reduce_fn` is None.
  """
  s = scores if where is None else jnp.where(where, scores, _NEG)
  suffix = jnp.flip(jax.lax.cumlogsumexp(jnp.flip(s, -1), axis=s.ndim - 1), -1)
  p = pooled if pooled_where is None else jnp.where(pooled_where, pooled, _NEG)
  below = jax.nn.logsumexp(p, axis=-1, keepdims=True)
  terms = s - jnp.logaddexp(suffix, below)
  if where is not None:
    terms = jnp.where(where, terms, 0.0)
  per_row = -jnp.sum(terms, axis=-1)
  return _finish(per_row, None, weights, reduce_fn)


def squared_error(predictions: jax.Array, targets: jax.Array, *, where=None, weights=None,
                  reduce_fn: Reduce = jnp.sum) -> jax.Array:
  """||targets - predictions||^2 over the last axis, per row (DE's experts against the teacher's
  representations; targets are not differentiated by callers that stop their gradient)."""
  if where is not None:  # finite gradients whatever the excluded rows hold
    keep = jnp.expand_dims(where, -1)
    predictions, targets = jnp.where(keep, predictions, 0.0), jnp.where(keep, targets, 0.0)
  per_row = jnp.sum(jnp.square(targets - predictions), axis=-1)
  return _finish(per_row, where, weights, reduce_fn)
