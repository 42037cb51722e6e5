"""Teacher->student schedule: a frozen teacher (trained in a warm-up or loaded with teacher_init
from a workdir or a params directory) is never updated nor checkpointed by the distillation
phase; resuming is bit-identical; a different teacher is refused; early stopping keeps the best
state and reports test at the best validation epoch; the RCE-KD protocol's split and evaluation."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from conftest import kd_config
from kdrec_jax import checkpoint, data, metrics, train, workdir
from kdrec_jax.checkpoint import PhaseCheckpoints
from kdrec_jax.data.interactions import Interactions

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the quick tier


@pytest.fixture(scope="module")
def teacher_dir(citeulike_file, tmp_path_factory):
  """A workdir whose warm-up trained only the teacher (3 epochs, early-stopping bookkeeping)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  cfg = kd_config(citeulike_file, "teacher", num_devices=1, warmup__epochs=3)
  results = train.train_and_evaluate(cfg, workdir)
  assert set(results["phases"]) == {"warmup"}
  assert set(results["phases"]["warmup"]) >= {"teacher", "best_epoch", "epochs"}
  assert "student" not in results["phases"]["warmup"]  # not trained, not evaluated
  return workdir


def _test_metrics(results, phase, model):
  return results["phases"][phase][model]["test"]


def test_frozen_teacher_resume_is_bit_identical(teacher_dir, citeulike_file, tmp_path):
  cfg = kd_config(citeulike_file, "cd", num_devices=1, distill__epochs=4,
                  teacher_init=teacher_dir)
  a = train.train_and_evaluate(cfg, str(tmp_path / "a"))
  # The loaded teacher is evaluated, not retrained: the same metrics as its own workdir.
  with open(os.path.join(teacher_dir, "results.json")) as f:
    own = json.load(f)["phases"]["warmup"]["teacher"]["test"]
  assert _test_metrics(a, "warmup", "teacher") == own
  assert _test_metrics(a, "distill", "teacher") == own
  assert a["teacher"]["source"] == teacher_dir and len(a["teacher"]["sha256"]) == 64
  # The distillation checkpoint holds the student only.
  raw = PhaseCheckpoints(str(tmp_path / "a" / "checkpoints"), "distill").restore_raw()
  assert "teacher" not in raw and "student" in raw and "best" in raw
  # Interrupted every 3 epochs (mid-phase), then resumed: the same numbers, bit for bit.
  cfg_b = kd_config(citeulike_file, "cd", num_devices=1, distill__epochs=4,
                    teacher_init=teacher_dir, max_epochs_per_run=3)
  for _ in range(4):
    b = train.train_and_evaluate(cfg_b, str(tmp_path / "b"))
    if "distill" in b["phases"]:
      break
  assert _test_metrics(b, "distill", "student") == _test_metrics(a, "distill", "student")
  assert b["phases"]["distill"]["best_epoch"] == a["phases"]["distill"]["best_epoch"]
  # Resuming that workdir against another teacher is refused.
  other = kd_config(citeulike_file, "teacher", num_devices=1, warmup__epochs=1, seed=3)
  train.train_and_evaluate(other, str(tmp_path / "other"))
  cfg_c = kd_config(citeulike_file, "cd", num_devices=1, distill__epochs=4,
                    teacher_init=teacher_dir, max_epochs_per_run=1)
  train.train_and_evaluate(cfg_c, str(tmp_path / "c"))
  cfg_c.teacher_init = str(tmp_path / "other")
  with pytest.raises(ValueError, match="use a new workdir"):
    train.train_and_evaluate(cfg_c, str(tmp_path / "c"))


def test_teacher_init_from_params_dir(teacher_dir, citeulike_file, tmp_path):
  raw = PhaseCheckpoints(os.path.join(teacher_dir, "checkpoints"), "warmup").restore_raw()
  checkpoint.save_params(str(tmp_path / "teacher_params"), raw["best"]["params"]["teacher"])
  runs = {}
  for name, source in (("workdir", teacher_dir), ("params", str(tmp_path / "teacher_params"))):
    cfg = kd_config(citeulike_file, "none", num_devices=1, distill__epochs=1,
                    teacher_init=source)
    runs[name] = train.train_and_evaluate(cfg, str(tmp_path / name))
  assert runs["params"]["teacher"]["sha256"] == runs["workdir"]["teacher"]["sha256"]
  assert (_test_metrics(runs["params"], "distill", "student")
          == _test_metrics(runs["workdir"], "distill", "student"))
  bad = kd_config(citeulike_file, "none", num_devices=1, teacher_init=str(tmp_path / "nowhere"),
                  teacher__dim=5)
  with pytest.raises(FileNotFoundError, match="neither a workdir"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))
  bad.teacher_init = str(tmp_path / "params")  # a workdir whose teacher was loaded, not trained
  with pytest.raises(FileNotFoundError, match="did not train a teacher"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))
  bad.teacher_init = str(tmp_path / "teacher_params")
  with pytest.raises(ValueError, match="do not fit the configured teacher"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))
  # A teacher's warm-up stopped before its end (checkpoints exist, the phase is not finished).
  half = str(tmp_path / "half")
  train.train_and_evaluate(kd_config(citeulike_file, "teacher", num_devices=1, warmup__epochs=3,
                                     max_epochs_per_run=1), half)
  assert os.listdir(os.path.join(half, "checkpoints", "warmup"))
  bad.teacher_init, bad.teacher.dim = half, 8
  with pytest.raises(FileNotFoundError, match="has no finished warm-up"):
    train.train_and_evaluate(bad, str(tmp_path / "bad2"))


