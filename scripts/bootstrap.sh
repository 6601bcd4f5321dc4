#!/usr/bin/env bash
# Set up ./.venv (once) and run a vlpet job in it:
#   bash scripts/bootstrap.sh demo [vlpet demo options]   # the offline demo
#   bash scripts/bootstrap.sh test [pytest options]       # the test-suite (long end-to-end runs: add -m slow)
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
    # Only the torch wheel itself may come from elsewhere than pip's configured index (a company
    # mirror, PIP_INDEX_URL, pip.conf): a local CPU wheel when the machine has one (pip's find-links),
    # else PyTorch's CPU index. Either way it is installed alone (--no-deps); its dependencies then
    # come from the configured index, so nothing else is sent around the user's pip settings.
    if ! pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then
      pip install -q --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
        || pip install -q --no-deps "torch>=2.3" --index-url https://download.pytorch.org/whl/cpu
    fi
    # The installed torch already satisfies this pin, so pip only adds its missing dependencies.
    torch_version="$("$VENV/bin/python" -m pip show torch | sed -n 's/^Version: //p')"
    pip install -q "torch==$torch_version"
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
  # Two workers, one test file each at a time (files share their built models); VLPET_TEST_WORKERS=0 runs in one process.
  # The long end-to-end runs (marker "slow") are left out; `test -m slow` runs just them (a later -m wins).
  test)  exec "$VENV/bin/python" -m pytest -n "${VLPET_TEST_WORKERS:-2}" --dist loadfile -m "not slow" "$@" ;;
  vlpet) exec "$VENV/bin/vlpet" "$@" ;;
  *) echo "usage: bash scripts/bootstrap.sh demo|test|vlpet [args...]" >&2; exit 2 ;;
esac
