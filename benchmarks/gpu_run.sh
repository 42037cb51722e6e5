#!/usr/bin/env bash
# One device call: GPU benchmark rows, then the full reference BD schedule (with the control).
# Run from the repository root on the GPU machine: bash benchmarks/gpu_run.sh  (OUT: output dir)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi -L | tee "$OUT/hardware.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/hardware.txt"
python3 -m benchmarks.bench_bd --repeats 5 --out "$OUT/bench_gpu.json" 2>&1 | grep -v "^[IW]1" | tail -25
rm -rf /tmp/full
start=$(date +%s)
python3 -m launch.train --config configs/bd_bpr_citeulike.py --workdir /tmp/full 2>&1 \
  | tee "$OUT/full_schedule.log" | grep -E "done|epoch (100|500|1000)/|error|Error" 
end=$(date +%s)
echo "full schedule wall seconds: $((end - start))" | tee -a "$OUT/full_schedule.log"
cp /tmp/full/results.json /tmp/full/metrics.jsonl "$OUT/" 2>/dev/null
