#!/usr/bin/env bash
# iBD protocol (issue 10), all three models, resumable; several instances may run at once (a lock
# dir per run; rm -r $R/*.lock after a kill). Per model one warm-up (seed 0) shared by every run
# through warmup_from; per seed BD and the iBD arms; the library's fast path (histogram ranks,
# pre-drawn samples) everywhere.
#   BPR-MF: the BD config's schedule (1000 warm-up epochs, 100 distillation epochs, refresh 10).
#   NeuMF: shortened: 100 warm-up epochs, 50 distillation epochs (refresh 10).
#   CDAE: shortened: 300 warm-up epochs, 400 distillation epochs (refresh 10), past the 300 where
#   the paper sees the effect.
# BPR-MF seeds 1-2: BD, beta 1 and 2 (2: chosen on seed 0's validation) and the controls; NeuMF
# seeds 1-2: BD, beta 1, then beta 0.5 (chosen on seed 0) and the controls; CDAE seeds 1-2: BD,
# beta 2 (chosen on seed 0, 2026-11-30), the controls, then beta 1 (from 2026-11-30 08:15 UTC;
# earlier beta 1 came before the controls). The controls (strict, random) use beta = 1 and are
# compared with the beta = 1 arm.
# On this 2-core CPU one instance at a time is faster than two (CDAE warm-up: 4.15 s/epoch alone,
# 9.5 s/epoch beside a NeuMF run); from 22:05 UTC on 2026-11-29 one instance ran, jobs as arguments.
# Until 2026-11-30 the arms were spelled as flags (--config.method.beta=0.5, ...strict=True,
# ...feedback=random over configs/ibd_citeulike.py:<model>); the arm names of the config give the
# same configs (tests/ibd_test.py::test_config_and_errors), so resumes and fingerprints match.
cd ${SRC:-/work/runsrc7}
. /work/venv/bin/activate
R=/work/runs/ibd
mkdir -p $R
FAST="--config.method.rank_buckets=8192 --config.method.sampling_state=draws --config.checkpoint_every=10"  # checkpoint_every: not in the fingerprint
has() { [ -f $1/results.json ] && python -c "import json,sys; p=json.load(open('$1/results.json'))['phases']; sys.exit(0 if '$2' in p else 1)"; }
run() {  # run <name> <phase that marks it done> <config> [flags...]
  wd=$R/$1; phase=$2; shift 2; cfg=$1; shift
  has $wd $phase && return
  mkdir $wd.lock 2>/dev/null || return  # another instance has it
  start=$(date +%s)
  python -m launch.train --config $cfg --workdir $wd "$@" >> $wd.log 2>&1  # a resume appends
  echo "$(basename $wd) rc $? wall $(( $(date +%s) - start )) s" >> $R/walltimes.txt
}
declare -A SCHED=([bpr]="" [neumf]="--config.warmup.epochs=100 --config.distill.epochs=50"
                  [cdae]="--config.warmup.epochs=300 --config.distill.epochs=400")
declare -A WARM=([bpr]=/work/runs/bd/warm [neumf]=$R/neumf_warm [cdae]=$R/cdae_warm)
arm() {  # arm <model> <seed> <arm>; returns 1 while its warm-up is not finished
  m=$1; s=$2; a=$3; w=${WARM[$m]}
  has $w warmup || run ${m}_warm warmup configs/bd_${m}_citeulike.py ${SCHED[$m]} \
      --config.distill.epochs=0 --config.control=False
  has $w warmup || return 1  # another instance is training it: come back in the next pass
  common="--config.seed=$s ${SCHED[$m]} --config.warmup_from=$w $FAST"
  # CDAE: no pre-drawn samples (pair batches only); validation every 10 epochs for the curve of
  # the paper's Fig. 3 (evaluation is outside training: the same run with fewer points otherwise)
  [ $m = cdae ] && common="${common/--config.method.sampling_state=draws/} --config.eval_every=10"
  if [ $a = bd ]; then
    run ${m}_s${s}_bd distill configs/bd_${m}_citeulike.py $common --config.control=False
  else  # the arm's flags: configs/ibd_citeulike.py (ARMS)
    run ${m}_s${s}_$a distill configs/ibd_citeulike.py:$m,$a $common
  fi
}
if [ $# -gt 0 ]; then JOBS=("$@"); else  # jobs as arguments ("model seed arm"), or this list
JOBS=("neumf 0 bd" "bpr 1 random" "bpr 1 strict" "neumf 0 b1" "bpr 1 b2" "bpr 2 bd"
      "neumf 0 random" "neumf 0 strict" "bpr 2 b1" "bpr 2 b2" "bpr 2 random" "bpr 2 strict"
      "neumf 0 b2" "neumf 0 b05" "neumf 1 bd" "neumf 1 b1" "neumf 2 bd" "neumf 2 b1"
      "cdae 0 bd" "cdae 0 b1" "cdae 0 random" "cdae 0 strict"
      "neumf 1 b05" "neumf 1 random" "neumf 1 strict" "neumf 2 b05" "neumf 2 random"
      "neumf 2 strict" "cdae 0 b05" "cdae 0 b2" "cdae 1 bd" "cdae 1 b2" "cdae 2 bd"
      "cdae 2 b2" "cdae 1 random" "cdae 1 strict" "cdae 2 random" "cdae 2 strict" "cdae 1 b1"
      "cdae 2 b1"); fi
while true; do  # passes over the list: jobs skipped for a warm-up still training come back
  pending=0
  for job in "${JOBS[@]}"; do arm $job || pending=1; done
  [ $pending = 0 ] && break
  sleep 60
done
