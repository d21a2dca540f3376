#!/usr/bin/env bash
# ResNet-20 (CIFAR ResNet, option-A shortcuts) with SplitLBI (Mom-Wd) and SGD (Mom-Wd) on
# full Fashion-MNIST zero-padded to 32x32 (CIFAR-10 is not available on our machines; with
# it, use --dataset cifar10 and drop --pad-to). A schedule that fits a 2-core CPU:
# 8 epochs, lr 0.1, x0.1 after epoch 5, batch 128, crop-flip augmentation.
#   bash scripts/resnet20_fashion.sh DATA_DIR [RUNS_DIR]
set -euo pipefail
data_dir=${1:?usage: scripts/resnet20_fashion.sh DATA_DIR [RUNS_DIR]}
runs=${2:-runs}
common=(--model resnet20 --dataset fashion-mnist --data-dir "$data_dir" --pad-to 32 --augment crop-flip
        --epochs 8 --lr 0.1 --lr-milestones 5 --batch-size 128 --momentum 0.9 --weight-decay 1e-4
        --seed 0 --save-every 5 --no-progress)
train() {  # name, then arguments; resumes an interrupted run, skips a finished one
  local out="$runs/$1"; shift
  if [ -f "$out/checkpoints/last.pt" ]; then splitlbi train --resume "$out" --epochs 8 --no-progress
  else splitlbi train --out "$out" "${common[@]}" "$@"; fi
}
# the two runs are independent: one per core
OMP_NUM_THREADS=1 train resnet20-fashion-splitlbi --optimizer splitlbi --kappa 1 --nu 100 --lam 1 &
OMP_NUM_THREADS=1 train resnet20-fashion-sgd --optimizer sgd &
wait
python scripts/summarize_runs.py "$runs"/resnet20-fashion-*
