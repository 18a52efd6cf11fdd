#!/usr/bin/env bash
# The GPU check, one command on a fresh machine with an NVIDIA GPU and the
# CUDA toolkit, from the project root:
#   bash bench/gpu_check.sh OUT_DIR [--build-dir DIR]
# Stages, each time-boxed (`timeout`) within a budget of 8 minutes in all
# (XQ_GPU_CHECK_BUDGET seconds), each with its log in OUT_DIR/<stage>.log:
#   device      nvidia-smi: the GPUs and their compute capability
#   packages    only where a build dependency is missing and apt answers:
#               the Debian packages the build needs (the list launch/setup.sh
#               installs, less what only other tools use); nothing otherwise
#   configure   CMake with the CUDA backend for the GPU found
#               (CMAKE_CUDA_ARCHITECTURES from its compute capability, e.g. 90)
#   build       the tests and bench_gpu, with every core
#   memcheck    compute-sanitizer --tool memcheck on a short subset of the
#               kernel tests (CUDA ops and caches: XQ_MEMCHECK_FILTER)
#   cuda_tests  every CUDA test (--gtest_filter='*Cuda*'), each against the CPU
#   mpi_gpu     tp 2 and pp 2 on two GPUs against the CPU (2+ GPUs only)
#   bench       bench_gpu (decode tokens/s, kernels against the peaks)
# and writes OUT_DIR/report.md (device, stages and their results, the
# benchmark's tables) and OUT_DIR/report.json. Exits non-zero when a stage
# that ran failed.
#
# --build-dir DIR: use a build made elsewhere instead of building here (for a
# GPU machine that cannot build: no OpenBLAS, GoogleTest or Open MPI
# packages and no apt). Build it with -DXQ_CUDA=ON -DXQ_NATIVE=OFF (the
# machines' processors differ) and -DCMAKE_CUDA_ARCHITECTURES for this GPU,
# and bring DIR/tests/xq_tests, DIR/tests/mpi/xq_gpu_mpi_tests,
# DIR/bench/bench_gpu and the host libraries they link in DIR/lib: those go
# on LD_LIBRARY_PATH.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2

out="" build_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir=${2:?--build-dir needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) [ -z "$out" ] || { echo "gpu_check: one OUT_DIR, not '$out' and '$1'" >&2; exit 2; }
       out=$1; shift ;;
  esac
done
[ -n "$out" ] || { echo "usage: bash bench/gpu_check.sh OUT_DIR [--build-dir DIR]" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
budget=${XQ_GPU_CHECK_BUDGET:-480}
# memcheck runs kernels 10-100x slower: the ops, the XQuant kernel and the
# fp16 cache on stories260K (every kernel family once, the small model).
memcheck_filter=${XQ_MEMCHECK_FILTER:-'CudaBackend.*:CudaDenseOps.*:CudaXQuantLatent.*:CudaCache.*:Models/CudaCacheTest.*/stories260K*'}
start=$(date +%s)
export PATH=/usr/local/cuda/bin:$PATH
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

stages=()  # "name|status|seconds|note"
failed=0
# run_stage NAME LIMIT COMMAND...: runs COMMAND with at most LIMIT seconds (and
# never past the budget), its output in OUT_DIR/NAME.log; records the result.
run_stage() {
  local name=$1 limit=$2; shift 2
  local left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt 10 ]; then
    stages+=("$name|skipped|0|the ${budget} s budget is spent")
    echo "== $name: skipped (budget spent)"
    failed=1
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (at most ${limit} s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0)) status=passed note=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status=failed note="timed out after ${limit} s"
  elif [ $rc -eq 77 ]; then
    status=skipped note=$(tail -n 1 "$out/$name.log")
  elif [ $rc -ne 0 ]; then
    status=failed note="exit status $rc"
  fi
  [ "$status" = failed ] && failed=1
  stages+=("$name|$status|$took|$note")
  echo "   $status in ${took} s${note:+ ($note)}"
  tail -n 3 "$out/$name.log" | sed 's/^/   | /'
  [ "$status" != failed ]
}
skip_stage() { stages+=("$1|skipped|0|$2"); echo "== $1: skipped ($2)"; }

# ------------------------------------------------------------------- device
gpus=0 arch=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version --format=csv,noheader \
    >"$out/device.log" 2>&1
  gpus=$(grep -c . "$out/device.log")
  arch=$(head -n 1 "$out/device.log" | cut -d, -f3 | tr -d ' .')
  stages+=("device|passed|0|$gpus GPU(s): $(head -n 1 "$out/device.log" | cut -d, -f2 | sed 's/^ //')")
else
  echo "nvidia-smi: not available" >"$out/device.log"
  stages+=("device|failed|0|nvidia-smi not available")
  failed=1
fi
cat "$out/device.log"

