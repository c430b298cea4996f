#!/usr/bin/env bash
# Trains all three views of configs/synth_gpu_v2.yaml (the sagittal view: its 2D variant
# configs/synth_gpu_v2_2d.yaml) on one GPU within a wall-clock budget and writes the exported
# model, the training logs and the GPU's description to OUTDIR.
#
#   training/gpu_recipe.sh OUTDIR [DATA]
#
# DATA is a folder laid out as ../shared/data (label_maps/, synthseg_priors/, real_labelled/);
# default ../shared/data. Each view trains in its own process (generator workers on the CPU
# cores, the network on the GPU in bf16, channels-last) from the shipped model (--init). A view
# still training when the budget ends is stopped as Ctrl-C would stop it: its best checkpoint so
# far (kept on the real validation scan) is what is exported. Environment (defaults):
#   QN_DEVICE (cuda)  QN_BUDGET_S (420: seconds of training per view, all views at once)
#   QN_WORKERS (5 per view)  QN_EPOCHS, QN_STEPS (override the config's epochs, steps per epoch)
# On the device machine (no nibabel or MONAI there), carry their wheels in .whl/ and the data in
# an ignored folder, e.g.:  training/gpu_recipe.sh "$OUT" .gpu_data
set -euo pipefail
OUTDIR=${1:?usage: training/gpu_recipe.sh OUTDIR [DATA]}
DATA=$(cd "${2:-../shared/data}" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=${QN_DEVICE:-cuda}
BUDGET=${QN_BUDGET_S:-420}
WORKERS=${QN_WORKERS:-5}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
QN="python3 -m quicknat.cli"
{ date -u; nvidia-smi -L 2>/dev/null || true; python3 -c "import torch; print('torch', torch.__version__)"; } \
  > "$OUTDIR/machine.txt"

extra=()
[ -n "${QN_EPOCHS:-}" ] && extra+=(--epochs "$QN_EPOCHS")
for view in coronal axial sagittal; do  # each view's recipe, with the priors in DATA (and QN_STEPS)
  recipe=synth_gpu_v2.yaml
  [ "$view" = sagittal ] && recipe=synth_gpu_v2_2d.yaml
  { echo "base: $ROOT/configs/$recipe"; [ -n "${QN_STEPS:-}" ] && echo "steps_per_epoch: $QN_STEPS"
    printf 'synth:\n  priors: %s\n' "$DATA/synthseg_priors"; } > "$WORK/config_$view.yaml"
done

$QN prepare labelmaps "$DATA/label_maps" -o "$WORK/data" --holdout training_seg_19 training_seg_20 \
  --validation-scan "$DATA/real_labelled/vxm_t1.nii.gz" "$DATA/real_labelled/vxm_aseg.nii.gz" \
  > "$WORK/prepare.log" 2>&1

start=$(date +%s)
pids=()
for view in coronal axial sagittal; do
  timeout -s INT -k 60 "$BUDGET" $QN train "$WORK/data/manifest.json" -o "$WORK/run_$view" --view "$view" \
    --config "$WORK/config_$view.yaml" --init src/quicknat/models/default --device "$DEVICE" --workers "$WORKERS" \
    "${extra[@]}" -v > "$WORK/train_$view.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done  # 124/130: stopped by the budget
echo "training: $(( $(date +%s) - start )) s wall, last exit status $status" >> "$OUTDIR/machine.txt"

runs=()
for view in coronal axial sagittal; do  # a view stopped before its first epoch keeps the shipped weights
  [ -f "$WORK/run_$view/$view.pt" ] && runs+=("$WORK/run_$view")
done
$QN export src/quicknat/models/default "${runs[@]}" -o "$OUTDIR/model" > "$WORK/export.log" 2>&1
tar -czf "$OUTDIR/logs.tar.gz" -C "$WORK" prepare.log export.log config_coronal.yaml config_axial.yaml config_sagittal.yaml \
  $(cd "$WORK" && ls train_*.log run_*/*/history.json 2>/dev/null)
echo "model: $OUTDIR/model"
