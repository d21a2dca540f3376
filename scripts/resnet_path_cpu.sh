#!/usr/bin/env bash
# The reference regime of docs/results.md ("The path of a residual BatchNorm network"): ResNet-20 on the full
# Fashion-MNIST, 12 epochs, SGD and the SplitLBI candidates of recipes/resnet-path.toml, 3 seeds each.
# Two reproductions share OUT side by side (one thread each, the fastest setting on 2 CPU cores, see
# benchmarks/bench_cpu_setup.py): each trains the runs the other is not training. Rerunning resumes.
#   scripts/resnet_path_cpu.sh OUT [DATA_DIR]
set -euo pipefail
OUT=${1:?usage: scripts/resnet_path_cpu.sh OUT [DATA_DIR]}
DATA=${2:-${SPLITLBI_DATA:-}}
mkdir -p "$OUT"
for i in 1 2; do
  OMP_NUM_THREADS=1 splitlbi reproduce resnet-path --scale cpu --out "$OUT" ${DATA:+--data-dir "$DATA"} \
    --no-progress > "$OUT/resnet-path-$i.log" 2>&1 &
  sleep 60  # the second one finds the first one's first run locked
done
wait
tail -n 30 "$OUT/figures/resnet-path.md"
