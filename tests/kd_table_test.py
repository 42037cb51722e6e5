"""The results tables (benchmarks/kd_table.py): iBD's beta chosen on validation, the
gains against BD, mean ± std over seeds; pure Python, no training."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import kd_table
from conftest import REPO_ROOT


def _phases(student_val, student_test, teacher_test=0.2):
  metrics = lambda hr: {"HR@50": hr, "NDCG@50": hr / 4}  # noqa: E731
  phase = {"teacher": {"val": metrics(teacher_test), "test": metrics(teacher_test)},
           "student": {"val": metrics(student_val), "test": metrics(student_test)}}
  return {"warmup": phase, "distill": phase}


def test_ibd_table_picks_beta_on_validation_not_test():
  runs = {}
  for seed in (0, 1):
    runs[f"bpr_s{seed}_bd"] = _phases(0.10, 0.100)
    runs[f"bpr_s{seed}_b05"] = _phases(0.12, 0.090)  # best on validation, worse on test
    runs[f"bpr_s{seed}_b1"] = _phases(0.11, 0.200)   # best on test: must not be chosen
    runs[f"bpr_s{seed}_random"] = _phases(0.10, 0.105)
  runs["bpr_s0_b2"] = {"warmup": {}}  # unfinished: no distill phase, left out
  table = kd_table.ibd_table(runs)
  lines = table.splitlines()
  chosen = [line for line in lines if "chosen on validation" in line]
  assert len(chosen) == 1 and "(β = 0.5 among 0.5, 1)" in chosen[0] and "-10.0%" in chosen[0]
  assert any(line.startswith("| BPR-MF | random feedback") and "+5.0% | +5.0 / +5.0% |" in line
             for line in lines)
  assert not any("β = 2 |" in line for line in lines)
  bd = next(line for line in lines if "| BD |" in line)
  assert "0,1" in bd and "0.1000 ± 0.0000" in bd


def test_ibd_table_chooses_beta_on_the_seeds_every_beta_arm_has():
  runs = {f"bpr_s{seed}_bd": _phases(0.10, 0.100) for seed in (0, 1, 2)}
  runs["bpr_s0_b05"] = _phases(0.11, 0.090)
  runs["bpr_s0_b2"] = _phases(0.12, 0.110)  # best on seed 0, the only seed all beta arms have
  for seed, val in ((0, 0.10), (1, 0.30), (2, 0.30)):  # best mean over its own seeds
    runs[f"bpr_s{seed}_b1"] = _phases(val, 0.100)
  chosen = [line for line in kd_table.ibd_table(runs).splitlines() if "chosen" in line]
  assert len(chosen) == 1 and "seed 0 (β = 2)" in chosen[0] and "+10.0%" in chosen[0]


def test_ibd_table_has_no_choice_with_one_beta_arm():
  runs = {"cdae_s0_bd": _phases(0.10, 0.100), "cdae_s0_b1": _phases(0.11, 0.110),
          "cdae_s0_random": _phases(0.10, 0.105)}
  lines = kd_table.ibd_table(runs).splitlines()
  assert not any("chosen" in line for line in lines)
  assert any(line.startswith("| CDAE | iBD β = 1 |") and "+10.0% | — |" in line for line in lines)


def test_ibd_table_gains_seed_by_seed():
  runs = {"neumf_s0_bd": _phases(0.1, 0.100), "neumf_s1_bd": _phases(0.1, 0.200),
          "neumf_s0_b1": _phases(0.1, 0.110), "neumf_s1_b1": _phases(0.1, 0.180)}
  b1 = next(line for line in kd_table.ibd_table(runs).splitlines() if "β = 1 |" in line)
  # the mean's gain (0.145 against 0.15) and the per-seed ones, in seed order
  assert b1.endswith("| -3.3% | +10.0 / -10.0% |")


def test_ub_table_lists_groups_and_shares():
  test = {"Recall@20": 0.1, "NDCG@20": 0.05, "Recall@20/g0": 0.2, "Recall@20/g1": 0.01,
          "Share@20/g0": 0.7, "Share@20/g1": 0.3}
  runs = {"cite_none": {"distill": {"student": {"test": test}}},
          "cite_teacher": {"warmup": {"teacher": {"test": test}}}}
  lines = kd_table.ub_table(runs).splitlines()
  assert "R@20 g0 | R@20 g1 | share g0 | share g1" in lines[0]
  assert lines[2].startswith("| citeulike | teacher") and "0.7000 | 0.3000 |" in lines[3]


def test_ub_table_adds_unkd_weight_variants():
  test = {"Recall@20": 0.1, "NDCG@20": 0.05, "Recall@20/g0": 0.2, "Share@20/g0": 0.7}
  phases = {"distill": {"student": {"test": test}}}
  lines = kd_table.ub_table({"cite_unkd": phases, "cite_unkd_intended": phases,
                             "cite_unkd_intended_l0.1": phases}).splitlines()
  assert [line.split(" | ")[1] for line in lines[2:]] == [
      "UnKD (the authors' pairs)", "UnKD, intended pair swap",
      "UnKD, intended pair swap, λ = 0.1"]


def _td_runs(root):
  """A teacher and one d=10 student of the topology protocol, as results.json files."""
  test = {"HR@50": 0.25, "NDCG@50": 0.125}
  for name, phases in (("teacher", {"warmup": {"teacher": {"test": test}, "seconds": 60.0}}),
                       ("none_d10", {"distill": {"student": {"test": test}, "seconds": 120.0}})):
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "results.json"), "w") as f:
      json.dump({"phases": phases}, f)


@pytest.mark.slow
def test_table_is_written_between_the_markers_of_the_results_page(tmp_path):
  _td_runs(str(tmp_path / "td"))
  page = tmp_path / "td.md"
  page.write_text("# page\n\n<!-- TD_TABLE -->\nold table\n<!-- /TD_TABLE -->\n\nafter\n")
  for flag in ("--out", "--readme"):  # --readme: the flag's older name, an alias
    page.write_text(page.read_text().replace(kd_table.table("td", str(tmp_path / "td")),
                                             "old table"))
    subprocess.run([sys.executable, "-m", "benchmarks.kd_table", "--protocol=td",
                    f"--runs={tmp_path / 'td'}", f"{flag}={page}"], cwd=REPO_ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    text = page.read_text()
    assert "old table" not in text and text.startswith("# page\n") and text.endswith("after\n")
    assert "| teacher d=200 | — | 0.2500 | 0.1250 | 0.3123 | 1 min |" in text
    assert "| d=10 | alone | 0.2500 | 0.1250 | 0.1788 | 2 min |" in text


def test_write_between_markers_refuses_a_page_without_them(tmp_path):
  page = tmp_path / "x.md"
  page.write_text("no markers\n")
  with pytest.raises(ValueError, match="KD_TABLE"):
    kd_table.write_between_markers(str(page), "KD", "table")


def test_kd_table_lists_a_method_it_has_no_label_for_last():
  test = {"Recall@10": 0.1, "NDCG@10": 0.05, "Recall@20": 0.2, "NDCG@20": 0.1}
  phase = {"student": {"test": test}, "seconds": 60.0, "epochs": 10, "best_epoch": 7}
  runs = {"none_s0": {"distill": phase}, "newkd_s0": {"distill": phase},
          "rrd_s0": {"distill": phase}}
  lines = kd_table.kd_table(runs).splitlines()
  assert [line.split(" | ")[0] for line in lines[2:]] == ["| student d=20, no KD", "| RRD",
                                                          "| newkd"]
