"""FTD — Full Topology Distillation (Kang, Hwang, Kweon & Yu, "Topology Distillation for
Recommender System", KDD'21).

The student matches the frozen teacher's full topology of the batch: the cosine similarities of
every pair of entities (users and items together),

  sim(A, B) = normalize(A) normalize(B)^T
  L_FTD     = sum_{a, b in E} (sim(t_a, t_b) - sim(s_a, s_b))^2      (diagonal included)

where E is the global batch's unique users followed by its unique items (positives and the
student's own BPR negatives together), t the teacher's representations (stop-gradient) and s the
student's. As the authors' code (Topology_Distillation_KDD21 `model.py`, `FTD.get_TD_loss`),
users and items are stacked into ONE matrix, so the user-item and item-item similarities are
matched too, not only the user-user ones; this needs the user and item representations of a
model to have the same size (true of BPR-MF, LightGCN and NeuMF's [GMF; MLP] concatenation).
The student's loss gains lambda_td L_FTD (the authors' guide notebook: lambda_td = 1e-3).

Static shapes: E has S user slots and 2 S item slots (S = the global batch size), the slots past
the unique ids padded and masked; pairs with a padded slot contribute 0.

Data parallelism: every device gathers the global batch's ids (`batch['global'].unique`),
computes the same global L_FTD and contributes its share (`batch['global'].share`), so 4
devices give the result of 1. The helpers here (`cosine_sim`, `entity_sets`,
`stacked_representations`) are shared with HTD (`methods/htd.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kdrec_jax import methods, parallel, ranking
from kdrec_jax.methods import Method

LABEL = "FTD"
PAPER = "Kang, Hwang, Kweon & Yu, Topology Distillation for Recommender System, KDD'21"
# The authors' lambda_td = 1e-3 (their guide, batch 1024) halved for batch 2048: L_FTD sums
# |E|^2 ~ B^2 pairs while the summed BPR grows as B.
DEFAULTS = dict(lambda_td=5e-4)

MODELS = ("teacher", "student")
NORM_EPS = 1e-24  # squared-norm floor: an all-zero row normalises to 0 (similarity 0), not NaN
# The Gram form's value a - 2 b + c is trusted when it is at least this fraction of a + 2 b + c
# (float32 rounding of the three terms then costs at most ~1e-4 of the value, tested); below it
# the pairs form recomputes it.
GRAM_GUARD = 1e-2


def normalize(x: jax.Array) -> jax.Array:
  """Rows of x [n, d] scaled to unit L2 norm; an all-zero row stays 0 (finite gradients)."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS))


def cosine_sim(a: jax.Array, b: jax.Array) -> jax.Array:
  """sim(A, B) = normalize(A) normalize(B)^T: a [n, d], b [m, d] -> [n, m]."""
  return normalize(a) @ normalize(b).T


def ftd_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array, form: str = "auto"
             ) -> jax.Array:
  """sum over valid pairs (a, b) (diagonal included) of (sim(t_a, t_b) - sim(s_a, s_b))^2.

  student [n, d_S], teacher [n, d_T] (stop-gradient here), mask [n] (False: padding).

  With S, T the normalised rows (padding rows zeroed), the sum is ||S S^T - T T^T||_F^2 =
  a - 2 b + c with a = ||S^T S||_F^2, b = ||S^T T||_F^2, c = ||T^T T||_F^2: form 'gram' computes
  these d x d products in O(n (d_S + d_T)^2) instead of the n x n similarity matrices'
  O(n^2 (d_S + d_T)) ('pairs'); 'auto' takes 'gram' when d_S + d_T < n (e.g. 6,144 entities at
  d = 400 + 20: ~15x fewer flops).

  Precision: a - 2 b + c carries the float32 rounding of the terms (~1e-7 of a + 2 b + c, which
  is up to ~n^2), so when the student's topology is close to the teacher's the difference is
  mostly rounding (n = 2000, d = 32 near-equal rows: -0.008 for a true 0.0026, and gradients off
  by ~2%). The Gram form is therefore guarded: when a - 2 b + c < `GRAM_GUARD` (a + 2 b + c),
  the value and its gradient come from the pairs form instead (whose n x n differences are
  formed from d-long dot products, before any long sum), at the pairs form's cost for that
  step. Above the guard, value and gradient are the plain Gram form's, bit for bit as before.
  """
  if form not in ("auto", "gram", "pairs"):
    raise ValueError(f"form must be 'auto', 'gram' or 'pairs', got {form!r}")
  teacher = jax.lax.stop_gradient(teacher)
  n, width = student.shape[0], student.shape[1] + teacher.shape[1]
  if form == "pairs" or (form == "auto" and width >= n):
    return _pairs_form(student, teacher, mask)
  if parallel.in_runs():
    return _guarded_gram(student, teacher, mask)
  value, total = _gram_form(student, teacher, mask)
  return jax.lax.cond(value >= GRAM_GUARD * total, lambda: value,
                      lambda: _pairs_form(student, teacher, mask))


def _pairs_form(student: jax.Array, teacher: jax.Array, mask: jax.Array) -> jax.Array:
  diff = cosine_sim(teacher, teacher) - cosine_sim(student, student)
  pairs = mask[:, None] & mask[None, :]
  return jnp.sum(jnp.where(pairs, jnp.square(diff), 0.0))


