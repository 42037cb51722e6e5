r"""BD (Kweon et al., WWW'21) with LightGCN teacher (d=50) and student (d=5), 2 layers each, on
CiteULike-t.

COMMAND (the reference schedule of configs/bd_bpr_citeulike.py, with LightGCN models):

  python -m launch.train --config configs/bd_lightgcn_citeulike.py --workdir /tmp/bd_lightgcn

Quick CPU variant (the schedule of `bd_bpr_citeulike.py:quick`):

  python -m launch.train --config configs/bd_lightgcn_citeulike.py:quick \
      --workdir /tmp/bd_lightgcn_quick

Data, BD settings, evaluation and the schedule are inherited from configs/bd_bpr_citeulike.py.
LightGCN propagates over the whole graph in every step, so it trains on batches of 2048 pairs with
Adam 1e-2, the settings of the LightGCN and UnKD code (batch 128 would mean 900 propagations per
epoch: 51 s per warm-up epoch on the 2-core CPU). The normalised training graph is built once
from the training split.
"""
import ml_collections

from configs import bd_bpr_citeulike


def _lightgcn(dim: int):
  return ml_collections.ConfigDict(dict(name="lightgcn", dim=dim, num_layers=2, init_std=0.1))


def get_config(arg: str = ""):
  c = bd_bpr_citeulike.get_config(arg)
  c.teacher = _lightgcn(50)
  c.student = _lightgcn(5)
  c.batch_size = 2048
  for phase in (c.warmup, c.distill):
    for m in ("teacher", "student"):
      phase[m].lr = 1e-2
  return c
