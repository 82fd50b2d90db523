#!/usr/bin/env bash
# Every check that needs a GPU, in one command (< 8 min on one H100/H200), writing one JSON.
#   scripts/gpu_check.sh [OUT_JSON]          default: outputs/gpu_check.json
# Exit 0: all sections passed; 1: a section failed or missed a goal; 3: no GPU present (nothing was run).
# Sections and their limits: scripts/gpu_check.py --help.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-outputs/gpu_check.json}"
unset TRITON_INTERPRET  # the kernels must be compiled for the GPU, never interpreted
echo "gpu_check: $(date -u +%FT%TZ) uptime: $(uptime)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec timeout 470 python scripts/gpu_check.py --json "$OUT"
