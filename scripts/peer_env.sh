#!/usr/bin/env bash
# Create .venv-peer: a separate environment for the peer benchmark (benchmarks/peer_brevitas.py)
# with torch 2.13.0 (CPU build), Brevitas 0.13.4 and lowbit (editable). Brevitas is never a
# dependency of lowbit itself; it lives only here.
#
# torch is installed first and then held by a pip constraint file, so that resolving Brevitas'
# "torch>=1.13" can neither replace it nor pull a CUDA build (gigabytes of nvidia-* wheels).
# Idempotent: a second run only checks. Fails loudly if torch is not 2.13.0+cpu at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-peer
TORCH=2.13.0
BREVITAS=0.13.4

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
P="$VENV/bin/python"

torch_ok() {
  "$P" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH+cpu')" 2>/dev/null
}

if ! torch_ok; then
  "$P" -m pip install -q "torch==$TORCH"
fi

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" >"$CONSTRAINTS"

if ! "$P" -c "import importlib.metadata as m, sys; sys.exit(m.version('brevitas') != '$BREVITAS')" 2>/dev/null; then
  "$P" -m pip install -q -c "$CONSTRAINTS" "brevitas==$BREVITAS"
fi
if ! "$P" -c "import lowbit" 2>/dev/null; then
  "$P" -m pip install -q -c "$CONSTRAINTS" -e .
fi

# the whole point of the constraint: check it held
if ! torch_ok; then
  echo "peer_env: torch in $VENV is $("$P" -c 'import torch; print(torch.__version__)' 2>&1), expected $TORCH+cpu" >&2
  exit 1
fi
if "$P" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "peer_env: CUDA wheels (nvidia-*) were installed into $VENV; remove $VENV and check the constraint" >&2
  exit 1
fi
"$P" -c "import brevitas, brevitas.nn, lowbit" # imports work together
echo "peer_env: ok ($("$P" -c 'import torch, brevitas, lowbit; print("torch", torch.__version__, "brevitas", brevitas.__version__, "lowbit", lowbit.__version__)'))"
