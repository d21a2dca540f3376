#!/usr/bin/env bash
# Table 1's LeNet-5 column and Figure 1 on MNIST's official split (60,000 training / 10,000 test images).
#
#   bash scripts/lenet_results.sh DATA_DIR [RUNS_DIR [more `splitlbi compare` options]]
#
# 1. `splitlbi compare`: the 13 optimizer variants of Table 1 (SplitLBI Naive / Mom / Mom-Wd, SGD Naive / Mom /
#    Mom-Wd / Nesterov, Adam, AdamW, AdaGrad, RMSprop, RAdam, AMSGrad) x 3 seeds, one schedule for all;
#    RUNS_DIR/table.md, table.csv (mean ± std) and runs.csv (per seed), copied to FIGURES/lenet5_mnist_table1*.
# 2. Figure 1 from the seed-0 SplitLBI (Mom-Wd) and SGD (Mom-Wd) runs (the same seed: the same initialization):
#    the filter-norm paths of conv c5 (conv3, 120 filters) over the whole run, and activation maximization of
#    12 selected and 12 unselected c5 filters of both runs at FIG_EPOCHS (with a CSV of every filter's norm,
#    support and activation gain).
# docs/results.md's LeNet-5 / MNIST numbers and figures come from this script. Re-running skips finished runs
# and resumes interrupted ones. More options go to `splitlbi compare`, e.g. `--train-split 8000` where only
# MNIST's test set is at hand (train on its first 8,000 images, test on the other 2,000).
# Environment (defaults in brackets): PYTHON [python], FIGURES [docs/figures], EPOCHS [20], MILESTONE [15],
# SAVE_EVERY [5], SEEDS [0 1 2], VARIANTS [all 13], FIG_EPOCHS [5 10 20], AM_STEPS [200]; the test suite
# runs the script with a few hundred images this way.
set -euo pipefail
data_dir=${1:?usage: scripts/lenet_results.sh DATA_DIR [RUNS_DIR [splitlbi compare options]]}
runs=${2:-runs/lenet5-mnist}
shift $(( $# < 2 ? $# : 2 ))
figures=${FIGURES:-docs/figures}
read -r -a seeds <<< "${SEEDS:-0 1 2}"
all_variants="splitlbi-naive splitlbi-mom splitlbi-mom-wd sgd-naive sgd-mom sgd-mom-wd sgd-nesterov adam adamw adagrad
  rmsprop radam amsgrad"
# `read` stops at the first newline: fold the list onto one line first.
read -r -a variants <<< "$(tr '\n' ' ' <<< "${VARIANTS:-$all_variants}")"
read -r -a fig_epochs <<< "${FIG_EPOCHS:-5 10 20}"
mkdir -p "$runs" "$figures"

splitlbi() { "${PYTHON:-python}" -m splitlbi "$@"; }

# The schedule that fits a 2-core CPU (docs/results.md): 20 epochs, batch 128, lr 0.01 (SGD, SplitLBI; the
# adaptive methods their own) x0.1 after epoch 15, weight decay 5e-4 in the -wd rows; SplitLBI kappa, nu, lambda
# below with group lasso on the conv filters and the classifier uncoupled (compare's default).
splitlbi compare --model lenet5 --dataset mnist --data-dir "$data_dir" \
  --epochs "${EPOCHS:-20}" --batch-size 128 --lr 0.01 --lr-milestones "${MILESTONE:-15}" --weight-decay 5e-4 \
  --kappa 1 --nu 10 --lam 1.5 --layer conv3 --seeds "${seeds[@]}" --optimizers "${variants[@]}" \
  --save-every "${SAVE_EVERY:-5}" --no-progress --out "$runs" "$@"
cp "$runs/table.md" "$figures/lenet5_mnist_table1.md"
cp "$runs/table.csv" "$figures/lenet5_mnist_table1.csv"
cp "$runs/runs.csv" "$figures/lenet5_mnist_table1_runs.csv"

# Figure 1 needs both seed-0 Mom-Wd runs (each name tested on its own: adjacent names share a space).
case " ${variants[*]} " in *" splitlbi-mom-wd "*) ;; *) exit 0 ;; esac
case " ${variants[*]} " in *" sgd-mom-wd "*) ;; *) exit 0 ;; esac
lbi=$runs/splitlbi-mom-wd/seed${seeds[0]}
sgd=$runs/sgd-mom-wd/seed${seeds[0]}
splitlbi plot path "$lbi" "$sgd" --layer conv3 --out "$figures/fig1_paths_mnist.png" \
  --title "LeNet-5 conv c5 (conv3): filter norms, MNIST 60k/10k, same initialization"
splitlbi plot filters "$lbi" --layer conv3 --epochs "${fig_epochs[@]}" --per-group 12 --steps "${AM_STEPS:-200}" \
  --out "$figures/fig1_filters_mnist_splitlbi.png" --no-progress
splitlbi plot filters "$sgd" --layer conv3 --epochs "${fig_epochs[@]}" --per-group 12 --steps "${AM_STEPS:-200}" \
  --support-from "$lbi" --out "$figures/fig1_filters_mnist_sgd.png" --no-progress
