r"""Topology distillation (FTD, HTD; Kang et al., KDD'21) on CiteULike-t, BPR-MF d=200 -> d=10/20.

COMMAND (every run of the protocol: the teacher once, then each student, d = 10 and 20, trains
from scratch for 100 epochs, alone or distilled from that teacher; `sweep_arms` below;
results/td holds the recorded runs):

  python -m launch.sweep --config configs/td_citeulike.py --root runs/td
  python -m benchmarks.kd_table --protocol td --runs runs/td

One run by hand:

  python -m launch.train --config configs/td_citeulike.py:teacher --workdir runs/td/teacher
  python -m launch.train --config configs/td_citeulike.py:htd,dim=10 --workdir runs/td/htd_d10 \
      --config.teacher_init=runs/td/teacher          # none / ftd / htd, dim=10 / 20

Config argument: a method of `METHODS` ('teacher' trains only the teacher), the student size as
`dim=N` or a bare `N` (default 20), and `quick` (3 + 3 epochs, evaluation every epoch: a smoke
run), comma-separated in any order, e.g. `:htd,10,quick`.

Rough cost on the shared 2-core CPU: one step of 1024 pairs takes ~0.1 s with FTD and ~0.4 s with
HTD (its 30 mapping MLPs per side over ~3,000 entities dominate), i.e. ~20 min and ~1.5 h for the
100 epochs of 113 steps; the student alone and the teacher run plain BPR steps.

Protocol (the authors' `Guide to using topology distillation.ipynb`, on this library's data):
the shipped CiteULike-t, users with >= 5 items, leave-one-out by file order (`default_data_config`:
each user's last listed item is the test item, the one before it the validation item); full
ranking over all items with the training items and the other held-out item excluded; HR@K and
NDCG@K at 10, 20, 50 (the guide reports Recall@50, which is HR@50 with one held-out item).
BPR-MF (init N(0, 0.01)), summed BPR with one uniform unobserved negative per positive, batch
1024, Adam 1e-3 with coupled weight decay 1e-3 (the guide's `reg`, applied to all trained
parameters, HTD's networks included).
- Teacher: d = 200. The guide trains it with the same 100-epoch run as the students (its HR@50
  0.3123); here it trains until validation NDCG@50 (evaluated every 10 epochs) has not improved
  for 5 evaluations, at most 500 epochs, and the best state is kept, so the teacher is at least
  that converged. `--config.warmup.epochs=100 --config.warmup.patience=0` gives the guide's.
- Students: d = 10 or 20, 100 epochs from scratch, no early stopping (as the guide), validation
  every 10 epochs for the curves, test after epoch 100. 'none': BPR alone; 'ftd' and 'htd':
  L_BPR + lambda_td L_TD with the guide's lambda_td = 1e-3; HTD with alpha 0.5, K = 30 groups per
  side, choice 'second' (Group(P, e)) and the Gumbel temperature annealed over the 100 epochs
  from 1 to 1e-10, as the reference's T(e) = (1e-10)^(e / max_epoch).
The guide's test HR@50 after 100 epochs (its `logs/`): d=10 student 0.1788 / FTD 0.2112 / HTD
0.2282; d=20 0.2276 / 0.2516 / 0.2744. Its split (own pickles, 5,220 users x 25,182 items) is not
this library's, so compare the orderings and gains, not the digits.
"""
import ml_collections

from kdrec_jax import methods
from kdrec_jax.data import default_data_config

METHODS = ("teacher", "none", "ftd", "htd")


def _opt(lr, weight_decay):
  return ml_collections.ConfigDict(dict(lr=lr, weight_decay=weight_decay))


def method_config(name: str, epochs: int = 100) -> ml_collections.ConfigDict:
  """The method settings for `name` in `METHODS`: the method's defaults with the guide's
  lambda_td = 1e-3 (and HTD's alpha 0.5, its temperature annealed over `epochs`)."""
  changes = {"teacher": ("none", {}), "none": ("none", {}),
             "ftd": ("ftd", dict(lambda_td=1e-3)),
             "htd": ("htd", dict(lambda_td=1e-3, alpha=0.5, anneal_epochs=epochs))}
  if name not in changes:
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
  method, settings = changes[name]
  return methods.defaults(method, **settings)


def parse_arg(arg: str) -> tuple[str, int, bool]:
  """(method, student dim, quick) from 'method[,dim=N|,N][,quick]' (any order)."""
  name, dim, quick = None, 20, False
  for part in (p.strip() for p in arg.split(",")):
    if not part:
      continue
    if part == "quick":
      quick = True
    elif part.isdigit() or part.startswith("dim="):
      value = part[len("dim="):] if part.startswith("dim=") else part
      if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"config arg: bad student size {part!r} in {arg!r}")
      dim = int(value)
    elif part in METHODS and name is None:
      name = part
    else:
      raise ValueError(f"config arg: expected one method of {METHODS}, 'dim=N' or 'N', and "
                       f"optionally 'quick'; got {arg!r}")
  return name or "none", dim, quick


def sweep_arms(quick: bool = False) -> list[dict]:
  """The protocol's runs for `python -m launch.sweep` (arm format: launch/sweep.py): the teacher
  (folder `teacher`), then the students alone, with FTD and with HTD at d = 10 and 20 (arm
  `<method>:<dim>`, folder `<method>_d<dim>`, `teacher_init` = the teacher's folder); seed 0."""
  q = ",quick" if quick else ""
  file = "configs/td_citeulike.py"
  arms = [dict(id="teacher", config=f"{file}:teacher{q}", folder="teacher",
               fixed={"distill.epochs": 0})]
  for dim in (10, 20):
    for name in METHODS[1:]:
      arms.append(dict(id=f"{name}:{dim}", config=f"{file}:{name},dim={dim}{q}",
                       folder=f"{name}_d{dim}", needs={"teacher_init": "teacher"}))
  return arms


def get_config(arg: str = ""):
  name, dim, quick = parse_arg(arg)
  epochs = 3 if quick else 100
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = default_data_config()
  c.teacher = ml_collections.ConfigDict(dict(name="bpr_mf", dim=200, init_std=0.01))
  c.student = ml_collections.ConfigDict(dict(name="bpr_mf", dim=dim, init_std=0.01))
  c.batch_size = 1024
  c.num_devices = 0
  c.warmup = ml_collections.ConfigDict(dict(
      epochs=3 if quick else 500, models=("teacher",), teacher=_opt(1e-3, 1e-3),
      student=_opt(1e-3, 1e-3), patience=5, stop_metric="NDCG@50"))
  c.distill = ml_collections.ConfigDict(dict(
      epochs=0 if name == "teacher" else epochs, teacher=_opt(1e-3, 0.0),
      student=_opt(1e-3, 1e-3), method=_opt(1e-3, 1e-3), patience=0, stop_metric="NDCG@50"))
  c.control = False  # the student alone is its own run (method 'none')
  c.method = method_config(name, epochs)
  c.eval = ml_collections.ConfigDict(dict(
      ks=(10, 20, 50), chunk_size=1024, protocol="full", num_negatives=499, exclude_other=True,
      average="heldout"))
  c.eval_every = 1 if quick else 10
  c.log_every = 1 if quick else 10
  c.checkpoint_every = 1 if quick else 10
  c.checkpoint_keep = 1
  c.max_epochs_per_run = 0
  c.teacher_init = ""  # a workdir with the finished ':teacher' warm-up, or a params directory
  c.warmup_from = ""
  return c
