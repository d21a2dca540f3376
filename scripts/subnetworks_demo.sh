#!/usr/bin/env bash
# CPU-scale sub-network comparison (docs/results.md, "Sub-networks"): ResNet-20 on Fashion-MNIST padded
# to 32x32, the first 10,000 training and 2,000 test images, 10 epochs everywhere (lr 0.1, x0.1 after
# epoch 7, batch 128, momentum 0.9, weight decay 1e-4, crop-flip). SplitLBI couples the conv layers only.
#   bash scripts/subnetworks_demo.sh DATA_DIR [RUNS_DIR] [EPOCH_K]
# Finished runs are skipped, so the script can be rerun after an interruption.
set -euo pipefail
data_dir=${1:?usage: scripts/subnetworks_demo.sh DATA_DIR [RUNS_DIR] [EPOCH_K]}
runs=${2:-runs/subnetworks}
k=${3:-5}
mkdir -p "$runs"
data=(--model resnet20 --dataset fashion-mnist --data-dir "$data_dir" --pad-to 32 --augment crop-flip
      --limit-train 10000 --limit-test 2000)
schedule=(--epochs 10 --lr 0.1 --lr-milestones 7 --batch-size 128 --momentum 0.9 --weight-decay 1e-4)
retrain_schedule=(--epochs 10 --lr 0.1 --lr-milestones 7 --momentum 0.9 --weight-decay 1e-4)
done_() { [ -f "$1/metrics.csv" ] && [ "$(tail -n 1 "$1/metrics.csv" | cut -d, -f1)" = "$2" ]; }
fresh() { rm -rf "$1"; }  # retrain/baseline runs cannot resume: an interrupted one starts again

# The two dense runs train with one thread each, side by side (2 cores).
export OMP_NUM_THREADS=1
done_ "$runs/splitlbi" 10 || { [ -f "$runs/splitlbi/checkpoints/last.pt" ] && splitlbi train --resume "$runs/splitlbi" --no-progress; } \
  || splitlbi train "${data[@]}" "${schedule[@]}" --optimizer splitlbi --kappa 1 --nu 20 --lam 1 \
     --linear-penalty none --seed 0 --no-progress --out "$runs/splitlbi" &
done_ "$runs/sgd" 10 || { [ -f "$runs/sgd/checkpoints/last.pt" ] && splitlbi train --resume "$runs/sgd" --no-progress; } \
  || splitlbi train "${data[@]}" "${schedule[@]}" --optimizer sgd --seed 0 --no-progress --out "$runs/sgd" &
wait

splitlbi masks "$runs/splitlbi" --epoch "$k" --out "$runs/splitlbi_masks.pt"
splitlbi masks "$runs/sgd" --like "$runs/splitlbi_masks.pt" --out "$runs/sgd_masks.pt"
keep=$(python - "$runs/splitlbi_masks.pt" <<'PY'
import sys
from splitlbi.prune import mask_sparsity, read_mask_file
masks = {n: m for n, m in read_mask_file(sys.argv[1])["masks"].items() if m.dim() == 4}
s = mask_sparsity(masks)
print(round(sum(s.filters_kept.values()) / sum(s.filters_total.values()), 4))
PY
)
echo "SplitLBI keeps a share $keep of the conv filters at epoch $k"

# Four independent trainings, two at a time with one thread each.
(done_ "$runs/splitlbi-lottery" 10 || { fresh "$runs/splitlbi-lottery"; splitlbi retrain "$runs/splitlbi" --epoch "$k" \
   --mode lottery "${retrain_schedule[@]}" --out "$runs/splitlbi-lottery"; }) > "$runs/splitlbi-lottery.log" 2>&1 &
(done_ "$runs/sgd-lottery" 10 || { fresh "$runs/sgd-lottery"; splitlbi retrain "$runs/sgd" --mode lottery \
   --masks "$runs/sgd_masks.pt" "${retrain_schedule[@]}" --out "$runs/sgd-lottery"; }) > "$runs/sgd-lottery.log" 2>&1
wait
(done_ "$runs/slimming" 10 || { fresh "$runs/slimming"; fresh "$runs/slimming_sparse"; splitlbi baseline slimming \
   --keep "$keep" "${data[@]}" "${schedule[@]}" --seed 0 --out "$runs/slimming"; }) > "$runs/slimming.log" 2>&1 &
(done_ "$runs/scratch-e" 10 || { fresh "$runs/scratch-e"; splitlbi baseline scratch-e --masks "$runs/splitlbi_masks.pt" \
   "${data[@]}" "${schedule[@]}" --seed 0 --out "$runs/scratch-e"; }) > "$runs/scratch-e.log" 2>&1
wait
unset OMP_NUM_THREADS
python scripts/summarize_subnetworks.py "$runs" "$k"
