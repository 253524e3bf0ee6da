#!/usr/bin/env bash
# ONE command for a lent GPU (issue 3), under 8 minutes: the ops tests on CUDA (the DSN op family's Triton
# backend and the scan natively, against the float64 references), then timings of the fused DSN kernel, the
# unfused composition, DSN/PSN/SlidingPSN/LIF at T = 1k..16k (B=4, C=1024, bf16 and fp32) next to the measured
# copy bandwidth, and the decode step kernel; prints a table and writes benchmarks/results/gpu_check_<gpu>.json.
# Runs on the repository as it is (PYTHONPATH, no install, no network): the GPU image has torch 2.11,
# triton 3.6, transformers 5.17.
#     bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # real kernels on the GPU, never the interpreter
PY="${PYTHON:-python}"
mkdir -p benchmarks/results
start=$(date +%s)

"$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"); sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "gpu_check: no CUDA device"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true

echo "== ops tests on CUDA (kernels natively, first call compiles them) =="
timeout 250 "$PY" -m pytest -q -p no:cacheprovider -ra --continue-on-collection-errors tests/test_triton.py tests/test_scan.py 2>&1 | tail -25
tests_rc=${PIPESTATUS[0]}
echo "tests exit code: $tests_rc  ($(( $(date +%s) - start )) s so far)"

echo "== timings =="
# the benchmark stops starting new cases after its budget, so the whole command stays under 8 minutes
left=$(( 440 - ($(date +%s) - start) ))
budget=$(( left > 120 ? left - 60 : 60 ))
timeout $(( budget + 55 )) "$PY" benchmarks/gpu_check.py --budget-s "$budget"
bench_rc=$?
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, $(( $(date +%s) - start )) s total"
exit $(( tests_rc != 0 || bench_rc != 0 ))
