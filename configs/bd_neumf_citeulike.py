r"""BD (Kweon et al., WWW'21) with NeuMF teacher (GMF d=50, MLP m=50) and student (d=5, m=5) on
CiteULike-t.

COMMAND (the reference schedule of configs/bd_bpr_citeulike.py, with NeuMF models):

  python -m launch.train --config configs/bd_neumf_citeulike.py --workdir /tmp/bd_neumf

Quick CPU variant (the schedule of `bd_bpr_citeulike.py:quick`):

  python -m launch.train --config configs/bd_neumf_citeulike.py:quick --workdir /tmp/bd_neumf_quick

Everything except the models (data, optimizers, BD settings, evaluation) is inherited from
configs/bd_bpr_citeulike.py. NeuMF: MLP layers (2d, d) with ReLU, embeddings N(0, 0.01), items
scored in chunks of `item_chunk` when ranking all items (the teacher's MLP; the student's is
computed elementwise, see kdrec_jax/models/neumf.py).
"""
import ml_collections

from configs import bd_bpr_citeulike


def _neumf(dim: int, mlp_dim: int):
  return ml_collections.ConfigDict(dict(
      name="neumf", dim=dim, mlp_dim=mlp_dim, mlp_layers=(2 * dim, dim), init_std=0.01,
      item_chunk=32))


def get_config(arg: str = ""):
  c = bd_bpr_citeulike.get_config(arg)
  c.teacher = _neumf(50, 50)
  c.student = _neumf(5, 5)
  return c
