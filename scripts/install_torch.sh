#!/usr/bin/env sh
# Install torch==$TORCH_VERSION, the build that fits this machine (make run / make test call this first, so
# that the project install after it finds torch satisfied and pulls no other build):
#   - an NVIDIA GPU (nvidia-smi lists one): the CUDA build, which is what PyPI's Linux wheels are;
#   - otherwise the CPU build from PyTorch's CPU index (a few hundred MB instead of several GB). Where that
#     index cannot be reached, give up on it within seconds (pip's defaults retry for minutes) and take
#     torch from the default index instead.
# Already installed at that version: pip says so and downloads nothing.
set -eu
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install_torch: NVIDIA GPU found: torch $TORCH_VERSION, CUDA build, from the default index"
  exec "$PYTHON" -m pip install "torch==$TORCH_VERSION"
fi
echo "install_torch: no NVIDIA GPU: torch $TORCH_VERSION, CPU build, from $CPU_INDEX"
if ! "$PYTHON" -m pip install --timeout 5 --retries 0 --index-url "$CPU_INDEX" "torch==$TORCH_VERSION"; then
  echo "install_torch: $CPU_INDEX failed; torch $TORCH_VERSION from the default index instead"
  "$PYTHON" -m pip install "torch==$TORCH_VERSION"
fi
