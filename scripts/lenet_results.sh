#!/usr/bin/env bash
# LeNet-5 with SplitLBI and SGD on MNIST (official test set split 8,000 / 2,000) and
# full Fashion-MNIST (60k / 10k), then Figure 1 from those runs. Numbers and images in
# docs/results.md come from this script:  bash scripts/lenet_results.sh DATA_DIR [RUNS_DIR]
set -euo pipefail
data_dir=${1:?usage: scripts/lenet_results.sh DATA_DIR [RUNS_DIR]}
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

mnist=(--dataset mnist --data-dir "$data_dir" --train-split 8000 --epochs 80 --batch-size 64
       --lr 0.05 --lr-milestones 40 60 --momentum 0.9 --seed 0)
fashion=(--dataset fashion-mnist --data-dir "$data_dir" --epochs 30 --batch-size 128
         --lr 0.05 --lr-milestones 20 --momentum 0.9 --seed 0)

train lenet5-mnist-splitlbi "${mnist[@]}" --optimizer splitlbi --kappa 1 --nu 10 --lam 1
train lenet5-mnist-sgd "${mnist[@]}" --optimizer sgd
train lenet5-fashion-splitlbi "${fashion[@]}" --optimizer splitlbi --kappa 1 --nu 10 --lam 1
train lenet5-fashion-sgd "${fashion[@]}" --optimizer sgd

splitlbi plot path "$runs/lenet5-mnist-splitlbi" "$runs/lenet5-mnist-sgd" --layer conv3 \
  --out "$figures/fig1_paths_mnist.png" --title "LeNet-5 conv3 (c5), MNIST 8k/2k"
splitlbi plot path "$runs/lenet5-fashion-splitlbi" "$runs/lenet5-fashion-sgd" --layer conv3 \
  --out "$figures/fig1_paths_fashion.png" --title "LeNet-5 conv3 (c5), Fashion-MNIST"
splitlbi plot filters "$runs/lenet5-mnist-splitlbi" --layer conv3 --epochs 20 40 80 \
  --out "$figures/fig1_filters_mnist_splitlbi.png" --filters 40
splitlbi plot filters "$runs/lenet5-mnist-sgd" --layer conv3 --epochs 20 40 80 \
  --support-from "$runs/lenet5-mnist-splitlbi" --out "$figures/fig1_filters_mnist_sgd.png" --filters 40
python scripts/summarize_runs.py "$runs"/lenet5-*
