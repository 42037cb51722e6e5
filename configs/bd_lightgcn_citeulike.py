r"""BD (Kweon et al., WWW'21) with LightGCN teacher (d=50) and student (d=5), 2 layers each, on
CiteULike-t.

COMMAND (the reference schedule of configs/bd_bpr_citeulike.py, with LightGCN models):

  python -m launch.train --config configs/bd_lightgcn_citeulike.py --workdir /tmp/bd_lightgcn

Quick CPU variant (the schedule of `bd_bpr_citeulike.py:quick`):

  python -m launch.train --config configs/bd_lightgcn_citeulike.py:quick \
      --workdir /tmp/bd_lightgcn_quick

Everything except the models (data, optimizers, BD settings, evaluation) is inherited from
configs/bd_bpr_citeulike.py. The normalised training graph is built once from the training split.
"""
import ml_collections

from configs import bd_bpr_citeulike


def _lightgcn(dim: int):
  return ml_collections.ConfigDict(dict(name="lightgcn", dim=dim, num_layers=2, init_std=0.1))


def get_config(arg: str = ""):
  c = bd_bpr_citeulike.get_config(arg)
  c.teacher = _lightgcn(50)
  c.student = _lightgcn(5)
  return c
