#!/usr/bin/env bash
# Builds llama.cpp's own llama-server and llama-bench natively, once, into bench/.env/llama.cpp
# (gitignored): the bench's baseline for one stream and for 8 streams with -np 8 (continuous
# batching). The sources are the llama.cpp vendored in the llama-cpp-python sdist (PyPI), so no
# other network access is needed. ~10 min on 2 cores, niced. Kept out of setup.py: llm_module never
# needs it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$HERE/.env/llama.cpp"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
BIN="$ROOT/build/bin"
if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ]; then
  echo "llama-server already built in $BIN"; exit 0
fi
mkdir -p "$ROOT/sdist"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT/sdist"
tar -xzf "$ROOT/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT/sdist"
SRC="$ROOT/sdist/llama_cpp_python-$VERSION/vendor/llama.cpp"
nice -n 19 cmake -S "$SRC" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
nice -n 19 cmake --build "$ROOT/build" --target llama-server llama-bench -j 2
"$BIN/llama-server" --version || true
