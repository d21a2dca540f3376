#!/usr/bin/env bash
# The runs behind docs/defaults.md: `splitlbi train` on its default data (LeNet-5, digits,
# 20 epochs, batch 128) for several lr / nu / --linear-penalty settings and seeds, then one
# line per run with the last epoch's dense and sparse test accuracy and non-zeros of Γ.
# Usage: bash scripts/defaults_sweep.sh [OUT_DIR]   (about 20 s per run on a quiet 2-core CPU)
set -euo pipefail
out="${1:-runs/defaults-sweep}"
export OMP_NUM_THREADS=1   # the numbers in docs/defaults.md were taken with one thread
settings=(
  "0.1 100 auto" "0.1 10 auto" "0.1 3 auto"
  "0.1 10 none" "0.1 5 none"
  "0.05 5 none" "0.05 3 none" "0.05 2 none" "0.02 2 none"
)
for setting in "${settings[@]}"; do
  read -r lr nu linear <<<"$setting"
  for seed in 0 1 2; do
    run="$out/lr$lr-nu$nu-linear-$linear-seed$seed"
    [ -f "$run/metrics.csv" ] && [ "$(wc -l <"$run/metrics.csv")" -gt 20 ] && continue
    rm -rf "$run"
    splitlbi train --out "$run" --lr "$lr" --nu "$nu" --linear-penalty "$linear" --seed "$seed" --no-progress >/dev/null
  done
done
python - "$out" <<'PY'
import csv, sys
from pathlib import Path
print("| run | dense test acc | sparse test acc | non-zeros of Γ |")
print("|---|---|---|---|")
for run in sorted(Path(sys.argv[1]).iterdir()):
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    last = rows[-1]
    share = float(last.get("gamma_nonzero_share") or last.get("sparsity"))
    print(f"| {run.name} | {float(last['test_acc']):.2f} | {float(last['sparse_test_acc']):.2f} | {100 * share:.1f}% |")
PY
