#!/usr/bin/env bash
# Everything that needs a GPU, in one command that fits one device lease (at most 8 minutes):
#   bash bench/gpu.sh     # from the repository root; .whl/ (shared/gpu/wheelhouse.sh) when Ray/DeepSpeed are missing
# Stages, in order of what matters most, each under `timeout`: install .whl/ (if present), a preflight
# (< 60 s: torch sees the GPU, Ray and DeepSpeed import, free GPU memory; stops everything with one
# line if not), the training step against the plain-PyTorch step (bench/train_throughput.py, ratio),
# refine images/s (bench/refine_throughput.py), then tests/gpu.
# Results go to $OUT (default: a temp folder) as they come: summary.md (key figures first, then each
# stage's status and the tail of its log) is rewritten after every stage, and each stage keeps its
# full log (<stage>.log), so a lease cut short still returns what ran.
# GPU_BUDGET_S (default 480) bounds the whole run; GPU_TRAIN_ITERATIONS (24), GPU_TRAIN_REPEATS (2),
# GPU_REFINE_ROWS (300,000) and GPU_MIN_FREE_GB (16) size the stages.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-$(mktemp -d /tmp/gpu_bench.XXXXXX)}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset DS_ACCELERATOR  # DeepSpeed must pick the CUDA accelerator
py=${PYTHON:-python3}
budget=${GPU_BUDGET_S:-480}
device=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
started=$(date -u '+%Y-%m-%d %H:%M UTC')
stages=()
declare -A state

# A log's lines as one table cell (empty when there are none: `sed -n .../p` then prints no row).
cell() { tr -d '|' | tr '\n' ' ' | sed 's/  */ /g; s/^ //; s/ $//'; echo; }

# Rewritten whole after every stage (via a temp file), so it is complete whenever the lease ends.
summarize() {
    {
        echo "# bench/gpu.sh: ${device:-no GPU listed by nvidia-smi}, commit $commit, $started"
        echo
        echo "| what | result |"
        echo "|---|---|"
        if [[ -f $out/preflight.log ]]; then
            echo "| preflight | $(grep -h -E '^(ok|FAIL):' "$out/preflight.log" | tail -n 1 | cell) |"
        fi
        if [[ -f $out/train.log ]]; then
            grep -h -E '^ratio ' "$out/train.log" | cell | sed -n 's/^\(..*\)$/| training | \1 |/p'
            # a run cut short still has its per-run rates
            grep -h -E '^\{"config"' "$out/train.log" | sed 's/^/| training run | /; s/$/ |/'
        fi
        if [[ -f $out/refine.log ]]; then
            grep -h -E '^\| .* \| [a-z]+ \| [0-9]+ \|' "$out/refine.log" | sed 's/^| /| refine (device, preset, rows, precision, batch, forward, plain loop, e2e stage, e2e wall, wall vs plain) | /'
            grep -h -E 'roofline' "$out/refine.log" | cell | sed -n 's/^\(..*\)$/| refine vs roofline | \1 |/p'
        fi
        if [[ -f $out/tests.log ]]; then
            echo "| tests/gpu | $(grep -E '(passed|failed|error|skipped|no tests ran)' "$out/tests.log" | tail -n 1 | tr -d '=' | cell) |"
            grep -h -E '^(refine 100K|hand refine batch|images/s per report)' "$out/tests.log" | cell | sed -n 's/^\(..*\)$/| tests\/gpu figures | \1 |/p'
        fi
        echo
        echo "| stage | status |"
        echo "|---|---|"
        for s in "${stages[@]}"; do echo "| $s | ${state[$s]} |"; done
        echo
        echo "## Raw logs (last 60 lines each; full logs beside this file)"
        for s in "${stages[@]}"; do
            [[ -f $out/$s.log ]] || continue
            echo
            echo "### $s ($s.log)"
            echo '```'
            tail -n 60 "$out/$s.log"
            echo '```'
        done
    } > "$out/summary.md.tmp" && mv "$out/summary.md.tmp" "$out/summary.md"
}

# run_stage NAME LIMIT_S COMMAND...: the command's output goes to NAME.log and the console;
# its limit is cut to what is left of the budget.
run_stage() {
    local name=$1 limit=$2 left rc t0
    shift 2
    stages+=("$name")
    left=$((budget - SECONDS))
    if ((left < 20)); then
        state[$name]="skipped: the ${budget} s budget is spent"
        summarize
        return 1
    fi
    ((limit > left)) && limit=$left
    state[$name]="running (limit ${limit} s)"
    summarize
    echo "== $name (limit ${limit} s)"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) state[$name]="ok in $((SECONDS - t0)) s" ;;
        124 | 137) state[$name]="TIMED OUT after ${limit} s" ;;
        *) state[$name]="FAILED (exit $rc) after $((SECONDS - t0)) s" ;;
    esac
    summarize
    return "$rc"
}

if ls .whl/*.whl >/dev/null 2>&1; then
    # shellcheck disable=SC2046  # one argument per wheel
    run_stage install 90 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $(ls .whl/*.whl)
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# One line, "ok: ..." or "FAIL: ...", naming everything missing at once.
if ! run_stage preflight 60 "$py" - "${GPU_MIN_FREE_GB:-16}" <<'PY'
import importlib, sys
problems, found = [], []
try:
    import torch
    found.append(f"torch {torch.__version__}")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        found.append(f"{torch.cuda.get_device_name()}, {free / 2**30:.0f} of {total / 2**30:.0f} GiB free")
        if free < float(sys.argv[1]) * 2**30:
            problems.append(f"only {free / 2**30:.1f} GiB of GPU memory free (need {sys.argv[1]}; another process holds it?)")
    else:
        problems.append(f"torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda})")
except Exception as exc:
    problems.append(f"torch does not import ({exc})")
for name in ("ray", "deepspeed", "pytest", "simgan_dist"):
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '')}".strip())
    except Exception as exc:
        problems.append(f"{name} does not import ({type(exc).__name__}: {exc}; build .whl/ with shared/gpu/wheelhouse.sh)")
if problems:
    print("FAIL: " + "; ".join(problems))
    sys.exit(1)
print("ok: " + ", ".join(found))
PY
then
    echo "bench/gpu.sh: preflight failed: $(grep -h -E '^FAIL:' "$out/preflight.log" | tail -n 1 || echo 'see preflight.log'); nothing else run (summary in $out/summary.md)" >&2
    exit 2
fi

run_stage train 200 "$py" bench/train_throughput.py --configs eye --workers 1 \
    --iterations "${GPU_TRAIN_ITERATIONS:-24}" --repeats "${GPU_TRAIN_REPEATS:-2}"
run_stage refine 120 "$py" bench/refine_throughput.py --preset eye --rows "${GPU_REFINE_ROWS:-300000}" --seconds 5
run_stage tests 150 "$py" -m pytest tests/gpu -m gpu -q -s -p no:cacheprovider
tests_rc=$?
echo "bench/gpu.sh: done in ${SECONDS} s; summary in $out/summary.md"
exit "$tests_rc"
