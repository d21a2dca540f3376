#!/usr/bin/env bash
# The CPU-scale reproduction behind docs/results.md ("The paper's figures"): ResNet-20 on the first
# 10,000 Fashion-MNIST training images padded to 32x32, 10 epochs (recipes/*.toml, scale cpu), and
# LeNet-5 on MNIST's official split for Figure 1 (the same two runs as the seed-0 Mom-Wd runs of
# scripts/lenet_results.sh; `splitlbi reproduce fig1 --scale cpu --reuse RUNS/splitlbi-mom-wd/seed0
# RUNS/sgd-mom-wd/seed0` copies those instead of training them). About 25 runs of ~3-5 min each on 2 CPU
# cores; rerunning skips finished runs and resumes interrupted ones.
#   bash scripts/reproduce_cpu.sh DATA_DIR [OUT]
set -euo pipefail
data_dir=${1:?usage: scripts/reproduce_cpu.sh DATA_DIR [OUT]}
out=${2:-runs/reproduce-cpu}
# Two processes, one thread each, on the same --out (each run is locked while it trains).
OMP_NUM_THREADS=1 splitlbi reproduce fig3 fig4 fig6 fig8 --scale cpu --data-dir "$data_dir" --out "$out" \
  --no-progress &
OMP_NUM_THREADS=1 splitlbi reproduce fig7 fig2 fig5 --scale cpu --data-dir "$data_dir" --out "$out" --no-progress
wait
splitlbi reproduce fig1 --scale cpu --data-dir "$data_dir" --out "$out" --no-progress
mkdir -p docs/figures
for name in fig1 fig1_filters fig1_filters_sgd fig2 fig3 fig4 fig5 fig6 fig7 fig8; do
  cp "$out/figures/$name.png" "docs/figures/reproduce_cpu_$name.png"
done
cp "$out/figures/fig5_table.md" docs/figures/reproduce_cpu_fig5_table.md
