#!/usr/bin/env bash
# Builds llama-cpp-python into bench/.env/llama-venv (gitignored), once: the bench's ceiling engine.
# It compiles from source (~20 min on 2 cores), so it runs niced; only libllama and ggml are built
# (no common/, mtmd or tools), which llama_cpp.Llama is all the bench uses.
# Kept out of setup.py on purpose: llm_module itself never needs it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.env/llama-venv"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python already built in $VENV"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# Only the library and its shared objects: no tests, examples, servers or tools to compile.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON}"
export MAKEFLAGS="${MAKEFLAGS:--j2}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
nice -n 19 "$VENV/bin/pip" install --no-cache-dir --verbose "llama-cpp-python==$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
