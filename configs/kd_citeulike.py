r"""Teacher->student distillation on CiteULike-t with the RCE-KD benchmark's protocol (MF -> MF).

COMMAND (every run of the protocol: the teacher once, then each method distils it into a student
trained from scratch; `sweep_arms` below; results/kd holds the recorded runs):

  python -m launch.sweep --config configs/kd_citeulike.py --root runs/kd
  python -m benchmarks.kd_table --protocol kd --runs runs/kd

One run by hand:

  python -m launch.train --config configs/kd_citeulike.py:teacher --workdir runs/kd/teacher
  python -m launch.train --config configs/kd_citeulike.py:cd --workdir runs/kd/cd_s0 \
      --config.teacher_init=runs/kd/teacher          # likewise every method in METHODS

Append `,quick` to the argument (e.g. `:cd,quick`; `launch.sweep --quick`) for a minutes-long
smoke run. Expected time on the 2-core CPU: the teacher ~15 min (early-stopped near epoch 200), a
student run 5-60 min; HetComp ~75 min, DE and HTD hours (~30 s and ~47 s an epoch).

Overrides as `name=value` parts of the argument: a method setting of the table below (e.g.
`:cd,lambda_kd=1.0,pool_size=500`, `:unkd,pair_swap=intended`, `:rd,renormalize_weights=true`;
the value is parsed as the setting's type), or `patience=N`, `epochs=N` (the distillation
phase's) and `checkpoint_every=N`. E.g. the early-stopping diagnostics `:de,patience=100,epochs=200`
and `:ftd,patience=100,epochs=300`, and HTD resumable across sessions with
`:htd,checkpoint_every=5 --config.max_epochs_per_run=20` (rerun the same command to continue).

CD ablation on validation (`CD_ABLATION` lists the arms as config arguments): the
benchmark's CD (`cd`: student-guided, lambda 0.5, pool P 3000, rank temperature T 20, t1 2, n 2)
with one factor moved at a time: lambda 0.1 / 1 / 2, P 500 / 1000, T 1 / 0.1 (at T 20,
q(r) ∝ exp(-r / (P T)) is nearly uniform over the pool: q(P) / q(1) = 0.95; at T 0.1 it is
e^-10), t1 1 / 5. Compare the arms on the best validation NDCG@10 (results.json:
phases.distill.student.val, and the per-epoch validations in metrics.jsonl), never on test;
three seeds (`--config.runs.seeds=0,1,2`) where arms differ by less than a seed's spread.
What the published table used (woriazzc/RCEKD configs/citeulike/bpr/cd.yaml, identical to
woriazzc/KDs's): `cd_strategy: "student guide"`, lmbda 0.5, cd_sample_num (P) 3000, cd_T 20,
cd_n_distill 2, cd_t1 2, cd_t2 0, wd 1e-8, lr 1e-3, batch 2048, 1000 epochs: this file's `cd`.

Protocol (woriazzc/RCEKD and its parent framework woriazzc/KDs): the shipped users.dat, users with
>= 5 items, no item filter; per user in file order (ascending item id) the first floor(0.8 n)
items train, the next floor(0.9 n) - floor(0.8 n) validation, the rest test (98,405 / 12,451 /
14,724 pairs; 701 users have no validation item). Full ranking with only the training items
excluded; Recall@K (hits / held-out items) and NDCG@K at 10 and 20, averaged over all users (a
user without validation items counts 0, as there). Evaluation every epoch, early stopping on
validation NDCG@10 with patience 30, test at the best validation epoch. BPR-MF teacher d = 400
and student d = 20 (init N(0, 0.01)), summed BPR with one uniform unobserved negative per
positive, batch 2048, Adam 1e-3 with coupled weight decay (1e-3 for teacher and student trained
alone; per method below, from that benchmark's configs), up to 1000 epochs; the KD student
trains from scratch with L = L_BPR + lambda L_KD.
"""
import ml_collections

from kdrec_jax import methods
from kdrec_jax.data import default_data_config

