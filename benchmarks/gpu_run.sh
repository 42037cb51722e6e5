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
#   topk:   the top-K / full-ranking rows of issue 27 (python3 -m benchmarks.bench_topk): the
#           evaluation (one split, both in one pass, d = 20 and 400), CD's pool, the top-M lists,
#           BD's rank refresh and the per-k candidates, previous path beside the new
#   kd_htd: the RCE-KD protocol's teacher, then its HTD student (too slow for the 2-core CPU)
#   ibd_cdae: the iBD protocol with CDAE (README, iBD): a 300-epoch warm-up, then BD and the iBD
#           arms for 400 epochs each; IBD_SEEDS (default 0) and IBD_ARMS (default bd b1 random
#           b2 b05 strict) choose the runs, IBD_SCHED replaces the schedule flags; outputs in
#           $OUT/ibd/cdae_s<seed>_<arm>/ for `python -m benchmarks.kd_table --protocol ibd`
#   fast:   the BPR-MF rows with pre-drawn samples and histogram ranks; the step profile
#   scale:  BD beyond the table budget on a synthetic 1,000,000 x 200,000 catalogue
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
    kd_htd) wd=/tmp/kd; mkdir -p "$wd" "$OUT/kd_htd"
          for m in teacher htd; do
            init=(); [ $m = teacher ] || init=(--config.teacher_init=$wd/teacher)
            start=$(date +%s)
            python3 -m launch.train --config configs/kd_citeulike.py:$m --workdir "$wd/$m" \
              "${init[@]}" 2>&1 | tee "$OUT/kd_htd/$m.log" | grep -E "done|rror"
            echo "$m wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/kd_htd/$m.log"
            mkdir -p "$OUT/kd_htd/$m" && cp "$wd/$m/results.json" "$wd/$m/metrics.jsonl" "$OUT/kd_htd/$m/"
          done ;;
    ibd_cdae) wd=/tmp/ibd; mkdir -p "$wd" "$OUT/ibd"
          sched=${IBD_SCHED:-"--config.warmup.epochs=300 --config.distill.epochs=400"}
          # pre-drawn samples are for pair batches; validation every 10 epochs (the curve of the
          # paper's Fig. 3), as the CPU queue
          fast="--config.method.rank_buckets=8192 --config.eval_every=10"
          ibd_run() {  # ibd_run <name> <config> [flags...]: train, then copy its outputs
            local name=$1 cfg=$2; shift 2; local start=$(date +%s)
            python3 -m launch.train --config "$cfg" --workdir "$wd/$name" $sched "$@" 2>&1 \
              | tee "$wd/$name.log" | grep -E "done after|rror"
            echo "$name wall seconds: $(( $(date +%s) - start ))"
            mkdir -p "$OUT/ibd/$name"
            cp "$wd/$name/results.json" "$wd/$name/metrics.jsonl" "$wd/$name/config.json" \
              "$wd/$name.log" "$OUT/ibd/$name/" 2>/dev/null
          }
          ibd_run cdae_warm configs/bd_cdae_citeulike.py --config.distill.epochs=0 \
            --config.control=False
          for seed in ${IBD_SEEDS:-0}; do
            for arm in ${IBD_ARMS:-bd b1 random b2 b05 strict}; do
              common=(--config.seed=$seed --config.warmup_from=$wd/cdae_warm $fast)
              if [ $arm = bd ]; then
                ibd_run cdae_s${seed}_bd configs/bd_cdae_citeulike.py "${common[@]}" \
                  --config.control=False
              else  # the arm's flags: configs/ibd_citeulike.py (ARMS)
                ibd_run cdae_s${seed}_$arm configs/ibd_citeulike.py:cdae,$arm "${common[@]}"
              fi
            done
          done ;;
    fast) python3 -m benchmarks.bench_bd --repeats 3 --config.method.sampling_state=draws \
            --config.method.rank_buckets=8192 --out "$OUT/bench_gpu_draws_hist.json" 2>&1 \
            | grep -v "^[IW]1" | tail -14
          python3 -m benchmarks.profile_step --repeats 3 --out "$OUT/profile_gpu.json" 2>&1 \
            | grep -v "^[IW]1" | tail -16 ;;
    scale) python3 -m benchmarks.bench_scale --users 1000000 --items 200000 --pairs_per_user 20 \
             --batch 8192 --rank_buckets 8192 --epochs 2 --refreshes 2 --table_budget_mb 16000 \
             --out "$OUT/scale_1m_200k_gpu.json" 2>&1 | grep -v "^[IW]1" | tail -24 ;;
    *) echo "unknown section $what" >&2; exit 2 ;;
  esac
done