def test_early_stopping_reports_the_best_epoch(teacher_dir, citeulike_file, tmp_path):
  cfg = kd_config(citeulike_file, "none", num_devices=1, distill__epochs=40,
                  distill__patience=2, teacher_init=teacher_dir)
  cfg.distill.student.lr = 0.05  # noisy validation curve: stops early
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(cfg, str(workdir))
  done = results["phases"]["distill"]
  assert done["stopped_early"] and done["epochs"] == done["best_epoch"] + 2 < 40
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  vals = {r["epoch"]: r["eval"]["student"]["val"]["NDCG@10"] for r in records
          if r["phase"] == "distill" and "eval" in r and not r.get("final")}
  assert sorted(vals) == list(range(1, done["epochs"] + 1))
  best = max(vals, key=lambda e: (vals[e], -e))  # the first epoch with the best value
  assert best == done["best_epoch"]
  # The reported validation (and test) metrics are the best epoch's, not the last epoch's.
  assert done["student"]["val"]["NDCG@10"] == pytest.approx(vals[best], abs=1e-7)
  assert vals[done["epochs"]] < vals[best]


# ---------------------------------------------------------------------------------------------
# the RCE-KD protocol's data and evaluation
# ---------------------------------------------------------------------------------------------

def test_rcekd_split_of_the_shipped_citeulike():
  cfg = kd_config("", "none").data
  cfg.path = ""  # the shipped users.dat
  inter = data.load(cfg)
  assert (inter.num_users, inter.num_items) == (5219, 25181)
  assert (inter.num_train, len(inter.val_indices), len(inter.test_indices)) == (98405, 12451,
                                                                                14724)
  assert int(np.sum(np.diff(inter.val_indptr) == 0)) == 701
  assert int(np.sum(np.diff(inter.test_indptr) == 0)) == 0


def test_floor_ratio_split_by_hand():
  rec = data.Records(source="x", users=np.repeat(np.arange(4), [5, 10, 12, 35]),
                     items=np.concatenate([np.arange(n) for n in (5, 10, 12, 35)]),
                     order=np.arange(62), num_users=4, num_items=35)
  inter = data.ratio_split(rec, val_ratio=0.1, test_ratio=0.1, order="file", rounding="floor")
  sizes = {s: np.diff(inter.split(s)[0]).tolist() for s in ("train", "val", "test")}
  # floor(0.8 n) train (0.8 * 35 = 28 exactly), floor(0.9 n) - floor(0.8 n) val, the rest test.
  assert sizes == {"train": [4, 8, 9, 28], "val": [0, 1, 1, 3], "test": [1, 1, 2, 4]}
  # File order: the first items train, the last ones test.
  np.testing.assert_array_equal(inter.split("test")[1][-4:], [31, 32, 33, 34])


def test_evaluation_without_excluding_the_other_split_averaged_over_all_users():
  # 3 users x 4 items; user 2 has no validation item.
  inter = Interactions.from_rows("t", 4, train=[[0], [1], [2]], val=[[1], [0], []],
                                 test=[[2], [3], [1]])
  scores = np.array([[0.0, 0.5, 0.9, 0.1],   # test item 2 ranks 1st; val item 1 ranks 2nd
                     [0.9, 0.0, 0.1, 0.5],   # test item 3 is 2nd only if val item 0 counts
                     [0.1, 0.2, 0.0, 0.3]], np.float32)
  fn = lambda p, users: p[users]  # noqa: E731
  kw = dict(ks=(1,), chunk_size=2)
  test_all = metrics.Evaluator(inter, "test", exclude_other=False, average="all", **kw)
  test_excl = metrics.Evaluator(inter, "test", **kw)
  assert test_all(fn, scores)["Recall@1"] == pytest.approx(1 / 3)  # user 1's val item 0 wins
  assert test_excl(fn, scores)["Recall@1"] == pytest.approx(2 / 3)
  val_all = metrics.Evaluator(inter, "val", exclude_other=False, average="all", **kw)
  val_heldout = metrics.Evaluator(inter, "val", exclude_other=False, **kw)
  # User 0: val item 1 is behind test item 2; user 1: val item 0 is first. User 2 counts 0.
  assert val_all(fn, scores)["HR@1"] == pytest.approx(1 / 3)
  assert val_heldout(fn, scores)["HR@1"] == pytest.approx(1 / 2)
  with pytest.raises(ValueError, match="average"):
    metrics.Evaluator(inter, "val", average="mean")


def test_frozen_teacher_is_left_out_of_the_step_state_updates(teacher_dir, citeulike_file):
  """One distillation epoch moves the student only; the teacher has no optimizer state."""
  cfg = kd_config(citeulike_file, "rrd", num_devices=1, teacher_init=teacher_dir)
  exp = train.Experiment(cfg)
  program = train.build_phase(exp, "distill")
  teacher = workdir.load_teacher(teacher_dir, exp.models["teacher"].init(jax.random.key(0)))
  state = program.initial_state({"teacher": teacher})
  assert "teacher" not in state.opt and "student" in state.opt
  state, _ = program.refresh(state, jax.random.key(1), 0)
  before = jax.tree.map(np.asarray, state.params["teacher"])
  student_before = jax.tree.map(np.asarray, state.params["student"])
  out, m = program.run_epoch(state, jax.random.key(2), 0)
  for k in before:
    np.testing.assert_array_equal(np.asarray(out.params["teacher"][k]), before[k])
    assert np.abs(np.asarray(out.params["student"][k]) - student_before[k]).max() > 1e-4
  assert "cf_teacher" not in m and "loss_teacher" not in m  # its own loss is not computed
  assert float(m["rrd"]) > 0
