"""HTD — Hierarchical Topology Distillation (Kang, Hwang, Kweon & Yu, "Topology Distillation for
Recommender System", KDD'21).

The entities E of a batch (the global batch's unique users, then its unique items: positives and
the student's own BPR negatives; see `ftd.entity_sets`) are split into K groups per side, item
groups offset by K (2 K groups). HTD transfers the teacher's topology hierarchically: between
groups (through group prototypes) and, within each group, between its entities.

Group assignment (GA), per side: a selection network v(t) = softmax(W t + b) [K] reads the frozen
teacher's representation t_e, K mapping MLPs f_k: d_S -> (d_T + d_S) // 2 -> d_T read the
student's s_e, and

  L_GA = sum_e ||t_e - sum_k g_ek f_k(s_e)||^2,   g_e = GumbelSoftmax(v(t_e), T)

which is DE with K experts (`de.DistillationExperts`, `de.de_loss`), over the unique users plus
the unique items (one item set, positives and negatives together, as woriazzc/KDs `HTD.get_loss`).
The hard group of an entity is z_e = argmax_k v(t_e)_k (+K for items), without gradient.

Topology, over the stacked users and items (s [n, d_S], t [n, d_T] stop-gradient, cosine `sim`):
  prototypes  P_s[g], P_t[g] = mean of s (resp. t) over the batch members of group g (no
              gradient; an empty group is masked out);
  entity      sum over pairs (a, b) of the same group (diagonal included) with sim(t_a, t_b) > 0
              of (sim(s_a, s_b) - sim(t_a, t_b))^2;
  group       choice 'second' (Group(P, e), the authors' default): sum over non-empty groups g and
              entities e of (sim(P_s[g], s_e) - sim(P_t[g], t_e))^2, gradient only through s_e;
              choice 'first' (Group(P, P)): sum over non-empty g, g' of
              (sim(P_s[g], P_s[g']) - sim(P_t[g], P_t[g']))^2. Both prototypes are computed
              under no_grad in the reference, so this term has NO gradient: with 'first' only the
              entity level teaches the student (kept as the reference has it).

  L_HTD = alpha (entity + group) + (1 - alpha) L_GA,   student loss = L_BPR + lambda_td L_HTD

(the authors' guide: K = 30, alpha = 0.5, lambda_td = 1e-3, choice 'second'). lambda_td L_HTD
also trains the selection networks and the mapping MLPs (learner 'method'; only through L_GA).
The Gumbel temperature anneals per epoch as in DE, T(e) = max((T_end)^(e / anneal_epochs), T_end)
from T_0 = 1, from the traced epoch (no recompilation); the reference anneals over its max_epoch.

Same-group pairs are the one-hot product (Z Z^T)_ab = [z_a = z_b], computed as the equality of
the group ids; prototypes are the one-hot matmul Z^T s / |g|. Masks replace boolean indexing.

Data parallelism: every device gathers the global batch's ids, draws the same Gumbel noise from
the replicated key, computes the same global L_HTD and contributes its
share (`batch['global'].share`), so 4 devices give the result of 1.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdrec_jax import methods
from kdrec_jax.methods import Method, de, ftd

LABEL = "HTD"
PAPER = "Kang, Hwang, Kweon & Yu, Topology Distillation for Recommender System, KDD'21"
# The RCE-KD / KDs CiteULike config (configs/citeulike/bpr/htd.yaml there).
DEFAULTS = dict(lambda_td=0.5, alpha=0.9, num_experts=30, choice="second",
                end_temperature=1e-10, anneal_epochs=1000)

SIDES = ("user", "item")
CHOICES = ("second", "first")


def group_assignment(selection, teacher: jax.Array) -> jax.Array:
  """z_e = argmax_k v(t_e)_k (int32 [n]): selection = the DE module's 'selection' params
  ({'kernel' [d_T, K], 'bias' [K]}), teacher [n, d_T]; no gradient. argmax of the softmax is the
  argmax of the logits."""
  selection = jax.lax.stop_gradient(selection)
  logits = jax.lax.stop_gradient(teacher) @ selection["kernel"] + selection["bias"]
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def prototypes(x: jax.Array, groups: jax.Array, mask: jax.Array, num_groups: int
               ) -> tuple[jax.Array, jax.Array]:
  """(P [G, d], nonempty [G]): the mean of the valid rows of x [n, d] in each group (groups [n]
  in [0, G), mask [n]), without gradient; an empty group's prototype is 0 (no 0/0)."""
  onehot = jax.nn.one_hot(groups, num_groups, dtype=x.dtype) * mask[:, None]  # Z [n, G]
  counts = jnp.sum(onehot, axis=0)
  sums = onehot.T @ jax.lax.stop_gradient(x)
  protos = sums / jnp.where(counts > 0, counts, 1.0)[:, None]
  return jax.lax.stop_gradient(protos), counts > 0


