#!/usr/bin/env bash
# The whole pipeline on this machine: local Ray, a local folder as object storage, CPU.
#   simulate → train (2 Ray workers, DeepSpeed over gloo) → refine → evaluate
# Usage: bash jobs/demo.sh [OUT_DIR]   (make demo runs it with demo_output/)
set -euo pipefail
out=${1:-demo_output}
data=$out/data
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
config=(--config jobs/configs/tiny.yaml
        --set "data.synthetic=$data/synthetic" --set "data.real=$data/real" --set "data.real_test=$data/real_test"
        --set "train.storage_path=$out/runs" --set train.name=demo)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/4 simulate: labeled synthetic eyes, unlabeled real eyes, a labeled real test set"
simgan-dist simulate --out "$data" --synthetic 4000 --real 2000 --real-test 1000 --seed 0 "${config[@]}"

step "2/4 train: SimGAN with 2 Ray Train workers, DeepSpeed engines, a shared history buffer"
simgan-dist train "${config[@]}" --set train.iterations=200 | tee "$out/train.log"

step "3/4 refine: the whole synthetic corpus with the run's best checkpoint by the label-free objective"
simgan-dist refine --checkpoint "$out/runs/demo" --input "$data/synthetic" --out "$data/refined" "${config[@]}"

step "4/4 evaluate: gaze error on real test images, pupil shift, realism"
simgan-dist evaluate --synthetic "$data/synthetic" --refined "$data/refined" --real-test "$data/real_test" \
    --run "$out/runs/demo" --out "$out/report" "${config[@]}"