METHODS = ("teacher", "none", "cd", "cd_t01", "cd_teacher", "cd_teacher_redraw", "rd", "rd_renorm",
           "de", "rrd", "de_rrd", "dcd", "dcd_kds", "ftd", "htd", "unkd", "unkd_intended", "rce_kd")
# Methods with several frozen teachers or teacher trajectories (config.teachers,
# config.teacher_trajectory): they need the loop's several-teacher support. HetComp's teacher
# workdir must hold trajectory checkpoints:
#   python -m launch.train --config configs/kd_citeulike.py:teacher --workdir runs/kd/teacher
#   (its warm-up keeps the checkpoints at `warmup.keep_epochs`, 50, 100 and 150; those at or
#   after the teacher's best epoch are not part of its trajectory and are left out).
# 'hetcomp': the RCE-KD benchmark's HetComp (configs/citeulike/bpr/hetcomp.yaml there, run.sh
#   `--ckpt_interval=50`): ONE teacher, the BPR-MF teacher, and its checkpoints every 50 epochs.
#   They keep only the checkpoints from before the teacher's best epoch and use the first 3 of
#   [those, the best teacher] as the stages; so does this library (the recorded teacher's best
#   epoch is 74: stages 50 and final; a teacher whose best epoch is past 100 gives three).
# 'hetcomp_mf_lgcn': heterogeneous, as the HetComp paper (not a benchmark setting): the BPR-MF
#   teacher and a LightGCN teacher (RCE-KD's CiteULike LightGCN teacher: d 2000, 3 layers, init
#   std 0.1, trained alone with wd 1e-7), each with checkpoints at 50, 100, 150; point
#   `--config.teachers.lgcn.init` at the LightGCN teacher's workdir.
MULTI_TEACHER = ("hetcomp", "hetcomp_mf_lgcn")
# The CD ablation's arms (module docstring), each a config argument for `get_config`.
CD_ABLATION = ("cd", "cd,lambda_kd=0.1", "cd,lambda_kd=1.0", "cd,lambda_kd=2.0",
               "cd,pool_size=500", "cd,pool_size=1000", "cd,rank_temperature=1.0",
               "cd,rank_temperature=0.1", "cd,t1=1.0", "cd,t1=5.0")
PHASE_OVERRIDES = ("patience", "epochs", "checkpoint_every")


def _opt(lr, weight_decay):
  return ml_collections.ConfigDict(dict(lr=lr, weight_decay=weight_decay))


# Each arm of the protocol: (method, its settings changed from the method's defaults, the
# student's weight decay in that benchmark's config for it).
ARMS = {
    "teacher": ("none", {}, 1e-3),
    "none": ("none", {}, 1e-3),
    "cd": ("cd", {}, 1e-8),
    # The rank temperature the CD ablation chose on validation (docs/results/kd.md): T 20 over a
    # pool of 3000 draws nearly uniformly from the pool, T 0.1 mostly from its top few hundred.
    "cd_t01": ("cd", dict(rank_temperature=0.1), 1e-8),
    # Teacher-guided: the items drawn once per phase, as KDs/UnKD's CD (redraw_every_epoch True:
    # redrawn from the teacher's pool every epoch, this library's earlier behaviour).
    "cd_teacher": ("cd", dict(guide="teacher", redraw_every_epoch=False), 1e-8),
    "cd_teacher_redraw": ("cd", dict(guide="teacher", redraw_every_epoch=True), 1e-8),
    # No CiteULike RD config exists in that benchmark: the authors' code's defaults. The earlier
    # setting: lambda_kd=0.5, renormalize_weights=True.
    "rd": ("rd", {}, 1e-5),
    "rd_renorm": ("rd", dict(renormalize_weights=True, lambda_kd=0.5), 1e-5),
    "de": ("de", {}, 1e-4),
    "rrd": ("rrd", {}, 1e-5),
    "de_rrd": ("de_rrd", {}, 1e-5),
    "dcd": ("dcd", {}, 1e-5),  # the authors' DCD
    # The benchmark's own DCD (woriazzc/KDs cf/baseline.py::DCD), this library's earlier `dcd`.
    "dcd_kds": ("dcd", dict(variant="kds", refresh_every=1), 1e-5),
    "ftd": ("ftd", {}, 1e-8),  # no CiteULike FTD config there: HTD's weight decay
    "htd": ("htd", {}, 1e-8),
    "unkd": ("unkd", {}, 1e-8),
    # The pairs as intended (better, worse), this library's earlier UnKD.
    "unkd_intended": ("unkd", dict(pair_swap="intended"), 1e-8),
    "rce_kd": ("rce_kd", {}, 1e-5),
    "hetcomp": ("hetcomp", {}, 1e-3),
    "hetcomp_mf_lgcn": ("hetcomp", {}, 1e-3),
}


