#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a bare GPU host (torch present; Ray and DeepSpeed from .whl/):
#   bash bench/gpu.sh            # from the repository root, with .whl/ built by shared/gpu/wheelhouse.sh
# Runs tests/gpu (marker `gpu`), the training benchmark (Ray Train + DeepSpeed vs plain PyTorch, eye preset)
# and the refine benchmark, then appends one dated section with their results to bench/RESULTS.md.
# GPU_REFINE_ROWS (default 2,000,000) and GPU_TRAIN_ITERATIONS (default 60) size the benchmarks.
if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset DS_ACCELERATOR  # DeepSpeed must pick the CUDA accelerator
py=${PYTHON:-python3}
log=$(mktemp -d /tmp/gpu_bench.XXXXXX)
device=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
if ! $py -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA GPU visible to torch; nothing to run" >&2
    exit 2
fi
$py -c 'import pytest' 2>/dev/null || { echo "bench/gpu.sh: pytest is missing: add its wheels to .whl/ (pip download --no-deps -d .whl pytest pluggy iniconfig packaging)" >&2; exit 2; }

echo "== tests/gpu"
$py -m pytest tests/gpu -m gpu -q -s -p no:cacheprovider 2>&1 | tee "$log/tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "== training benchmark"
$py bench/train_throughput.py --configs eye --workers 1 --iterations "${GPU_TRAIN_ITERATIONS:-60}" 2>&1 | tee "$log/train.txt"
echo "== refine benchmark"
$py bench/refine_throughput.py --preset eye --rows "${GPU_REFINE_ROWS:-2000000}" 2>&1 | tee "$log/refine.txt"

{
    echo
    echo "### GPU run $(date -u '+%Y-%m-%d %H:%M UTC'), ${device:-unknown GPU}, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') (bench/gpu.sh)"
    echo
    echo "| what | result |"
    echo "|---|---|"
    echo "| tests/gpu | $(tail -n 1 "$log/tests.txt" | tr -d '=|' | sed 's/^ *//') |"
    grep -h -E '^ratio ' "$log/train.txt" | sed 's/^/| training | /; s/$/ |/'
    grep -h -E '^\| .* \| eye \|' "$log/refine.txt" | sed 's/^| /| refine (device, preset, rows, precision, batch, forward, plain loop, e2e steady, e2e wall) | /'
    grep -h -E 'roofline 116,000' "$log/refine.txt" | sed 's/^/| refine vs roofline | /; s/$/ |/'
    grep -h -E '^(refine 100K|hand refine batch|images/s per report)' "$log/tests.txt" | sed 's/^/| tests\/gpu figure | /; s/$/ |/'
} >> bench/RESULTS.md
echo "appended to bench/RESULTS.md (logs in $log)"
exit "$tests_rc"
