#!/usr/bin/env bash
# The pruning benchmark behind docs/results.md ("Pruning to a budget"): recipes/prune-bench.toml, scale cpu
# (LeNet-5 on full Fashion-MNIST, ResNet-20 on a stated Fashion-MNIST subset at 32x32; 3 seeds; every method
# at 50% and 33% of the dense MACs). About an hour on 2 shared CPU cores; rerunning skips finished runs and
# resumes interrupted ones.
#   bash scripts/prune_bench_cpu.sh DATA_DIR [OUT]        (SPLITLBI="python -m splitlbi" if not installed)
set -euo pipefail
data_dir=${1:?usage: scripts/prune_bench_cpu.sh DATA_DIR [OUT]}
out=${2:-runs/prune-bench-cpu}
splitlbi=${SPLITLBI:-splitlbi}
# Two processes, one thread each (one per model), on the same --out (each run is locked while it trains);
# then one call over both models, which finds every run finished and writes the combined table and plot.
OMP_NUM_THREADS=1 $splitlbi reproduce prune-bench --scale cpu --set 'bench.models=["lenet5"]' \
  --data-dir "$data_dir" --out "$out" --no-progress &
OMP_NUM_THREADS=1 $splitlbi reproduce prune-bench --scale cpu --set 'bench.models=["resnet20"]' \
  --data-dir "$data_dir" --out "$out" --no-progress
wait
OMP_NUM_THREADS=1 $splitlbi reproduce prune-bench --scale cpu --data-dir "$data_dir" --out "$out" --no-progress