# The table (benchmarks/kd_table.py): the order of its rows, labels where an arm's differs from
# its method's (`kdrec_jax.methods.label`), and RCE-KD's published Table 1 (MF -> MF on
# CiteULike, mean of 5 runs): Recall@10, NDCG@10, Recall@20, NDCG@20.
TABLE_ORDER = ("teacher", "none", "cd", "cd_t01", "cd_teacher", "cd_teacher_redraw", "rd",
               "rd_renorm", "de", "de_p100", "rrd", "de_rrd", "dcd", "dcd_kds", "ftd", "ftd_p100",
               "htd", "unkd", "unkd_intended", "rce_kd", "hetcomp")
LABELS = {
    "teacher": "teacher (MF d=400)", "none": "student d=20, no KD", "cd": "CD, student-guided",
    "cd_t01": "CD, student-guided, rank temperature 0.1 (chosen on validation)",
    "cd_teacher": "CD, teacher-guided (items drawn once)",
    "cd_teacher_redraw": "CD, teacher-guided, items redrawn every epoch",
    "rd_renorm": "RD, weights renormalised, λ 0.5", "dcd": "DCD (authors')",
    "dcd_kds": "DCD (KDs)", "unkd_intended": "UnKD, intended pair swap",
    "de_p100": "DE, patience 100, ≤ 200 epochs (diagnostic)", "de_rrd": "DE-RRD, ≤ 80 epochs",
    "ftd_p100": "FTD, patience 100, ≤ 300 epochs (diagnostic)",
}
PUBLISHED = {
    "teacher": (.0283, .0155, .0442, .0198),
    "none": (.0177, .0098, .0284, .0128),
    "cd": (.0239, .0131, .0347, .0158),
    "rrd": (.0251, .0135, .0362, .0169),
    "dcd_kds": (.0254, .0136, .0375, .0173),  # the benchmark's own DCD (KDs)
    "hetcomp": (.0255, .0135, .0391, .0177),
    "rce_kd": (.0278, .0152, .0431, .0194),
}


# LightGCN -> LightGCN (`,lightgcn`): the benchmark's CiteULike LightGCN configs
# (configs/citeulike/lightgcn/*.yaml there): teacher d 2000, 3 layers, init 0.1, trained alone
# with wd 1e-7; student d 20, 3 layers, wd 1e-3 alone; per method the settings that differ from
# the MF ones and the student's weight decay.
LIGHTGCN = {
    "rrd": (dict(lambda_rrd=0.01, top_m=500, num_interesting=50, num_uninteresting=100,
                 temperature=10.0), 1e-5),
    "rce_kd": (dict(lambda_kd=500.0, tau=1.0, top_k=50, num_interesting=100,
                    sample_temperature=10.0, top_m=200, beta=10.0), 1e-5),
}


def label(arm: str) -> str:
  """The arm's row label in the protocol's table."""
  if arm in LABELS:
    return LABELS[arm]
  return methods.label(ARMS[arm][0]) if arm in ARMS else arm


