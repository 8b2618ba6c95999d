#!/usr/bin/env bash
# The test suite on the CPU under the GPU machine's versions (torch 2.11.0, Triton 3.6.0,
# timm 1.0.29), before GPU time is spent on them: CI runs torch 2.14.1, and what differs
# between the two (dynamo, AOTAutograd, inductor, the Triton interpreter) showed up here
# first (docs/training.md, "PyTorch versions").
#
#   benchmarks/gpu_image_versions.sh [pytest arguments]
#
# Makes (once) a virtual environment at ${VENV:-/tmp/itpn-torch211} with those versions and the
# rest of requirements-dev.txt, then runs pytest there. NumPy stays below 2.4, where Triton
# 3.6's interpreter still converts its scalars (the GPU image has NumPy 2.5, and no use for the
# interpreter). About 5 GB of downloads the first time (torch's CUDA build and its CUDA
# libraries). PIP_CONFIG_FILE=/dev/null: the development VM's pip caps torch at the release on
# its disk.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/itpn-torch211}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import itpn, torch; assert torch.__version__.startswith('2.11.')" 2>/dev/null; then
  python3 -m venv "$VENV"
  export PIP_CONFIG_FILE=/dev/null
  "$VENV/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0
  grep -v '^torch' requirements-dev.txt > "$VENV/requirements.txt"
  "$VENV/bin/pip" install -q -r "$VENV/requirements.txt" triton==3.6.0 "numpy<2.4"
  "$VENV/bin/pip" install -q --no-deps -e .
fi
"$VENV/bin/python" -c "import numpy, timm, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__)"
# DeepSpeed's JIT-built CPU ops (cpu_adam, shm_comm) are cached per Python and CUDA version, not
# per torch release: keep this torch's apart.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
