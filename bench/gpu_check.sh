#!/usr/bin/env bash
# The GPU check in one call (under 7 minutes): install without dependencies (torch and
# triton come with the machine; no network is needed), run the GPU tests, then the GPU
# benchmarks: an atomic_cas probe, then R4 (item codes at 1M items), R1, R3 and R2, each
# with the Triton regimes side by side (v3's table and dense (K2) beside candidate, tiled and
# dense-packed) and their kernel / selection / rest breakdown. Results go to $OUT (default ./out): pytest-gpu.log
# and gpu-bench.json, rewritten after every stage.
# Without a GPU it says so and dry-runs the benchmark on CPU at tiny sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"

PY=$(command -v python3 || command -v python)
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
  echo "gpu_check: install failed, see $OUT/install.log"; tail -5 "$OUT/install.log"; exit 1; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device on this machine: GPU tests and GPU benchmarks NOT run."
  echo "gpu_check: dry run of the benchmark script on CPU (tiny sizes, no GPU numbers):"
  TRITON_INTERPRET=1 "$PY" -m sparcode.bench.gpu_bench --dry-run --out "$OUT"
  exit $?
fi

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv >"$OUT/nvidia-smi.csv" 2>&1
"$PY" -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())"
echo "== pytest -m gpu"
timeout 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider >"$OUT/pytest-gpu.log" 2>&1
tests=$?
tail -3 "$OUT/pytest-gpu.log"
echo "== benchmarks"
timeout 330 "$PY" -m sparcode.bench.gpu_bench --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log" | tail -25
bench=${PIPESTATUS[0]}
echo "gpu_check: pytest exit $tests, bench exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
