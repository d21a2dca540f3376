#!/usr/bin/env bash
# The GPU numbers of docs/performance.md, in one run of at most ~8 minutes on a CUDA machine:
#   1. benchmarks/bench_optimizer.py on CUDA: torch.optim.SGD (foreach, fused) against SplitLBI
#      (fused Triton step, multi-tensor _foreach step, per-tensor reference step) on the
#      ResNet-18, ResNet-50 and ResNet-56 parameter sets;
#   2. benchmarks/bench_train.py: ResNet-56 on Fashion-MNIST zero-padded to 32x32, SGD vs
#      SplitLBI, on-device pipeline vs textbook loop, with and without --amp / --channels-last;
#   3. a 3-epoch ResNet-56 SplitLBI run at the paper's settings (lr 0.1, momentum 0.9,
#      weight decay 1e-4, kappa 1, nu 100, lambda 1, batch 128, crop-flip, classifier uncoupled).
# It writes OUT_DIR/gpu_check.md (the report) and OUT_DIR/logs/ (every command's output).
# Every step has a time limit; a step that fails or runs out of time is marked in the report
# and the script goes on.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [DATA_DIR]       # OUT_DIR: default $OUT, else gpu_check
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh /tmp/gc    # the same steps on the CPU, tiny sizes
#
# Needs: torch with CUDA, triton (for the fused SplitLBI step), the data folder with
# fashion-mnist (DATA_DIR, default $SPLITLBI_DATA, else ../shared/data). PYTHON picks the
# interpreter (default: python).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${1:-${OUT:-gpu_check}}
data=${2:-${SPLITLBI_DATA:-$repo/../shared/data}}
python=${PYTHON:-python}
dry=${GPU_CHECK_DRY:-0}
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
report=$out/gpu_check.md
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg

if [ "$dry" != "0" ]; then
  device=cpu
  optimizer_args=(--sets resnet56 --repeats 3 --rounds 1 --no-per-tensor)
  train_bench_args=(--models resnet20 --subset 128 --epochs 1 --threads 1)
  train_options=("" "--channels-last")  # bfloat16 autocast is slow on a CPU: no --amp here
  run_args=(--model lenet5 --dataset digits --epochs 1)
  limits=(120 120 120)
else
  device=cuda
  optimizer_args=(--sets resnet18 resnet50 resnet56 --repeats 60 --rounds 3)
  train_bench_args=(--models resnet56 --subset 20480 --epochs 2)
  train_options=("" "--amp" "--channels-last" "--amp --channels-last")
  run_args=(--model resnet56 --dataset fashion-mnist --pad-to 32 --epochs 3)
  limits=(80 65 120)  # seconds: optimizer bench; each of 4 training benches; the 3-epoch run (<= 7.7 min)
  if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device (set GPU_CHECK_DRY=1 to try the script on the CPU)" >&2
    exit 2
  fi
fi

failures=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log, note the outcome
  local name=$1 limit=$2; shift 2
  local start=$SECONDS status
  echo "== $name: $*" >&2
  timeout --kill-after=10 "$limit" "$@" >"$out/logs/$name.log" 2>&1
  status=$?
  local took=$((SECONDS - start))
  if [ $status -eq 0 ]; then
    echo "- \`$name\`: done in ${took} s" >>"$out/steps.md"
  else
    failures=$((failures + 1))
    local why="exit $status"
    [ $status -eq 124 ] && why="stopped at its ${limit} s limit"
    echo "- \`$name\`: **failed** ($why, after ${took} s; see logs/$name.log)" >>"$out/steps.md"
  fi
  return 0
}

: >"$out/steps.md"
"$python" - >"$out/machine.md" 2>&1 <<'EOF'
import platform, torch
print(f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
          f"CUDA {torch.version.cuda}")
try:
    import triton
    print(f"- triton {triton.__version__}")
except Exception as error:
    print(f"- triton: not importable ({type(error).__name__}): SplitLBI's fused CUDA step is off")
from splitlbi.optim.fused import fused_supported
probe = torch.zeros(2, 2, device="cuda" if torch.cuda.is_available() else "cpu")
print(f"- SplitLBI fused step on {probe.device.type}: {fused_supported([probe]) or 'available'}")
EOF

step optimizer "${limits[0]}" "$python" benchmarks/bench_optimizer.py --device "$device" --markdown "${optimizer_args[@]}"
for options in "${train_options[@]}"; do
  name=train${options// /}
  # shellcheck disable=SC2086  # options is a list of flags
  step "$name" "${limits[1]}" "$python" benchmarks/bench_train.py --device "$device" --data-dir "$data" \
    "${train_bench_args[@]}" $options
done
rm -rf "$out/run"
step resnet56-splitlbi "${limits[2]}" "$python" -m splitlbi train --out "$out/run" --device "$device" \
  --data-dir "$data" "${run_args[@]}" --augment crop-flip --optimizer splitlbi --lr 0.1 --momentum 0.9 \
  --weight-decay 1e-4 --kappa 1 --nu 100 --lam 1 --linear-penalty none --batch-size 128 --seed 0 --no-progress

{
  echo "# GPU check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), \`bash scripts/gpu_check.sh\`$([ "$dry" != 0 ] && echo " (GPU_CHECK_DRY=1: CPU, tiny sizes)")"
  echo
  cat "$out/machine.md"
  echo
  echo "## Steps"
  echo
  cat "$out/steps.md"
  echo
  echo "## Optimizer step (\`bench_optimizer.py --device $device ${optimizer_args[*]}\`)"
  echo
  grep -E '^(torch|\|)' "$out/logs/optimizer.log" || echo "(no table: see logs/optimizer.log)"
  echo
  echo "## Training epoch (\`bench_train.py --device $device ${train_bench_args[*]}\`)"
  for options in "${train_options[@]}"; do
    name=train${options// /}
    echo
    echo "### ${options:-default precision and memory format}"
    echo
    grep -E '^(\||cpu |cuda )' "$out/logs/$name.log" || echo "(no table: see logs/$name.log)"
  done
  echo
  echo "## SplitLBI run at the paper's settings (\`splitlbi train ${run_args[*]} ...\`)"
  echo
  if [ -f "$out/run/metrics.csv" ]; then
    echo '```'
    cat "$out/run/metrics.csv"
    echo '```'
  else
    echo "(no metrics.csv: see logs/resnet56-splitlbi.log)"
  fi
  tail -n 5 "$out/logs/resnet56-splitlbi.log" | sed 's/^/    /'
} >"$report"
rm -f "$out/machine.md" "$out/steps.md"
echo "gpu_check: report in $report ($failures step(s) failed)" >&2
[ $failures -eq 0 ]
