#!/usr/bin/env bash
# Set up ./.venv (once) and run a vlpet job in it:
#   bash scripts/bootstrap.sh demo [vlpet demo options]   # the offline demo
#   bash scripts/bootstrap.sh test [pytest options]       # the test-suite
#   bash scripts/bootstrap.sh vlpet <command> ...         # any vlpet command
# On a machine without an NVIDIA GPU it installs a CPU build of torch (never the multi-GB CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLPET_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "vlpet: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "vlpet: NVIDIA GPU found: installing torch with CUDA" >&2
    pip install -q "torch>=2.3"
  else
    echo "vlpet: no NVIDIA GPU: installing a CPU build of torch" >&2
    # A local CPU wheel when the machine has one (this workplace: pip's find-links), its dependencies
    # from the usual index; otherwise PyTorch's CPU index.
    if pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then
      pip install -q torch==2.13.0
    else
      pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple \
        || pip install -q "torch>=2.3" --index-url https://download.pytorch.org/whl/cpu \
             --extra-index-url https://pypi.org/simple
    fi
  fi
fi
# vlpet itself (editable) with the demo and test extras; torch is already satisfied, so nothing pulls CUDA.
stamp="$VENV/.vlpet-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip install -q -e ".[demo,test]"
  touch "$stamp"
fi

job="${1:-demo}"
shift || true
case "$job" in
  demo)  exec "$VENV/bin/vlpet" demo "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest "$@" ;;
  vlpet) exec "$VENV/bin/vlpet" "$@" ;;
  *) echo "usage: bash scripts/bootstrap.sh demo|test|vlpet [args...]" >&2; exit 2 ;;
esac
