#!/usr/bin/env bash
# The pruning benchmark behind docs/results.md ("Pruning to a budget"): recipes/prune-bench.toml, scale cpu
# (LeNet-5 on full Fashion-MNIST at 67/50/33/25% of the dense MACs; ResNet-20 on a stated 2000-image subset
# at 50/33%; 3 seeds). About 75 minutes on a quiet 2-core machine (two processes, one thread each);
# rerunning skips finished runs and resumes interrupted ones.
#   bash scripts/prune_bench_cpu.sh DATA_DIR [OUT]        (SPLITLBI="python -m splitlbi" if not installed)
set -euo pipefail
data_dir=${1:?usage: scripts/prune_bench_cpu.sh DATA_DIR [OUT]}
out=${2:-runs/prune-bench-cpu}
splitlbi=${SPLITLBI:-splitlbi}
# Two processes, one thread each, on the same --out (each run is locked while it trains; a model and seed
# belongs to one process); then one call over everything, which finds every run finished and writes the
# combined table and plot.
run() { OMP_NUM_THREADS=1 $splitlbi reproduce prune-bench --scale cpu --data-dir "$data_dir" --out "$out" \
          --no-progress "$@"; }
( run --set 'bench.models=["lenet5"]' --set 'run.seeds=[0, 1]'
  run --set 'bench.models=["resnet20"]' --set 'run.seeds=[2]' ) &
( run --set 'bench.models=["lenet5"]' --set 'run.seeds=[2]'
  run --set 'bench.models=["resnet20"]' --set 'run.seeds=[0, 1]' ) &
wait
run
