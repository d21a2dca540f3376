#!/usr/bin/env bash
# LeNet-5 with SplitLBI and SGD on the full Fashion-MNIST (60,000 / 10,000), seed 0, and the filter-path figure:
# docs/results.md's Fashion-MNIST rows.  bash scripts/lenet_fashion.sh DATA_DIR [RUNS_DIR]
# (Until MNIST's training set was at hand these runs were part of scripts/lenet_results.sh, with the same settings;
# --linear-penalty auto keeps the lasso on the linear weights that was the default when the numbers were made.)
set -euo pipefail
data_dir=${1:?usage: scripts/lenet_fashion.sh DATA_DIR [RUNS_DIR]}
runs=${2:-runs}
figures=docs/figures
mkdir -p "$runs" "$figures"

train() {  # name, then arguments; skips a finished run, resumes an interrupted one
  local out="$runs/$1"; shift
  if [ -f "$out/checkpoints/last.pt" ]; then
    splitlbi train --resume "$out" --no-progress
  else
    splitlbi train --out "$out" --no-progress "$@"
  fi
}

fashion=(--dataset fashion-mnist --data-dir "$data_dir" --epochs 30 --batch-size 128
         --lr 0.05 --lr-milestones 20 --momentum 0.9 --seed 0)

train lenet5-fashion-splitlbi "${fashion[@]}" --optimizer splitlbi --kappa 1 --nu 10 --lam 1 --linear-penalty auto
train lenet5-fashion-sgd "${fashion[@]}" --optimizer sgd

splitlbi plot path "$runs/lenet5-fashion-splitlbi" "$runs/lenet5-fashion-sgd" --layer conv3 \
  --out "$figures/fig1_paths_fashion.png" --title "LeNet-5 conv3 (c5), Fashion-MNIST"
python scripts/summarize_runs.py "$runs"/lenet5-fashion-*
