r"""BD (Kweon et al., WWW'21) with CDAE teacher (hidden 50) and student (hidden 5) on CiteULike-t.

COMMAND (the CDAE notebook's schedule: 1000 warm-up epochs for each model, 1000 BD epochs with
ranks refreshed every 10, then the keep-training control for 1000 epochs):

  python -m launch.train --config configs/bd_cdae_citeulike.py --workdir /tmp/bd_cdae

Quick CPU variant (minutes on a 2-core CPU):

  python -m launch.train --config configs/bd_cdae_citeulike.py:quick --workdir /tmp/bd_cdae_quick

Settings follow the public BD CDAE notebook: batches of 128 users, input dropout 0.5, 5 sampled
negatives per positive, Adam 2e-3 with weight decay 1e-3 in the warm-up and 0 in the BD phase,
tau 2, lambda 0.5/0.5, eps_t = eps_e = 1e-4, 5 |I+_u| BD items per user and direction (collapsed
to a 0/1 mask). Sampling semantics, data and evaluation as in configs/bd_bpr_citeulike.py.
"""
import ml_collections

from configs import bd_bpr_citeulike


def _cdae(dim: int):
  return ml_collections.ConfigDict(dict(name="cdae", dim=dim, dropout=0.5, num_negatives=5,
                                        init_std=1.0))


def _opt(lr, weight_decay):
  return ml_collections.ConfigDict(dict(lr=lr, weight_decay=weight_decay))


def get_config(arg: str = ""):
  quick = arg == "quick"
  c = bd_bpr_citeulike.get_config(arg)
  c.teacher = _cdae(50)
  c.student = _cdae(5)
  c.batch_size = 128  # users
  c.warmup.epochs = 10 if quick else 1000
  c.warmup.teacher = _opt(2e-3, 1e-3)
  c.warmup.student = _opt(2e-3, 1e-3)
  c.distill.epochs = 4 if quick else 1000
  c.distill.teacher = _opt(2e-3, 0.0)
  c.distill.student = _opt(2e-3, 0.0)
  c.method.update(dict(tau=2.0, eps_t=1e-4, eps_e=1e-4, num_samples=5))
  return c
