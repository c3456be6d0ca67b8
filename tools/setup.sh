#!/usr/bin/env bash
# All the set-up on a fresh machine: .venv in the repo root, torch/torchvision pinned first, then
# tokensparse with its model, onnx, deploy and test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[models,onnx,deploy,test]" 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, timm, transformers, onnxruntime, onnxscript, tokensparse" \
  || { echo "set-up failed: see the pip output above" >&2; exit 1; }
