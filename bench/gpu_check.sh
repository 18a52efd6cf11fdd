#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, prints the device and runs
# the CUDA backend's tests, each of which compares a kernel with the CPU
# backend (tests/test_cuda.cpp). Run from the project root:
#   bash bench/gpu_check.sh [BUILD_DIR]
# BUILD_DIR (default build) holds a CUDA build (-DXQ_CUDA=ON). Where the GPU
# machine cannot build the project (no OpenBLAS, GoogleTest or Open MPI
# there), build elsewhere with -DXQ_NATIVE=OFF (the machines' processors
# differ) and bring BUILD_DIR/tests/xq_tests with the host libraries it links
# in BUILD_DIR/lib: they are put on LD_LIBRARY_PATH.
# The report also goes to $OUT/gpu_check.txt when OUT is set.
set -uo pipefail
build=${1:-build}
tests_bin=$build/tests/xq_tests
report=${OUT:-/tmp}/gpu_check.txt
[ -x "$tests_bin" ] || { echo "gpu_check: $tests_bin not found (build with -DXQ_CUDA=ON)" >&2; exit 2; }
export LD_LIBRARY_PATH="$(cd "$build" && pwd)/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{
  echo "== device"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 ||
    echo "nvidia-smi: not available"
  echo "== CUDA backend tests against the CPU backend"
  "$tests_bin" --gtest_filter='CudaBackend*' --gtest_color=no 2>&1
  echo "exit status: $?"
} | tee "$report"
# The exit status is the tests': the pipeline's last stage is tee.
grep -q '^exit status: 0$' "$report"
