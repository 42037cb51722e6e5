"""DE-RRD (Kang, Hwang, Kweon & Yu, CIKM'20): the student learns both the teacher's
representations through distillation experts (DE) and its ranking through relaxed ranking
distillation (RRD): L = L_own + lambda_de L_DE + lambda_rrd L_RRD. The two terms keep their
own samplers (DE: the global batch's unique users and items with Gumbel noise; RRD: per-epoch
interesting/uninteresting sets for the unique users); see de.py and rrd.py."""
from __future__ import annotations

import jax

from kdrec_jax.methods import Method, de, require_pairs, rrd

LABEL = "DE-RRD"
PAPER = "Kang, Hwang, Kweon & Yu, DE-RRD, CIKM'20"
DEFAULTS = dict(**de.DEFAULTS, **rrd.DEFAULTS)


def make(cfg, models, data) -> Method:
  require_pairs("de_rrd", models)
  d, r = de.make(cfg, models, data), rrd.make(cfg, models, data)

  def sample(view, batch, keys, key):
    k_de, k_rrd = jax.random.split(key)
    return {"de": d.sample(view, batch, keys, k_de), "rrd": r.sample(view, batch, keys, k_rrd)}

  def loss(outputs, batch, samples, hp):
    terms, aux = d.loss(outputs, batch, samples["de"], hp)
    rrd_terms, rrd_aux = r.loss(outputs, batch, samples["rrd"], hp)
    terms = dict(terms, student=terms["student"] + rrd_terms["student"])
    return terms, {**aux, **rrd_aux}

  return Method(name="de_rrd", loss=loss, learners=d.learners, sample=sample,
                prepare=r.prepare, refresh=r.refresh, refresh_every=r.refresh_every,
                refresh_reads=r.refresh_reads, hparams={**d.hparams, **r.hparams}, init=d.init)
