#!/usr/bin/env bash
# Installs ds-hexamoe (editable) with its test extras. When no torch is importable, it first installs
# torch==2.13.0, which pip takes from the CPU wheel on this machine's disk, so set-up stays fast and
# never pulls the multi-GB CUDA build. It also builds DeepSpeed's C++ ops once (a few minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# DeepSpeed compiles its C++ ops on first use; build them here, once, so no job or test compiles under a timeout
"$PY" -m ds_hexamoe build-ops
"$PY" -c "import ds_hexamoe, torch; print(f'ds-hexamoe {ds_hexamoe.__version__} ready (torch {torch.__version__})')"
hash -r 2>/dev/null || true
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
