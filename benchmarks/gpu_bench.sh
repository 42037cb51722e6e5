#!/usr/bin/env bash
# One device call: the benchmark rows with XLA's defaults, then with while-loop bodies captured as
# CUDA graphs (command buffers). Run from the repository root on the GPU machine (OUT: output dir).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi -L | tee "$OUT/hardware.txt"
python3 -m benchmarks.bench_bd --repeats 3 --out "$OUT/bench_gpu.json" 2>&1 | grep -v "^[IW]1" | tail -14
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
  python3 -m benchmarks.bench_bd --repeats 3 --out "$OUT/bench_gpu_cmdbuf.json" 2>&1 \
  | grep -v "^[IW]1" | tail -14
