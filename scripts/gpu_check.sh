#!/usr/bin/env bash
# The GPU check (issue 17), run from the repository root on a lent GPU machine:
#   1. the pinned llama.cpp built from the carried source as the README says, with CUDA
#      (GGML_CUDA=ON, shared libraries) into .gpu/llama-cuda (kept: a second run on the same
#      machine skips the build);
#   2. our module built with CMake against that prefix (MTLLM_LLAMA_PREFIX);
#   3. `python -m mtllm_locally.bench gpu --json`: decode tok/s with n_gpu_layers 0 vs 99, greedy
#      tokens GPU vs CPU, training time per step on cpu vs cuda, a cuda-trained adapter served
#      by the GPU engine.
# GPU=0 does the same for the CPU only (to test this script on a machine without a GPU; the
# bench then says "no GPU" and exits non-zero after the parts it can run). BUILD_ONLY=1 stops
# after step 2 (a warm machine keeps .gpu/, so a second call goes straight to the bench).
# Other knobs: PY (python3), OUT (/tmp/gpu_out), JOBS (all cores), CUDA_HOME, CUDA_ARCH (90).
# Needs .gpu/ from scripts/gpu_carry.sh; writes gpu_check.log, gpu.json and env.txt into $OUT
# (and the failing build's log, if one fails).
# Exit status: the bench's (0 = every figure measured), or the failing step's.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GPU=${GPU:-1}
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
JOBS=${JOBS:-$(nproc)}
G=$ROOT/.gpu
SITE=$G/site                    # carried wheels, installed here (never into the machine's Python)
if [ "$GPU" = 1 ]; then KIND=cuda; else KIND=cpu; fi
PREFIX=$G/llama-$KIND           # llama.cpp install prefix (lib/, include/, lib/cmake/llama)
WORK=$G/work-$KIND              # our module's build and a copy of the package beside it
mkdir -p "$OUT"

phase() { echo "== $(date -u +%H:%M:%S) +${SECONDS}s: $*"; }

# The CUDA toolkit's nvcc, and cuBLAS: from the toolkit if it has it, else from the CUDA 13
# wheels torch brought (nvidia/cu13: headers and libcublas.so.13, without the unversioned
# link CMake looks for, so the libraries are named to it). The driver library (VMM pool) is
# linked by its full name when only libcuda.so.1 exists; without it, VMM is compiled out.
cuda_flags() {
  local cuda=${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}
  if [ ! -x "$cuda/bin/nvcc" ]; then
    echo "no nvcc in $cuda/bin: set CUDA_HOME to the CUDA toolkit"
    return 1
  fi
  export PATH=$cuda/bin:$PATH
  CUDA_ARGS=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -DGGML_CUDA_NCCL=OFF
             -DCMAKE_CUDA_COMPILER=$cuda/bin/nvcc)
  if [ ! -f "$cuda/include/cublas_v2.h" ]; then
    local nv
    nv=$("$PY" -c '
import glob, importlib.util
for name in ("nvidia.cu13", "nvidia.cublas"):  # CUDA 13 wheels, then the older per-library layout
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        continue
    for d in (spec.submodule_search_locations or []) if spec else []:
        if glob.glob(d + "/include/cublas_v2.h") and glob.glob(d + "/lib/libcublas.so.*"):
            print(d)
            raise SystemExit')
    if [ -z "$nv" ]; then
      echo "no cuBLAS: neither $cuda/include/cublas_v2.h nor torch's nvidia wheels (nvidia.cu13, nvidia.cublas)"
      return 1
    fi
    mkdir -p "$G/cublas-include"
    ln -sf "$nv"/include/cublas*.h "$G/cublas-include/"
    CUDA_ARGS+=(-DCUDA_cublas_LIBRARY="$(ls "$nv"/lib/libcublas.so.* | head -1)"
                -DCUDA_cublasLt_LIBRARY="$(ls "$nv"/lib/libcublasLt.so.* | head -1)"
                -DCMAKE_CUDA_FLAGS="-I$G/cublas-include")
    export LD_LIBRARY_PATH=$nv/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "cuBLAS from $nv"
  fi
  local driver
  driver=$( { ls "$cuda"/lib64/stubs/libcuda.so 2>/dev/null; ldconfig -p 2>/dev/null | awk '/libcuda\.so(\.1)? /{print $NF}'; } | head -1)
  if [ -n "$driver" ]; then
    CUDA_ARGS+=(-DCUDA_cuda_driver_LIBRARY="$driver")
  else
    CUDA_ARGS+=(-DGGML_CUDA_NO_VMM=ON)
    echo "no libcuda found: building without the VMM memory pool"
  fi
}

