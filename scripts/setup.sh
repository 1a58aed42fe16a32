#!/usr/bin/env bash
# Install lowbit into .venv on a fresh machine: torch 2.13.0 (CPU build), the package with its
# dependencies, and Fashion-MNIST (Debian package dataset-fashion-mnist) when root and missing.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: a bare "torch" requirement would pull the CUDA build (gigabytes)
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
if ! .venv/bin/python -c "import lowbit, pytest, matplotlib" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[dev,plot]"
fi
# the "search" extra (ReLeQ): stable-baselines3 needs torch, already pinned above, so pip keeps it
if ! .venv/bin/python -c "import gymnasium, stable_baselines3" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[search]"
fi
# the "cluster" extra (lowbit bench --backend ray, dcq/releq backend: ray); ray does not depend on torch
if ! .venv/bin/python -c "import ray" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[cluster]"
fi
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -f "$FMNIST/train-images-idx3-ubyte" ]; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "setup: Fashion-MNIST is missing at $FMNIST; run 'sudo apt-get install dataset-fashion-mnist'" >&2
    exit 1
  fi
fi
# Cortex-M cross toolchain + QEMU for `lowbit export --target` and tests/test_mcu.py (issue 18), where apt is
# usable; without them those tests skip with a one-line reason
bash scripts/install_mcu_tools.sh || echo "setup: Cortex-M tools not installed (the QEMU tests will skip)" >&2
echo "setup: ok ($(.venv/bin/python -c 'import torch, lowbit; print("torch", torch.__version__, "lowbit", lowbit.__version__)'))"
