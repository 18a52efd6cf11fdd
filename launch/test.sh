#!/usr/bin/env bash
# Installs, builds and runs the whole test suite (the README's test command).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/launch/setup.sh"
cd "$root"
# Formatting is part of passing: every C++/CUDA source as .clang-format says.
find kernels runtime parallel launch tests bench \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \) -print0 |
  xargs -0 clang-format --dry-run -Werror
echo "[test] clang-format: every source is formatted" >&2
# The CPU-only build keeps working: the xq binary without the CUDA backend,
# which must refuse --backend cuda with its message (not crash).
cmake -S . -B build-cpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DXQ_CUDA=OFF -DXQ_FUZZ=OFF >/dev/null
cmake --build build-cpu --target xq
if build-cpu/launch/xq generate --backend cuda --prompt hi 2>build-cpu/backend-check.txt; then
  echo "[test] the CPU-only xq accepted --backend cuda" >&2
  exit 1
fi
grep -q "this build has no CUDA backend" build-cpu/backend-check.txt ||
  { echo "[test] the CPU-only xq did not say why --backend cuda fails:" >&2; cat build-cpu/backend-check.txt >&2; exit 1; }
echo "[test] CPU-only build: xq builds and refuses --backend cuda" >&2
ctest --test-dir build --output-on-failure -j2 --timeout 900
