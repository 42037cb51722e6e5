r"""iBD (BD with multi-round feedback re-distillation, after Du 2023; kdrec_jax/methods/ibd.py) on
the shipped CiteULike-t, for the models of the BD configs: `<model>[,<arm>][,quick]`, model in bpr
(configs/bd_bpr_citeulike.py), cdae (configs/bd_cdae_citeulike.py), neumf
(configs/bd_neumf_citeulike.py); arm one of the protocol's arms (docs/results/ibd.md; default
b1): b05, b1, b2 (beta 0.5, 1, 2), strict (beta 1 with the strict "no progress" rule), random
(beta 1 on a random feedback set of the same size: the control). The arm names are the workdir
suffixes `<model>_s<seed>_<arm>` that `python -m benchmarks.kd_table --protocol ibd` reads.

Everything but the method's name and the iBD keys comes from the BD config of that model (data,
models, warm-up, BD phase, BD settings, evaluation), so the warm-up is the BD run's: share it
with `warmup_from` and each iBD run trains only its distillation phase. The control (keep
training without distillation) does not depend on the method, so it is off here: the BD run
with the same warm-up and seed has it.

COMMAND (every run of the protocol; `sweep_arms` below; results/ibd holds the recorded runs):

  python -m launch.sweep --config configs/ibd_citeulike.py --root runs/ibd
  python -m benchmarks.kd_table --protocol ibd --runs runs/ibd

Per model one warm-up (`<model>_warm`: the BD config with no distillation phase and no control)
is shared by all its runs through `warmup_from`; per seed the BD run (`<model>_s<seed>_bd`, BD
config, control off) and the iBD arms (`<model>_s<seed>_<arm>`), all with histogram ranks and
(pair batches) pre-drawn samples. BPR-MF has the BD config's schedule; NeuMF (100 warm-up + 50
distillation epochs) and CDAE (300 + 400, validation every 10 epochs) shortened ones. One run by
hand (CDAE; likewise bpr and neumf):

  python -m launch.train --config configs/bd_cdae_citeulike.py --workdir runs/ibd/cdae_warm \
      --config.warmup.epochs=300 --config.distill.epochs=0 --config.control=False
  python -m launch.train --config configs/ibd_citeulike.py:cdae,b2 --workdir runs/ibd/cdae_s0_b2 \
      --config.warmup_from=runs/ibd/cdae_warm --config.warmup.epochs=300 \
      --config.distill.epochs=400 --config.eval_every=10 --config.method.rank_buckets=8192

Quick CPU variant (minutes; the BD configs' quick schedules, rounds of 2 epochs):

  python -m launch.train --config configs/ibd_citeulike.py:bpr,quick --workdir /tmp/ibd_quick

The per-round statistics (items sampled last round, corrected, re-selected, up-weighted, mean
discrepancy; per direction) are the 'refresh' lines of <workdir>/metrics.jsonl.
"""
from configs import bd_bpr_citeulike, bd_cdae_citeulike, bd_neumf_citeulike
from kdrec_jax import methods

BASES = {"bpr": bd_bpr_citeulike, "cdae": bd_cdae_citeulike, "neumf": bd_neumf_citeulike}
# The protocol's arms (docs/results/ibd.md): the keys each one sets over ibd_settings()
ARMS = {"b05": dict(beta=0.5), "b1": dict(), "b2": dict(beta=2.0), "strict": dict(strict=True),
        "random": dict(feedback="random")}


# The recorded sweep (results/ibd): the protocol's schedule per model (full: the BD config's), the
# fast path, and the seeds each arm ran on (default 0, 1, 2)
SCHEDULES = {"bpr": {}, "neumf": {"warmup.epochs": 100, "distill.epochs": 50},
             "cdae": {"warmup.epochs": 300, "distill.epochs": 400}}
SEEDS = {("bpr", "b05"): (0,), ("neumf", "b2"): (0,), ("cdae", "b05"): (0,), ("cdae", "b1"): (0,)}


def _fast(model: str) -> dict:
  """Histogram ranks; pre-drawn samples (pair batches only); CDAE validates every 10 epochs."""
  if model == "cdae":
    return {"method.rank_buckets": 8192, "eval_every": 10, "checkpoint_every": 10}
  return {"method.rank_buckets": 8192, "method.sampling_state": "draws", "checkpoint_every": 10}


def sweep_arms(quick: bool = False) -> list[dict]:
  """The protocol's runs for `python -m launch.sweep` (arm format: launch/sweep.py), arm
  `<model>:<arm>`: per model the shared warm-up (`<model>:warm`, folder `<model>_warm`), the BD
  run (`<model>:bd`) and the iBD arms of `ARMS`, folders `<model>_s<seed>_<arm>`, each with
  `warmup_from` = the warm-up's folder. With `quick`: the BD configs' quick schedules."""
  arms = []
  for model in BASES:
    base = f"configs/bd_{model}_citeulike.py" + (":quick" if quick else "")
    schedule = {} if quick else SCHEDULES[model]
    warm = f"{model}:warm"
    arms.append(dict(id=warm, config=base, folder=f"{model}_warm",
                     set=schedule, fixed={"distill.epochs": 0, "control": False}))
    for arm in ("bd", "b1", "b2", "b05", "strict", "random"):
      config = base if arm == "bd" else f"configs/ibd_citeulike.py:{model},{arm}" + (
          ",quick" if quick else "")
      arms.append(dict(id=f"{model}:{arm}", config=config, folder=f"{model}_s{{seed}}_{arm}",
                       seeds=SEEDS.get((model, arm), (0, 1, 2)),
                       set={**schedule, **_fast(model), **({"control": False} if arm == "bd"
                                                          else {})},
                       needs={"warmup_from": warm}))
  return arms


def ibd_settings() -> dict:
  """The iBD keys added to BD's method settings, with their defaults (kdrec_jax/methods/ibd.py)."""
  return {k: v for k, v in methods.defaults("ibd").items() if k not in methods.defaults("bd")}


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