build_llama() {
  local src=$G/llama-src build=$G/build-llama-$KIND
  local args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$PREFIX" -DBUILD_SHARED_LIBS=ON
              -DGGML_NATIVE=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
              -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
              # installed libraries find each other ($ORIGIN) and cuBLAS/cudart where they were linked
              -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=ON)
  CUDA_ARGS=()
  if [ "$GPU" = 1 ]; then cuda_flags; fi
  args+=("${CUDA_ARGS[@]}")
  local want
  want=$( { sha256sum "$G/llama-src.tar.xz"; echo "${args[*]}"; } | sha256sum | cut -c1-16)
  if [ -f "$PREFIX/.built" ] && [ "$(cat "$PREFIX/.built")" = "$want" ]; then
    phase "llama.cpp ($KIND) already built in $PREFIX"
    return
  fi
  phase "unpacking llama.cpp"
  rm -rf "$src" "$build" "$PREFIX"
  mkdir -p "$src"
  tar xJf "$G/llama-src.tar.xz" -C "$src" --strip-components=1
  phase "configuring llama.cpp ($KIND): ${args[*]}"
  cmake -S "$src" -B "$build" "${args[@]}" > "$G/llama-configure.log" 2>&1 || { tail -40 "$G/llama-configure.log"; return 1; }
  grep -E "CUDA|Including|native|ARCHITECTURES" "$G/llama-configure.log" || true
  phase "building llama.cpp ($KIND, -j$JOBS)"
  cmake --build "$build" -j "$JOBS" > "$G/llama-build.log" 2>&1 ||
    { tail -60 "$G/llama-build.log"; cp "$G/llama-configure.log" "$G/llama-build.log" "$OUT/"; return 1; }
  cmake --install "$build" > /dev/null
  echo "$want" > "$PREFIX/.built"
  du -sh "$PREFIX/lib"
}

build_module() {
  phase "building mtllm_locally._engine against $PREFIX"
  rm -rf "$WORK/py"
  mkdir -p "$WORK/py"
  # A copy of the package with the new module in it: the checkout's own python/ (and any
  # _engine*.so there, built against another llama.cpp) stays as it is.
  cp -r python/mtllm_locally "$WORK/py/"
  find "$WORK/py" \( -name '__pycache__' -o -name '_engine*.so' \) -prune -exec rm -rf {} +
  cmake -S . -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DMTLLM_LLAMA_PREFIX="$PREFIX" \
    > "$WORK/configure.log" 2>&1 || { tail -30 "$WORK/configure.log"; return 1; }
  cmake --build "$WORK/build" -j "$JOBS" > "$WORK/build.log" 2>&1 ||
    { tail -40 "$WORK/build.log"; cp "$WORK/build.log" "$OUT/module-build.log"; return 1; }
  cp "$WORK"/build/_engine*.so "$WORK/py/mtllm_locally/"
}

main() {
  phase "GPU check ($KIND), $(uname -m), $(nproc) cores, $("$PY" --version 2>&1)"
  if [ "$GPU" = 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"
  fi
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())'

  phase "installing carried wheels into $SITE"
  rm -rf "$SITE"
  mkdir -p "$SITE"
  wheels=("$G"/whl/gguf-*.whl)
  "$PY" -c 'import yaml' 2>/dev/null || wheels+=("$G"/whl/[Pp]y[Yy][Aa][Mm][Ll]-*.whl)  # gguf imports it
  # A wheel is a zip of what goes into site-packages: unpacked as it is, no pip needed (the
  # machine's Python may have none); nothing to compile, no entry points wanted.
  for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE"; done
  # What the bench imports, checked before minutes of building.
  PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} "$PY" -c 'import torch, peft, safetensors, numpy, jinja2, gguf, pybind11; print("imports ok")'

  build_llama
  build_module
  if [ "${BUILD_ONLY:-0}" = 1 ]; then  # a first call that only builds; the next one skips to the bench
    phase "built (BUILD_ONLY=1)"
    return 0
  fi

  phase "bench gpu"
  export PYTHONPATH=$WORK/py:$SITE${PYTHONPATH:+:$PYTHONPATH}
  export MTLLM_LOCALLY_GPU_SKELETON=$G/smollm2-135m-q8_0.skeleton.json.xz
  export MTLLM_LOCALLY_HOME=$G/home  # converted models and vetting verdicts: not the machine's ~/.cache
  # The CPU figures are the CPU's: a CUDA build of llama.cpp otherwise runs the matrix products of
  # batches of 32+ tokens (prompts) on the GPU even with n_gpu_layers=0 ("op offload"). Read
  # once, when the CUDA backend registers; with every layer on the GPU it changes nothing.
  export GGML_OP_OFFLOAD_MIN_BATCH=1000000000
  "$PY" -c 'from mtllm_locally import _engine; print(_engine.system_info()); print("llama.cpp", _engine.llama_version())' \
    > "$OUT/env.txt"
  cat "$OUT/env.txt"
  local rc=0
  "$PY" -m mtllm_locally.bench gpu --json > "$OUT/gpu.json" || rc=$?
  phase "done (bench exit status $rc)"
  return $rc
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