def _gram_form(student: jax.Array, teacher: jax.Array, mask: jax.Array):
  """(a - 2 b + c, a + 2 b + c)."""
  keep = mask[:, None].astype(student.dtype)
  s, t = normalize(student) * keep, normalize(teacher) * keep
  frob = lambda a, b: jnp.sum(jnp.square(a.T @ b))  # noqa: E731
  a, b, c = frob(s, s), frob(s, t), frob(t, t)
  return a - 2.0 * b + c, a + 2.0 * b + c


# The guard under the run axis (N runs as one program): there `lax.cond` would compute both forms
# every step (16 s per epoch against 1.2 s); `ranking.only_if` computes the pairs form only when
# some run needs it, for the value and, in the backward pass, for the gradient (a while loop is
# not differentiable, hence the custom VJP). Same values; gradients equal up to float32 rounding
# (recomputed in the backward pass), so single runs keep the `lax.cond`, bit for bit.
@jax.custom_vjp
def _guarded_gram(student: jax.Array, teacher: jax.Array, mask: jax.Array) -> jax.Array:
  return _guarded_gram_fwd(student, teacher, mask)[0]


def _guarded_gram_fwd(student, teacher, mask):
  value, total = _gram_form(student, teacher, mask)
  trusted = value >= GRAM_GUARD * total
  value = ranking.only_if(~trusted, _pairs_form, value, student, teacher, mask)
  return value, (student, teacher, mask, trusted)


def _guarded_gram_bwd(residuals, g):
  student, teacher, mask, trusted = residuals

  def grad_of(form):
    return lambda s, t, m: jax.vjp(lambda x: form(x, t, m), s)[1](g)[0]

  gram = grad_of(lambda s, t, m: _gram_form(s, t, m)[0])(student, teacher, mask)
  grad = ranking.only_if(~trusted, grad_of(_pairs_form), gram, student, teacher, mask)
  return grad, jnp.zeros_like(teacher), None


_guarded_gram.defvjp(_guarded_gram_fwd, _guarded_gram_bwd)


def entity_sets(batch, num_users: int, num_items: int) -> dict:
  """The global batch's unique users and unique items (positives and the student's negatives).

  batch: this device's {'user', 'pos', 'neg': {'student'}, 'weight'} [b]. Returns
  {'user': {'ids' [S], 'mask' [S]}, 'item': {'ids' [2 S], 'mask' [2 S]}} (S = the global batch
  size; ids past the unique ones are 0 and masked), identical on every device.
  """
  valid = batch["weight"] > 0
  users, u_mask = batch["global"].unique(batch["user"], valid, fill=num_users)
  pairs = jnp.stack([batch["pos"], batch["neg"]["student"]], axis=1)  # [b, 2]
  items, i_mask = batch["global"].unique(pairs, jnp.broadcast_to(valid[:, None], pairs.shape),
                                         fill=num_items)
  return {"user": {"ids": jnp.where(u_mask, users, 0), "mask": u_mask},
          "item": {"ids": jnp.where(i_mask, items, 0), "mask": i_mask}}


def stacked_representations(models, outputs, sets) -> tuple[dict, jax.Array]:
  """({'teacher': [n, d_T], 'student': [n, d_S]}, mask [n]): the users' representations followed
  by the items' (n = S + 2 S), as the reference's torch.cat([users, items]); the teacher's under
  stop-gradient."""
  reps = {}
  for m in MODELS:
    u, i = models[m].representations(outputs[m], sets["user"]["ids"], sets["item"]["ids"])
    reps[m] = jnp.concatenate([u, i], axis=0)
  reps["teacher"] = jax.lax.stop_gradient(reps["teacher"])
  return reps, jnp.concatenate([sets["user"]["mask"], sets["item"]["mask"]])


def repr_dims(model) -> tuple[int, int]:
  """(user, item) representation sizes of `model`, from shapes only."""
  ids = jnp.zeros((1,), jnp.int32)
  u, i = jax.eval_shape(lambda k: model.representations(model.init(k), ids, ids),
                        jax.random.key(0))
  return u.shape[-1], i.shape[-1]


def check_stackable(name: str, models) -> dict[str, int]:
  """{model: d}: the representation size of each model, whose users and items must share it
  (topology distillation stacks them into one matrix); a clear error otherwise."""
  dims = {}
  for m in MODELS:
    d_u, d_i = repr_dims(models[m])
    if d_u != d_i:
      raise ValueError(f"method {name!r} stacks users and items into one matrix; the {m} "
                       f"{models[m].name!r} has user representations of size {d_u} and item "
                       f"representations of size {d_i}")
    dims[m] = d_u
  return dims


def make(cfg, models, data) -> Method:
  """FTD for `models` = {'teacher': Model, 'student': Model} (pair-batched) on `data`.

  cfg: lambda_td.
  """
  methods.require_pairs("ftd", models)
  check_stackable("ftd", models)
  num_users, num_items = data.num_users, data.num_items

  def sample(view, batch, keys, key):
    """The global batch's unique users and items (no randomness)."""
    del view, keys, key
    return entity_sets(batch, num_users, num_items)

  def loss(outputs, batch, samples, hp):
    """lambda_td L_FTD for the student (this device's share)."""
    reps, mask = stacked_representations(models, outputs, samples)
    value = ftd_loss(reps["student"], reps["teacher"], mask)
    term = batch["global"].share(hp["lambda_td"] * value)
    return {"student": term}, batch["global"].share({"ftd": value})

  return Method(name="ftd", loss=loss, learners=("student",), sample=sample,
                hparams={"lambda_td": float(cfg.lambda_td)})
