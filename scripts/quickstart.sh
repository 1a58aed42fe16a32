#!/usr/bin/env bash
# Install everything, then train the main job: a W2A2 (PACT + SAWB) ResNet-8 on Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lowbit train configs/quickstart.yaml "$@"
