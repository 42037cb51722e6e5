#!/usr/bin/env bash
# One device call for the GPU figures. Run from the repository root on the GPU machine, with the
# ml_collections wheel carried in .whl/ (see the device tool's README); OUT: output folder.
#   bash benchmarks/gpu_run.sh [bench] [cmdbuf] [full] [models] [full_MODEL...]
#   (default: bench full)
#   bench:  benchmark rows (python3 -m benchmarks.bench_bd), BPR-MF
#   cmdbuf: the same rows with while-loop bodies captured as CUDA graphs (command buffers)
#   full:   the whole BPR-MF reference schedule with the control, timed end to end
#   models: benchmark rows for NeuMF, LightGCN and CDAE
#   full_cdae, full_neumf, full_lightgcn: that model's whole schedule with the control
#   kd:     teacher->student rows (python3 -m benchmarks.bench_kd), every method
#   topk:   the top-K / full-ranking rows (python3 -m benchmarks.bench_topk): the
#           evaluation (one split, both in one pass, d = 20 and 400), CD's pool, the top-M lists,
#           BD's rank refresh and the per-k candidates, previous path beside the new
#   kd_htd: the RCE-KD protocol's teacher, then its HTD student (too slow for the 2-core CPU)
#   ibd_cdae: the iBD protocol with CDAE (docs/results/ibd.md; launch.sweep): a 300-epoch warm-up,
#           then BD and the iBD arms for 400 epochs each; IBD_SEEDS (default 0) and IBD_ARMS
#           (default: all; e.g. "bd b1") choose the runs, IBD_SET adds launch.sweep --set
#           overrides; outputs in $OUT/ibd/cdae_s<seed>_<arm>/ for `benchmarks.kd_table`
#   fast:   the BPR-MF rows with pre-drawn samples and histogram ranks; the step profile
#   scale:  BD beyond the table budget on a synthetic 1,000,000 x 200,000 catalogue
#   runs:   seeds as one vmapped program against one after another (benchmarks.bench_runs; and
#           3 runs with 2 stopped, --live 1), and FTD's loss for 3 students under the run axis
#           (benchmarks.bench_ftd_forms --runs 3)
#   kd_seeds: the RCE-KD protocol's default arms over 3 seeds, each arm one vmapped program
#   kd_slow: the rows the 2-core CPU cannot finish in a session: DE and DE-RRD on the full
#           schedule (patience 30, no 80-epoch cap) and HTD, seeds 0-2 as one program each
#   lgcn:   the LightGCN -> LightGCN table (teacher d 2000; none, RRD, RCE-KD)
#   kd_new: the rows rerun with the authors' defaults and added (RD, DCD, CD teacher-guided,
#           UnKD, RCE-KD, HetComp), DE's patience-100 diagnostic and HTD
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi -L | tee "$OUT/hardware.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/hardware.txt"
[ $# -gt 0 ] || set -- bench full
for what in "$@"; do
  case "$what" in
    bench) python3 -m benchmarks.bench_bd --repeats 3 --out "$OUT/bench_gpu.json" 2>&1 \
             | grep -v "^[IW]1" | tail -14 ;;
    cmdbuf) XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
             python3 -m benchmarks.bench_bd --repeats 3 --out "$OUT/bench_gpu_cmdbuf.json" 2>&1 \
             | grep -v "^[IW]1" | tail -14 ;;
    full|full_*) m=${what#full}; m=${m#_}; m=${m:-bpr}; wd=/tmp/full_$m; rm -rf "$wd"
          start=$(date +%s)
          python3 -m launch.train --config configs/bd_${m}_citeulike.py --workdir "$wd" 2>&1 \
            | tee "$OUT/full_schedule_$m.log" | grep -E "done|epoch (500|1000)/|rror"
          echo "full schedule wall seconds: $(( $(date +%s) - start ))" \
            | tee -a "$OUT/full_schedule_$m.log"
          mkdir -p "$OUT/full_$m" && cp "$wd/results.json" "$wd/metrics.jsonl" "$OUT/full_$m/" ;;
    models) for m in neumf lightgcn cdae; do
              python3 -m benchmarks.bench_bd --config configs/bd_${m}_citeulike.py --repeats 3 \
                --out "$OUT/bench_gpu_$m.json" 2>&1 | grep -v "^[IW]1" | tail -14
            done ;;
    kd) python3 -m benchmarks.bench_kd --repeats 3 --out "$OUT/bench_kd_gpu.json" 2>&1 \
          | grep -v "^[IW]1" | grep -v '^ ' | tail -12 ;;
    topk) python3 -m benchmarks.bench_topk --repeats 3 --out "$OUT/topk_gpu.json" 2>&1 \
          | grep -v "^[IW]1" | grep "^|\|^#" ;;
    kd_htd) wd=/tmp/kd; mkdir -p "$OUT/kd_htd"
          python3 -m launch.sweep --config configs/kd_citeulike.py --arms htd --root "$wd" 2>&1 \
            | tee "$OUT/kd_htd/sweep.log"
          for m in teacher htd_s0; do
            mkdir -p "$OUT/kd_htd/$m"
            cp "$wd/$m/results.json" "$wd/$m/metrics.jsonl" "$wd/$m/train.log" "$OUT/kd_htd/$m/"
          done ;;
    ibd_cdae) wd=/tmp/ibd; mkdir -p "$OUT/ibd"
          arms=cdae; [ -n "${IBD_ARMS:-}" ] && arms=$(printf 'cdae:%s,' $IBD_ARMS)
          sets=(); for x in ${IBD_SET:-}; do sets+=(--set "$x"); done
          python3 -m launch.sweep --config configs/ibd_citeulike.py --root "$wd" \
            --arms "${arms%,}" --seeds "$(echo ${IBD_SEEDS:-0} | tr ' ' ,)" \
            ${sets[@]+"${sets[@]}"} 2>&1 | tee "$OUT/ibd/sweep.log"
          for run in "$wd"/cdae_*/; do
            name=$(basename "$run"); mkdir -p "$OUT/ibd/$name"
            cp "$run/results.json" "$run/metrics.jsonl" "$run/config.json" "$run/train.log" \
              "$OUT/ibd/$name/" 2>/dev/null
          done ;;
    fast) python3 -m benchmarks.bench_bd --repeats 3 --config.method.sampling_state=draws \
            --config.method.rank_buckets=8192 --out "$OUT/bench_gpu_draws_hist.json" 2>&1 \
            | grep -v "^[IW]1" | tail -14
          python3 -m benchmarks.profile_step --repeats 3 --out "$OUT/profile_gpu.json" 2>&1 \
            | grep -v "^[IW]1" | tail -16 ;;
    scale) python3 -m benchmarks.bench_scale --users 1000000 --items 200000 --pairs_per_user 20 \
             --batch 8192 --rank_buckets 8192 --epochs 2 --refreshes 2 --table_budget_mb 16000 \
             --out "$OUT/scale_1m_200k_gpu.json" 2>&1 | grep -v "^[IW]1" | tail -24 ;;
    runs) python3 -m benchmarks.bench_runs --method "${RUNS_METHOD:-rrd}" --epochs 5 --runs 1,3,5 \
             --out "$OUT/runs_gpu.json" 2>&1 | grep -v "^[IW]1" | tail -40
          python3 -m benchmarks.bench_runs --method "${RUNS_METHOD:-rrd}" --epochs 5 --runs 3 \
             --live 1 --out "$OUT/runs_live_gpu.json" 2>&1 | grep -v "^[IW]1" | tail -30
          python3 -m benchmarks.bench_ftd_forms --repeats 3 --runs 3 2>&1 | grep -v "^[IW]1" ;;
    kd_seeds|lgcn|kd_new|kd_slow) wd=/tmp/kd_gpu; mkdir -p "$OUT/$what"
          case "$what" in
            kd_seeds) sel=""; extra="--vmap_seeds --seeds 0,1,2" ;;  # every default arm, 3 seeds
            lgcn) sel="--arms lgcn"; extra="" ;;
            kd_new) sel="--arms rd,dcd,cd_teacher,unkd,rce_kd,hetcomp,de_p100,htd"; extra="" ;;
            kd_slow) sel="--arms de,de_rrd,htd"; wd=/tmp/kd_gpu_full  # DE-RRD uncapped: own root
                     extra="--set de_rrd:distill.epochs=1000 --vmap_seeds" ;;
          esac
          python3 -m launch.sweep --config configs/kd_citeulike.py $sel $extra --root "$wd" 2>&1 \
            | tee "$OUT/$what/sweep.log" | tail -30
          (cd "$wd" && find . -name results.json -o -name metrics.jsonl -o -name config.json \
             -o -name teacher.json | tar cf "$OUT/$what/runs.tar" -T -) ;;
    *) echo "unknown section $what" >&2; exit 2 ;;
  esac
done