def method_config(name: str):
  """(method settings, the student's weight decay) for the arm `name` in `ARMS`: the method's
  defaults (`kdrec_jax.methods.defaults`) with the arm's changes."""
  if name not in ARMS:
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS + MULTI_TEACHER}")
  method, changes, wd = ARMS[name]
  return methods.defaults(method, **changes, lists_budget_mb=2048, list_chunk=256), wd

# Seeds of the recorded sweep (results/kd, `launch.sweep --vmap_seeds`: an arm's seeds as one
# program): 0, 1, 2 for every arm but the two early-stopping diagnostics (seed 0).
SEEDS = (0, 1, 2)


def sweep_arms(quick: bool = False) -> list[dict]:
  """The protocol's runs for `python -m launch.sweep` (arm format: launch/sweep.py): the teacher
  once (folder `teacher`), then every method's students distilled from it on the seeds of
  `SEEDS` (folders `<method>_s<seed>`, or `<method>/s<seed>` with
  `--vmap_seeds`, the recorded table's layout; `teacher_init` = the teacher's folder), plus the
  FTD and DE diagnostics with patience 100 over at most 300 and 200 epochs (`ftd_p100`,
  `de_p100`). DE-RRD is capped at 80 epochs as its archived row (CPU time: DE's experts, ~30 s an
  epoch per run on a 2-core CPU; `--set de_rrd:distill.epochs=1000` runs the full schedule). HTD
  (~50 s per epoch on a CPU) and the LightGCN -> LightGCN arms (`lgcn:...`) run only when named,
  e.g. `--arms htd`."""
  q = ",quick" if quick else ""
  file = "configs/kd_citeulike.py"
  arms = [dict(id="teacher", config=f"{file}:teacher{q}", folder="teacher",
               fixed={"distill.epochs": 0})]
  extra = {"de_rrd": {} if quick else {"distill.epochs": 80}}
  for name in METHODS[1:]:
    arms.append(dict(id=name, config=f"{file}:{name}{q}", folder=name + "_s{seed}",
                     seeds=SEEDS, set=extra.get(name, {}),
                     needs={"teacher_init": "teacher"}, default=name != "htd"))
  # The early-stopping diagnostics: patience 100 over at most 300 (FTD) and 200 (DE) epochs (DE:
  # ~45 s an epoch on a 2-core CPU, ~2.5 h; recorded in results/kd/de_p100).
  for name, epochs in (("ftd", 300), ("de", 200)):
    arms.append(dict(id=f"{name}_p100", config=f"{file}:{name}{q}", folder=name + "_p100_s{seed}",
                     seeds=(0,), needs={"teacher_init": "teacher"},
                     set={"distill.patience": 100,
                          **({} if quick else {"distill.epochs": epochs})}))
  # HetComp distils from the teacher's trajectory: the teacher workdir's kept checkpoints (~12 s
  # an epoch per run and ~350 epochs on a 2-core CPU).
  arms.append(dict(id="hetcomp", config=f"{file}:hetcomp{q}", folder="hetcomp_s{seed}",
                   seeds=(0, 1, 2), needs={"teacher_init": "teacher"}))
  # The LightGCN -> LightGCN table (`,lightgcn`; a d = 2000 teacher: run when named,
  # `--arms lgcn`).
  arms.append(dict(id="lgcn:lgcn_teacher", config=f"{file}:teacher,lightgcn{q}",
                   folder="lgcn_teacher", fixed={"distill.epochs": 0}, default=False))
  for name in ("none", "rrd", "rce_kd"):
    arms.append(dict(id=f"lgcn:lgcn_{name}", config=f"{file}:{name},lightgcn{q}",
                     folder=f"lgcn_{name}" + "_s{seed}", seeds=(0,),
                     needs={"teacher_init": "lgcn:lgcn_teacher"}, default=False))
  return arms