def topology_loss(student: jax.Array, teacher: jax.Array, groups: jax.Array, mask: jax.Array,
                  num_groups: int, choice: str = "second") -> tuple[jax.Array, jax.Array]:
  """(entity-level, group-level) topology losses of HTD over n stacked entities.

  student [n, d_S], teacher [n, d_T] (stop-gradient here), groups int [n] in [0, num_groups)
  (item groups already offset), mask [n] (False: padding, contributes 0). choice: 'second'
  (Group(P, e)) or 'first' (Group(P, P)).
  """
  if choice not in CHOICES:
    raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
  teacher = jax.lax.stop_gradient(teacher)
  t_sim = ftd.cosine_sim(teacher, teacher)
  s_sim = ftd.cosine_sim(student, student)
  same = (groups[:, None] == groups[None, :]) & mask[:, None] & mask[None, :]
  entity = jnp.sum(jnp.where(same & (t_sim > 0), jnp.square(s_sim - t_sim), 0.0))
  p_s, nonempty = prototypes(student, groups, mask, num_groups)
  p_t, _ = prototypes(teacher, groups, mask, num_groups)
  if choice == "second":
    diff = ftd.cosine_sim(p_s, student) - ftd.cosine_sim(p_t, teacher)  # [G, n]
    valid = nonempty[:, None] & mask[None, :]
  else:
    diff = ftd.cosine_sim(p_s, p_s) - ftd.cosine_sim(p_t, p_t)  # [G, G]
    valid = nonempty[:, None] & nonempty[None, :]
  group = jnp.sum(jnp.where(valid, jnp.square(diff), 0.0))
  return entity, group


def make(cfg, models, data) -> Method:
  """HTD for `models` = {'teacher': Model, 'student': Model} (pair-batched) on `data`.

  cfg: lambda_td, alpha (0.5), num_experts (K, 30), choice ('second'), end_temperature (1e-10),
  anneal_epochs (100, the authors' max_epoch), start_temperature (1).
  """
  methods.require_pairs("htd", models)
  dims = ftd.check_stackable("htd", models)
  d_t, d_s = dims["teacher"], dims["student"]
  num_users, num_items = data.num_users, data.num_items
  k = int(cfg.get("num_experts", 30))
  choice = str(cfg.get("choice", "second"))
  if choice not in CHOICES:
    raise ValueError(f"htd: choice must be one of {CHOICES}, got {choice!r}")
  end_t = float(cfg.get("end_temperature", 1e-10))
  anneal = float(cfg.get("anneal_epochs", 100))
  start_t = float(cfg.get("start_temperature", 1.0))
  module = de.DistillationExperts(k, (d_t + d_s) // 2, d_t)  # the same shapes for both sides

  def init(key) -> dict[str, Any]:
    """{'user': params, 'item': params}: the selection network and K mapping MLPs per side."""
    return {side: module.init(kk, jnp.zeros((1, d_s)), jnp.zeros((1, d_t)),
                              jnp.zeros((1, k)), 1.0)["params"]
            for kk, side in zip(jax.random.split(key), SIDES)}

  def sample(view, batch, keys, key):
    """The global batch's unique users [S] and items [2 S] (`ftd.entity_sets`) with Gumbel noise
    [S, K] and [2 S, K], identical on every device."""
    del view, keys  # per-example keys would differ with the split: the noise uses `key`
    sets = ftd.entity_sets(batch, num_users, num_items)
    for side, kk in zip(SIDES, jax.random.split(key)):
      n = sets[side]["ids"].shape[0]
      sets[side]["gumbel"] = jax.random.gumbel(kk, (n, k), jnp.float32)
    return sets

  def loss(outputs, batch, samples, hp):
    """lambda_td L_HTD for the student and the GA networks (this device's share)."""
    temperature = de.temperature_at(hp["epoch"], end_t, anneal, start_t)
    reps, mask = ftd.stacked_representations(models, outputs, samples)
    n_users = samples["user"]["ids"].shape[0]
    rows = {"user": slice(None, n_users), "item": slice(n_users, None)}
    ga = 0.0
    groups = []
    for offset, side in enumerate(SIDES):
      s = samples[side]
      teacher, student = reps["teacher"][rows[side]], reps["student"][rows[side]]
      ga = ga + de.de_loss(module, outputs["method"][side], student, teacher, s["gumbel"],
                           s["mask"], temperature)
      groups.append(group_assignment(outputs["method"][side]["selection"], teacher) + offset * k)
    entity, group = topology_loss(reps["student"], reps["teacher"], jnp.concatenate(groups),
                                  mask, 2 * k, choice)
    alpha = hp["alpha"]
    value = alpha * (entity + group) + (1.0 - alpha) * ga
    term = batch["global"].share(hp["lambda_td"] * value)
    aux = batch["global"].share({"htd_entity": entity, "htd_group": group, "htd_ga": ga})
    # The step sums the learners' terms into one loss: the student's term carries the gradient
    # for both the student and the GA networks; the networks' own entry only reports the value.
    return {"student": term, "method": jax.lax.stop_gradient(term)}, aux

  return Method(name="htd", loss=loss, learners=("student", "method"), sample=sample,
                hparams={"lambda_td": float(cfg.lambda_td), "alpha": float(cfg.get("alpha", 0.5))},
                init=init)