# -------------------------------------------------------------------- build
if [ -n "$build_dir" ]; then
  build=$(cd "$build_dir" && pwd)
  export LD_LIBRARY_PATH="$build/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  skip_stage build "prebuilt build dir $build"
else
  build=$root/build-gpu-check
  missing=()
  pkg-config --exists openblas 2>/dev/null || missing+=(libopenblas-dev liblapack-dev liblapacke-dev)
  pkg-config --exists libpcre2-8 2>/dev/null || missing+=(libpcre2-dev)
  [ -e /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev libgmock-dev)
  command -v mpicxx >/dev/null 2>&1 || missing+=(libopenmpi-dev openmpi-bin)
  [ -e /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
  command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    run_stage packages 150 bash -c "$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      $sudo apt-get install -y -qq --no-install-recommends ${missing[*]}" ||
      echo "   apt cannot install ${missing[*]}: bring a build with --build-dir (see the top)"
  fi
  cuda_arch=${arch:-90}
  run_stage configure 90 cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DXQ_CUDA=ON \
    -DXQ_FUZZ=OFF -DCMAKE_CUDA_ARCHITECTURES="$cuda_arch" &&
    {
      targets=(xq_tests)
      for t in bench_gpu xq_gpu_mpi_tests; do
        cmake --build "$build" --target help 2>/dev/null | grep -q "^$t:" && targets+=("$t")
      done
      run_stage build 300 cmake --build "$build" -j "$(nproc)" --target "${targets[@]}"
    }
fi

tests_bin=$build/tests/xq_tests
mpi_bin=$build/tests/mpi/xq_gpu_mpi_tests
bench_bin=$build/bench/bench_gpu

# -------------------------------------------------------------------- tests
if [ -x "$tests_bin" ]; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    run_stage memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
      "$tests_bin" --gtest_filter="$memcheck_filter" --gtest_color=no
  else
    skip_stage memcheck "compute-sanitizer not found (CUDA toolkit's bin)"
  fi
  run_stage cuda_tests 200 "$tests_bin" --gtest_filter='*Cuda*' --gtest_color=no
else
  skip_stage memcheck "no $tests_bin"
  skip_stage cuda_tests "no $tests_bin"
  failed=1
fi
if [ "$gpus" -ge 2 ] && [ -x "$mpi_bin" ]; then
  run_stage mpi_gpu 120 mpirun --oversubscribe -np 2 "$mpi_bin" --gtest_color=no
elif [ "$gpus" -ge 2 ]; then
  skip_stage mpi_gpu "no $mpi_bin"
else
  skip_stage mpi_gpu "needs 2 GPUs, found $gpus"
fi

# -------------------------------------------------------------------- bench
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -x "$bench_bin" ]; then
  skip_stage bench "no $bench_bin"
elif [ ! -f "$model" ]; then
  skip_stage bench "$model is absent (bash launch/setup.sh fetches it)"
else
  run_stage bench 200 "$bench_bin" --model "$model" --json "$out/bench_gpu.json"
fi

# ------------------------------------------------------------------- report
total=$(($(date +%s) - start))
{
  echo "# GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), ${total} s in all"
  echo
  echo "## Device"
  echo
  sed 's/^/    /' "$out/device.log"
  echo
  echo "## Stages"
  echo
  echo "| stage | result | seconds | note |"
  echo "|---|---|---:|---|"
  for s in "${stages[@]}"; do
    IFS='|' read -r name status took note <<<"$s"
    echo "| $name | $status | $took | ${note//|/\\|} |"
  done
  for log in cuda_tests mpi_gpu memcheck; do
    [ -f "$out/$log.log" ] || continue
    echo
    echo "### $log"
    echo
    grep -E '^\[  (PASSED|FAILED|SKIPPED) |^\[==========\]|ERROR SUMMARY' "$out/$log.log" |
      sed 's/^/    /' | head -n 40
  done
  if [ -f "$out/bench.log" ]; then
    echo
    echo "## bench_gpu"
    echo
    sed -n '/^## bench_gpu/,$p' "$out/bench.log" | sed '1d'
  fi
} >"$out/report.md"

{
  printf '{"seconds": %d, "gpus": %d, "compute_capability": "%s", "failed": %s, "stages": [' \
    "$total" "$gpus" "$arch" "$([ $failed -eq 0 ] && echo false || echo true)"
  sep=""
  for s in "${stages[@]}"; do
    IFS='|' read -r name status took note <<<"$s"
    note=${note//\\/\\\\}
    note=${note//\"/\\\"}
    printf '%s{"stage": "%s", "result": "%s", "seconds": %d, "note": "%s"}' \
      "$sep" "$name" "$status" "$took" "$note"
    sep=", "
  done
  printf '], "bench": '
  if [ -s "$out/bench_gpu.json" ]; then cat "$out/bench_gpu.json"; else printf 'null\n'; fi
  printf '}\n'
} >"$out/report.json"

echo "== report: $out/report.md, $out/report.json (${total} s)"
exit $failed
