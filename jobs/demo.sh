#!/usr/bin/env bash
# The whole pipeline on this machine: local Ray, a local folder as object storage, CPU.
#   simulate → tune (a 2-trial Ray Tune sweep of Ray Train + DeepSpeed runs) → refine → evaluate
# Usage: bash jobs/demo.sh [OUT_DIR]   (make demo runs it with demo_output/; SEED=1 trains with seed 1,
#        SIM_SEED=1 simulates another corpus, DEMO_SET="train.keep_best=100 ..." adds --set overrides,
#        FROM_STEP=3 refines and evaluates a finished sweep again; KIND=hand runs the paper's hand
#        experiment on 64x64 depth maps instead: make demo-hand)
set -euo pipefail
out=${1:-demo_output}
data=$out/data
seed=${SEED:-0}
sim_seed=${SIM_SEED:-0}
from=${FROM_STEP:-1}
kind=${KIND:-eye}
case $kind in
  eye)  recipe=jobs/configs/tiny.yaml; shape=(); things="eyes"; sweep="λ 1 and 2"; check="gaze error on real test images (3 estimator seeds), pupil shift" ;;
  hand) recipe=jobs/configs/hand-tiny.yaml; shape=(--kind hand --hand-size 64); things="hand depth maps"; sweep="λ 0.01 and 0.1"
        check="hand joint error on real test depth maps (3 estimator seeds), silhouette shift" ;;
  *) echo "KIND must be eye or hand, got '$kind'" >&2; exit 2 ;;
esac
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# MLflow: a local store in the output folder (an absolute path: trials and workers run in folders of their own)
store="sqlite:///$(mkdir -p "$out" && cd "$out" && pwd)/mlflow.db"
config=(--config "$recipe"
        --set "data.synthetic=$data/synthetic" --set "data.real=$data/real" --set "data.real_test=$data/real_test"
        --set "train.storage_path=$out/runs" --set train.name=demo --set "train.seed=$seed"
        --set "tune.output=$out/sweeps" --set tune.name=demo --set "tracking.mlflow_uri=$store")
for override in ${DEMO_SET:-}; do config+=(--set "$override"); done

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if (( from <= 1 )); then
step "1/4 simulate: labeled synthetic $things, unlabeled real $things, a labeled real test set"
simgan-dist simulate --out "$data" --synthetic 4000 --real 2000 --real-test 1000 --seed "$sim_seed" --overwrite \
    "${shape[@]}" "${config[@]}"  # a rerun renders the same rows
fi
if (( from <= 2 )); then
step "2/4 tune: 2 trials ($sweep), each a Ray Train run (1 worker, DeepSpeed) with its own history buffer; a rung on the label-free objective, completed trials judged"
simgan-dist tune "${config[@]}" --set train.num_workers=1 | tee "$out/tune.log"
fi

step "3/4 refine: the whole synthetic corpus with the winning trial's chosen checkpoint"
simgan-dist refine --checkpoint "$out/sweeps/demo" --input "$data/synthetic" --out "$data/refined" "${config[@]}"

step "4/4 evaluate: $check, realism"
best=$(head -n 1 "$out/sweeps/demo/best_checkpoint.txt")
simgan-dist evaluate --synthetic "$data/synthetic" --refined "$data/refined" --real-test "$data/real_test" \
    --run "$(dirname "$best")" --out "$out/report" "${config[@]}"

step "MLflow: the sweep, its trials, the refine and evaluate runs (the UI is in the full mlflow package: README, \"Experiment tracking\")"
echo "mlflow ui --backend-store-uri $store"
