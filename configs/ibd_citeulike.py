r"""iBD (BD with multi-round feedback re-distillation, after Du 2023; kdrec_jax/methods/ibd.py) on
the shipped CiteULike-t, for the models of the BD configs: `<model>[,<arm>][,quick]`, model in bpr
(configs/bd_bpr_citeulike.py), cdae (configs/bd_cdae_citeulike.py), neumf
(configs/bd_neumf_citeulike.py); arm one of the README's protocol arms (default b1): b05, b1, b2
(beta 0.5, 1, 2), strict (beta 1 with the strict "no progress" rule), random (beta 1 on a random
feedback set of the same size: the control). The arm names are the workdir suffixes
`<model>_s<seed>_<arm>` that `python -m benchmarks.kd_table --protocol ibd` reads.

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
  python -m launch.train --config configs/ibd_citeulike.py:cdae,b2 --workdir /tmp/ibd/cdae_b2 \
      --config.warmup_from=/tmp/ibd/cdae_bd
  python -m launch.train --config configs/ibd_citeulike.py:cdae,strict \
      --workdir /tmp/ibd/cdae_strict --config.warmup_from=/tmp/ibd/cdae_bd
  python -m launch.train --config configs/ibd_citeulike.py:cdae,random \
      --workdir /tmp/ibd/cdae_random --config.warmup_from=/tmp/ibd/cdae_bd
  # other seeds: --config.seed=1 on both the BD run and the iBD runs sharing its warm-up

Quick CPU variant (minutes; the BD configs' quick schedules, rounds of 2 epochs):

  python -m launch.train --config configs/ibd_citeulike.py:bpr,quick --workdir /tmp/ibd_quick

The per-round statistics (items sampled last round, corrected, re-selected, up-weighted, mean
discrepancy; per direction) are the 'refresh' lines of <workdir>/metrics.jsonl.
"""
from configs import bd_bpr_citeulike, bd_cdae_citeulike, bd_neumf_citeulike

BASES = {"bpr": bd_bpr_citeulike, "cdae": bd_cdae_citeulike, "neumf": bd_neumf_citeulike}
# The protocol's arms (README, iBD): the keys each one sets over ibd_settings()
ARMS = {"b05": dict(beta=0.5), "b1": dict(), "b2": dict(beta=2.0), "strict": dict(strict=True),
        "random": dict(feedback="random")}


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
  models = [p for p in parts if p in BASES]
  arms = [p for p in parts if p in ARMS]
  unknown = [p for p in parts if p not in BASES and p not in ARMS and p != "quick"]
  if len(models) > 1 or len(arms) > 1 or unknown:
    raise ValueError(f"config arg: one model of {tuple(BASES)}, optionally one arm of "
                     f"{tuple(ARMS)} and ',quick'; got {arg!r}")
  c = BASES[(models or ["bpr"])[0]].get_config("quick" if quick else "")
  c.method.name = "ibd"
  c.method.update(ibd_settings())
  c.method.update(ARMS[(arms or ["b1"])[0]])
  c.control = False  # the BD run with the same warm-up and seed has the control
  return c