def _parse(text: str, like):
  """`text` as the type of `like` (bool, int, float or str)."""
  if isinstance(like, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected a boolean, got {text!r}")
    return text.lower() in ("true", "1")
  return type(like)(text)


def get_config(arg: str = ""):
  parts = [p for p in arg.split(",") if p]
  quick = "quick" in parts
  overrides = dict(p.split("=", 1) for p in parts if "=" in p)
  lightgcn = "lightgcn" in parts
  names = [p for p in parts if p not in ("quick", "lightgcn") and "=" not in p] or ["none"]
  if len(names) != 1:
    raise ValueError(f"config arg: one method of {METHODS}, optionally ',lightgcn', ',quick' "
                     f"and ',name=value' overrides; got {arg!r}")
  name = names[0]
  method, wd = method_config(name)
  if lightgcn:  # the benchmark's LightGCN -> LightGCN settings where they differ
    changes, wd = LIGHTGCN.get(name, ({}, wd))
    method.update(changes)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = default_data_config()
  c.data.update(dict(split="ratio", ratio_order="file", ratio_rounding="floor", val_ratio=0.1,
                     test_ratio=0.1, min_user_interactions=5))
  c.teacher = ml_collections.ConfigDict(dict(name="bpr_mf", dim=400, init_std=0.01))
  c.student = ml_collections.ConfigDict(dict(name="bpr_mf", dim=20, init_std=0.01))
  if lightgcn:
    c.teacher = ml_collections.ConfigDict(dict(name="lightgcn", dim=2000, num_layers=3,
                                               init_std=0.1))
    c.student = ml_collections.ConfigDict(dict(name="lightgcn", dim=20, num_layers=3,
                                               init_std=0.1))
  c.batch_size = 2048
  c.num_devices = 0
  epochs = 3 if quick else 1000
  # The teacher's checkpoints at these epochs are kept: its training trajectory (HetComp).
  trajectory = (1, 2) if quick else (50, 100, 150)
  teacher_wd = 1e-7 if lightgcn else 1e-3  # the LightGCN teacher's config: wd 1e-7
  c.warmup = ml_collections.ConfigDict(dict(
      epochs=epochs, models=("teacher",), teacher=_opt(1e-3, teacher_wd),
      student=_opt(1e-3, 1e-3), patience=30, stop_metric="NDCG@10", keep_epochs=trajectory))
  c.distill = ml_collections.ConfigDict(dict(
      epochs=0 if name == "teacher" else epochs, teacher=_opt(1e-3, 0.0),
      student=_opt(1e-3, wd), method=_opt(1e-3, wd), patience=30, stop_metric="NDCG@10"))
  c.control = False  # the no-KD student is its own run (method 'none'), shared by all methods
  c.method = method
  c.eval = ml_collections.ConfigDict(dict(
      ks=(10, 20), chunk_size=1024, protocol="full", num_negatives=499, exclude_other=False,
      average="all", popularity_groups=4))  # 4 popularity groups for the phase-end bias metrics
  c.eval_every = 1
  c.log_every = 1 if quick else 10
  c.checkpoint_every = 1 if quick else 20
  c.checkpoint_keep = 1
  c.max_epochs_per_run = 0
  c.teacher_init = ""
  c.warmup_from = ""
  if name in MULTI_TEACHER:  # trajectory epochs of the teacher (see MULTI_TEACHER above)
    c.teacher_trajectory = trajectory
    c.teachers = ml_collections.ConfigDict()
  if name == "hetcomp_mf_lgcn":
    c.teachers.lgcn = ml_collections.ConfigDict(dict(
        model=ml_collections.ConfigDict(dict(name="lightgcn", dim=2000, num_layers=3,
                                             init_std=0.1)),
        init="", trajectory=trajectory))
  for key, text in overrides.items():
    if key in PHASE_OVERRIDES:
      node, leaf = (c, key) if key == "checkpoint_every" else (c.distill, key)
      node[leaf] = int(text)
    elif key in c.method and key != "name":
      c.method[key] = _parse(text, c.method[key])
    else:
      raise ValueError(f"config arg: {key!r} is neither a setting of method {name!r} "
                       f"({', '.join(k for k in c.method if k != 'name')}) nor one of "
                       f"{PHASE_OVERRIDES}")
  return c
