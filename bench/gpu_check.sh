#!/usr/bin/env bash
# What needs a CUDA card, in one command on a machine with one: the tests that run only on CUDA
# (CUDA-graph head steps, batched and bf16 extraction) with the test files around them, then
# bench/bench_gpu.py (conilium against plain PyTorch loops on the same card).
#
#   bench/gpu_check.sh                       # tests, then the benchmark
#   bench/gpu_check.sh --download DIR [3.12] # (on a machine with a package index) wheels of the
#                                            # dependencies a CUDA image often lacks, for that Python
#   WHEELS=DIR bench/gpu_check.sh            # install those first, without an index
#
#   OUT=DIR         where gpu_cuda.json, bench.log and tests.log go (default bench/results)
#   PYTHON=python3  the interpreter that has torch with CUDA
#   BENCH_ARGS=...  more arguments for bench_gpu.py (say --compile, or --rows head,grid)
#   TESTS=0         skip the tests; BENCH=0 skip the benchmark
#
# The tests' and the benchmark's exit statuses are both kept: the script fails if either failed,
# after both have run.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
#: conilium's dependencies that a CUDA image with torch, transformers and the scientific stack lacks
MISSING=(soundfile soxr isal krippendorff cffi pycparser)

if [ "${1:-}" = "--download" ]; then
  dir="${2:?--download DIR [PYTHON_VERSION]}"
  version="${3:-3.12}"
  mkdir -p "$dir"
  exec "$py" -m pip download --only-binary=:all: --no-deps --python-version "$version" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -c "$root/constraints.txt" -d "$dir" "${MISSING[@]}"
fi

cd "$root"
out="${OUT:-$root/bench/results}"
mkdir -p "$out"
"$py" - <<'EOF' || { echo "[gpu-check] no CUDA device visible to $py: nothing to check here" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
if [ -n "${WHEELS:-}" ]; then
  "$py" -m pip install -q --no-index --find-links "$WHEELS" "${MISSING[@]}" || exit 1
fi
if ! "$py" -c "import conilium" 2>/dev/null; then
  "$py" -m pip install -q --no-deps --no-build-isolation -e "$root" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"

status=0
if [ "${TESTS:-1}" != 0 ]; then
  echo "[gpu-check] tests" >&2
  "$py" -m pytest -q -rs -p no:cacheprovider tests/test_head_graphs.py tests/test_extract.py \
    tests/test_extract_buckets.py tests/test_stacked_heads.py 2>&1 | tee "$out/tests.log"
  status=${PIPESTATUS[0]}
fi
if [ "${BENCH:-1}" != 0 ]; then
  echo "[gpu-check] bench/bench_gpu.py" >&2
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
  OPENBLAS_NUM_THREADS=1 "$py" bench/bench_gpu.py --json "$out/gpu_cuda.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit "$status"
