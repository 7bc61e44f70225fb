#!/usr/bin/env bash
# Makes .gpu/, what scripts/gpu_check.sh needs on a GPU machine that has no network and no
# copy of our venv (only the repository travels, with a few ignored paths named as "carry"):
#   .gpu/llama-src.tar.xz   the pinned llama.cpp (llama-cpp-python==0.3.36's vendor/llama.cpp),
#                           stripped to what a library-only build reads (~3 MB)
#   .gpu/whl/               wheels the GPU machine lacks (gguf; PyYAML in case)
#   .gpu/smollm2-135m-q8_0.skeleton.json.xz
#                           the served default model's metadata and tensor shapes/types, no
#                           weights: bench/skeleton_models.py fills them with random numbers
#                           there (the real model, 92 MB+, is over the transfer limit)
# Run here, with .venv set up (make setup); it asks the package registry for the sdist and wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
G=.gpu
mkdir -p "$G/whl"

if [ ! -f "$G/llama-src.tar.xz" ]; then
  tmp=$(mktemp -d)
  "$VPY" -m pip download -q --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
  src="$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp"
  # Only the library build: docs, models, tests, tools and the backends we never enable go.
  ( cd "$src" && rm -rf docs models tests tools examples pocs benches media app scripts skills gguf-py \
      conversion requirements common ci grammars vendor/cpp-httplib \
      ggml/src/ggml-{vulkan,sycl,opencl,hexagon,metal,et,webgpu,openvino,cann,virtgpu,zdnn,zendnn,musa,hip,blas,rpc} )
  tar cJf "$G/llama-src.tar.xz" -C "$src/.." llama.cpp
  rm -rf "$tmp"
fi

# The GPU machine's Python 3.12 has torch, transformers, peft, numpy and jinja2; not gguf.
for spec in "gguf==$("$VPY" -c 'import importlib.metadata as m; print(m.version("gguf"))')" \
            "PyYAML==$("$VPY" -c 'import importlib.metadata as m; print(m.version("PyYAML"))')"; do
  "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$G/whl" "$spec"
done

PYTHONPATH=python "$VPY" -c 'from mtllm_locally import models
from mtllm_locally.bench import skeleton_models as s
s.write_skeleton(models.resolve(None), ".gpu/smollm2-135m-q8_0.skeleton.json.xz")'
du -sh "$G"/llama-src.tar.xz "$G"/whl "$G"/*.skeleton.json.xz
