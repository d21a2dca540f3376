#!/usr/bin/env bash
# The pruning benchmark behind docs/results.md ("Pruning to a budget"): recipes/prune-bench.toml, scale cpu
# (LeNet-5 and ResNet-20 on stated Fashion-MNIST subsets; 3 seeds; every method at 50% and 33% of the dense
# MACs). About an hour on 2 CPU cores shared with other jobs; rerunning skips finished runs and resumes
# interrupted ones.
#   bash scripts/prune_bench_cpu.sh DATA_DIR [OUT]        (SPLITLBI="python -m splitlbi" if not installed)
set -euo pipefail
data_dir=${1:?usage: scripts/prune_bench_cpu.sh DATA_DIR [OUT]}
out=${2:-runs/prune-bench-cpu}
splitlbi=${SPLITLBI:-splitlbi}
# Four processes, one thread each (LeNet-5; ResNet-20 one per seed), on the same --out (each run is locked
# while it trains); then one call over everything, which finds every run finished and writes the combined
# table and plot.
run() { OMP_NUM_THREADS=1 $splitlbi reproduce prune-bench --scale cpu --data-dir "$data_dir" --out "$out" \
          --no-progress "$@"; }
run --set 'bench.models=["lenet5"]' &
for seed in 0 1 2; do
  run --set 'bench.models=["resnet20"]' --set "run.seeds=[$seed]" &
done
wait
run
