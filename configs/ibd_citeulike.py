r"""iBD (BD with multi-round feedback re-distillation, after Du 2023; kdrec_jax/methods/ibd.py) on
the shipped CiteULike-t, for the models of the BD configs: `<model>[,quick]`, model in bpr
(configs/bd_bpr_citeulike.py), cdae (configs/bd_cdae_citeulike.py), neumf
(configs/bd_neumf_citeulike.py).

Everything but the method's name and the iBD keys comes from the BD config of that model (data,
models, warm-up, BD phase, BD settings, evaluation), so the warm-up is the BD run's: share it
with `warmup_from` and each iBD run trains only its distillation phase. The control (keep
training without distillation) does not depend on the method, so it is off here: the BD run
with the same warm-up and seed has it.

COMMAND (CDAE; likewise bpr and neumf; the BD run first, for its warm-up and control):

  python -m launch.train --config configs/bd_cdae_citeulike.py --workdir /tmp/ibd/cdae_bd
  python -m launch.train --config configs/ibd_citeulike.py:cdae --workdir /tmp/ibd/cdae_ibd \
      --config.warmup_from=/tmp/ibd/cdae_bd
  # beta in {0.5, 1, 2} (pick on validation), the strict rule, and the random-feedback control:
  python -m launch.train --config configs/ibd_citeulike.py:cdae --workdir /tmp/ibd/cdae_b2 \
      --config.warmup_from=/tmp/ibd/cdae_bd --config.method.beta=2.0
  python -m launch.train --config configs/ibd_citeulike.py:cdae --workdir /tmp/ibd/cdae_strict \
      --config.warmup_from=/tmp/ibd/cdae_bd --config.method.strict=True
  python -m launch.train --config configs/ibd_citeulike.py:cdae --workdir /tmp/ibd/cdae_random \
      --config.warmup_from=/tmp/ibd/cdae_bd --config.method.feedback=random
  # other seeds: --config.seed=1 on both the BD run and the iBD runs sharing its warm-up

Quick CPU variant (minutes; the BD configs' quick schedules, rounds of 2 epochs):

  python -m launch.train --config configs/ibd_citeulike.py:bpr,quick --workdir /tmp/ibd_quick

The per-round statistics (items sampled last round, corrected, re-selected, up-weighted, mean
discrepancy; per direction) are the 'refresh' lines of <workdir>/metrics.jsonl.
"""
from configs import bd_bpr_citeulike, bd_cdae_citeulike, bd_neumf_citeulike

BASES = {"bpr": bd_bpr_citeulike, "cdae": bd_cdae_citeulike, "neumf": bd_neumf_citeulike}


def ibd_settings() -> dict:
  """The iBD keys added to BD's method settings (kdrec_jax/methods/ibd.py)."""
  return dict(
      beta=1.0,               # up-weighting (1 + beta) of re-selected items; 0 is BD, bit for bit
      delta=0.0,              # "not corrected": discrepancy still > delta
      strict=False,           # also require no progress: d^(r) >= kappa d^(r-1)
      kappa=1.0,
      gamma=0.0,              # > 0: history H = gamma H + 1[F], weights (1 + beta H)
      shallow_rounds=1,       # rounds (refresh periods) of plain BD before the feedback starts
      feedback="discrepancy",  # 'random': as many items per user, at random (the control)
  )


def get_config(arg: str = "bpr"):
  parts = [p for p in arg.split(",") if p]
  quick = "quick" in parts
  names = [p for p in parts if p != "quick"] or ["bpr"]
  if len(names) != 1 or names[0] not in BASES:
    raise ValueError(f"config arg: one model of {tuple(BASES)}, optionally ',quick'; got {arg!r}")
  c = BASES[names[0]].get_config("quick" if quick else "")
  c.method.name = "ibd"
  c.method.update(ibd_settings())
  c.control = False  # the BD run with the same warm-up and seed has the control
  return c
