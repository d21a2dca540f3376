#!/usr/bin/env bash
# The prune benchmark in the reference regime (docs/results.md, "Pruning ResNet-20 in the reference regime"):
# splitlbi reproduce prune-bench --scale resnet. Give it the OUT of scripts/resnet_path_cpu.sh: the SGD and
# SplitLBI runs of the 12-epoch schedule are the same runs (or name finished ones with REUSE="RUN ...").
# Two processes side by side (one thread each), budget by budget so that a stop leaves whole budgets:
# seeds 0 and 1 together, then seed 2 split between both (one takes the methods in the other order;
# a job the other holds is waited for, then found finished). Rerunning resumes and skips finished jobs.
#   scripts/prune_bench_resnet.sh OUT [DATA_DIR]
# METHODS (default: splitlbi_finetune l1 taylor) and BUDGETS (default: 0.5 0.3333333) narrow it.
set -euo pipefail
OUT=${1:?usage: scripts/prune_bench_resnet.sh OUT [DATA_DIR]}
DATA=${2:-${SPLITLBI_DATA:-}}
read -r -a methods <<< "${METHODS:-splitlbi_finetune l1 taylor}"
read -r -a budgets <<< "${BUDGETS:-0.5 0.3333333}"
mkdir -p "$OUT"

list() { local IFS=,; printf '[%s]' "$*"; }
quoted() { local out=() m; for m in "$@"; do out+=("\"$m\""); done; list "${out[@]}"; }
forward=$(quoted "${methods[@]}")
reversed=$(quoted $(printf '%s\n' "${methods[@]}" | tac))
bench() {  # seeds budget methods log
  OMP_NUM_THREADS=1 splitlbi reproduce prune-bench --scale resnet --out "$OUT" ${DATA:+--data-dir "$DATA"} \
    --no-progress --set "run.seeds=$1" --set "bench.budgets=[$2]" --set "bench.methods=$3" \
    ${REUSE:+--reuse $REUSE} > "$4" 2>&1
}
for budget in "${budgets[@]}"; do
  bench "[0]" "$budget" "$forward" "$OUT/prune-bench-$budget-seed0.log" &
  bench "[1]" "$budget" "$forward" "$OUT/prune-bench-$budget-seed1.log"
  wait
  bench "[2]" "$budget" "$forward" "$OUT/prune-bench-$budget-seed2a.log" &
  bench "[2]" "$budget" "$reversed" "$OUT/prune-bench-$budget-seed2b.log"
  wait
done
# The table of every seed and budget from the finished runs (runs nothing).
splitlbi reproduce prune-bench --scale resnet --out "$OUT" ${DATA:+--data-dir "$DATA"} --no-progress \
  --set "bench.methods=$forward" --set "bench.budgets=$(list "${budgets[@]}")" --set bench.report_only=true
cat "$OUT/figures/prune_bench.md"
