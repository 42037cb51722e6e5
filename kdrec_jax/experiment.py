"""Everything a run needs that does not change between phases: the data, the models (teacher,
student and any extra frozen teachers a method distils from), the method, the device mesh, the
evaluators and the device copies of the training examples."""
from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kdrec_jax import ranking, sparse
from kdrec_jax.step import MODELS, batching_of, make_mesh, make_optimizer


def extra_teachers(config) -> dict:
  """`config.teachers`: {name: {'model': model config, 'init': workdir or params dir,
  'trajectory': epochs}} — frozen teachers besides `config.teacher` (e.g. HetComp's
  heterogeneous ensemble); {} when absent."""
  teachers = config.get("teachers", None)
  if not teachers:
    return {}
  out = dict(teachers)
  for name, spec in out.items():
    if name in (*MODELS, "method") or "@" in name:
      raise ValueError(f"teachers.{name}: the name is reserved or contains '@'")
    if "model" not in spec or not spec.get("init", ""):
      raise ValueError(f"teachers.{name} needs a 'model' config and an 'init' path (a workdir "
                       "whose warm-up trained it, or a params directory)")
  return out


def trajectory_names(config) -> dict:
  """{frozen-teacher name: (model name, its source, epoch)} for every trajectory checkpoint the
  config asks for: `teacher@<e>` for `config.teacher_trajectory`, `<name>@<e>` for
  `config.teachers.<name>.trajectory`."""
  out = {}
  for e in config.get("teacher_trajectory", ()) or ():
    out[f"teacher@{int(e)}"] = ("teacher", int(e))
  for name, spec in extra_teachers(config).items():
    for e in spec.get("trajectory", ()) or ():
      out[f"{name}@{int(e)}"] = (name, int(e))
  return out


class Experiment:
  """The data, models, method, mesh and evaluators of a run (see the module docstring)."""

  def __init__(self, config, data=None):
    """`data`: an `Interactions` to use instead of loading `config.data` (benchmarks)."""
    from kdrec_jax import data as kdata
    from kdrec_jax import methods as kmethods
    from kdrec_jax import models as kmodels
    self.config = config
    self.data = kdata.load(config.data) if data is None else data
    d = self.data
    self.models = {m: kmodels.make(config[m], d.num_users, d.num_items, data=d) for m in MODELS}
    self.teachers = extra_teachers(config)
    for name, spec in self.teachers.items():
      self.models[name] = kmodels.make(spec.model, d.num_users, d.num_items, data=d)
    self.method = kmethods.make(config.method, self.models, d)
    self.mesh = make_mesh(config.num_devices)
    self.train_csr = sparse.DeviceCSR.from_numpy(*d.split("train"))
    self.batching = batching_of(self.models)
    self.examples = self.batching.examples(d)
    self.num_examples = len(self.examples["user"])
    self.item_groups = self._popularity_groups()
    self.evaluators = self._evaluators()
    self.key = jax.random.key(config.seed)
    self._refresh = jax.jit(self.method.refresh) if self.method.refresh else None
    self._prepare = jax.jit(self.method.prepare) if self.method.prepare else None

  def _popularity_groups(self):
    """Popularity groups for the phase-end bias metrics (eval.popularity_groups, 0 = off)."""
    from kdrec_jax.data import popularity
    ev = self.config.eval
    num_groups = int(ev.get("popularity_groups", 4) or 0)
    if num_groups and ev.protocol == "full":
      return popularity.groups(*self.data.split("train"), self.data.num_items, num_groups)
    if num_groups:
      logging.warning("eval.popularity_groups: bias metrics need the full protocol; off.")
    return None

  def _evaluators(self):
    from kdrec_jax import metrics as kmetrics
    ev = self.config.eval
    return {split: kmetrics.Evaluator(self.data, split=split, ks=tuple(ev.ks),
                                      chunk_size=ev.chunk_size, protocol=ev.protocol,
                                      num_negatives=ev.num_negatives,
                                      exclude_other=ev.get("exclude_other", True),
                                      average=ev.get("average", "heldout"),
                                      item_groups=self.item_groups)
            for split in ("val", "test")}

  @property
  def eval_key(self):
    """The sampled protocol's negatives: fixed per run."""
    return jax.random.fold_in(self.key, 7)

  def evaluate(self, params, splits=("val", "test"), models=MODELS, bias: bool = False,
               key=None) -> dict:
    """{model: {split: metrics}} of `params` ({model: params}); `bias` adds the
    per-popularity-group metrics (phase ends); `key` the sampled protocol's (default: the
    run's `eval_key`)."""
    from kdrec_jax import metrics as kmetrics
    key = self.eval_key if key is None else key
    evaluators = {s: self.evaluators[s] for s in splits}  # scored once for all the splits
    return {m: kmetrics.evaluate_splits(evaluators, self.models[m].score_all, params[m], key,
                                        bias=bias) for m in models}

  def report(self, params) -> dict:
    """The method's phase-end analysis of both models (`Method.report`), {} if it has none."""
    if self.method.report is None:
      return {}
    return self.method.report(self, params)

  def group_summary(self) -> dict | None:
    """The popularity groups of the bias metrics: counts of items and training interactions."""
    if self.item_groups is None:
      return None
    g = self.item_groups
    n = int(g.max()) + 1
    pop = self.data.item_popularity
    return {"asked": int(self.config.eval.get("popularity_groups", 4)), "num_groups": n,
            "items": np.bincount(g[g >= 0], minlength=n).tolist(),
            "interactions": np.bincount(g[g >= 0], weights=pop[g >= 0],
                                        minlength=n).astype(int).tolist()}

  def refresh(self, static, params, carry, key, epoch):
    """The method's (cache, carry) for `epoch` (jitted, traced epoch)."""
    with ranking.x64():
      return self._refresh(static, params, carry, key, jnp.int32(epoch))

  def prepare(self, frozen: dict) -> dict:
    """The method's per-phase constants from the frozen teachers ({name: params})."""
    if self._prepare is None:
      return {}
    with ranking.x64():
      return self._prepare(frozen)

  def hparams(self) -> dict:
    return {k: jnp.float32(v) for k, v in self.method.hparams.items()}

  def optimizers(self, phase_cfg, learners=(*MODELS, "method")):
    """Optimizers for `learners` (the method's own networks use `phase_cfg.method`, default the
    student's settings)."""
    def cfg(learner):
      if learner == "method":
        return phase_cfg.get("method", None) or phase_cfg.student
      return phase_cfg[learner]
    return {learner: make_optimizer(cfg(learner)) for learner in learners}
