#!/usr/bin/env bash
# Installs, builds and runs the whole test suite (the README's test command).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/launch/setup.sh"
cd "$root"
ctest --test-dir build --output-on-failure -j2 --timeout 900
