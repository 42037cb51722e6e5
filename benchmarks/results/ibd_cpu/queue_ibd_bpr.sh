#!/usr/bin/env bash
# iBD protocol (issue 10), BPR-MF: the BD-config warm-up (1000 epochs, seed 0, /work/runs/bd/warm)
# shared by every run; per seed, BD and the iBD arms (100 distillation epochs each, ranks refreshed
# every 10); several instances may run at once (a lock dir per run); histogram ranks + pre-drawn samples (the library's fast path) for all of them.
cd ${SRC:-/work/runsrc7}
. /work/venv/bin/activate
R=/work/runs/ibd
mkdir -p $R
FAST="--config.method.rank_buckets=8192 --config.method.sampling_state=draws"
done_() { [ -f $1/results.json ] && python -c "import json,sys; p=json.load(open('$1/results.json'))['phases']; sys.exit(0 if 'distill' in p else 1)"; }
run() {  # run <name> <config> [flags...]
  wd=$R/$1; shift; cfg=$1; shift
  done_ $wd && return
  mkdir $wd.lock 2>/dev/null || return  # another queue instance has it (rm -r *.lock to resume after a kill)
  start=$(date +%s)
  python -m launch.train --config $cfg --workdir $wd --config.warmup_from=/work/runs/bd/warm $FAST "$@" > $wd.log 2>&1
  echo "$(basename $wd) rc $? wall $(( $(date +%s) - start )) s" >> $R/walltimes.txt
}
for seed in ${SEEDS:-0 1 2}; do
  run bpr_s${seed}_bd configs/bd_bpr_citeulike.py --config.seed=$seed --config.control=False
  for arm in "b1:--config.method.beta=1.0" "random:--config.method.feedback=random" \
             "strict:--config.method.strict=True" "b05:--config.method.beta=0.5" "b2:--config.method.beta=2.0"; do
    run bpr_s${seed}_${arm%%:*} configs/ibd_citeulike.py:bpr --config.seed=$seed ${arm#*:}
  done
done
