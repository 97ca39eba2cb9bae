#!/usr/bin/env bash
# The supervised table: ViT-Tiny trained from scratch on the embedded digits with pruning
# (main_finetune.py --prune_method, no --finetune): Whole dataset, D3P, InfoBatch and random matched epoch by
# epoch to the D3P run of the same seed, SEEDS seeds; then tools/make_table.py prints the table.
#
#   tools/reproduce_supervised.sh                 (CPU, 2 lanes; OUT=./output_supervised)
#
# Variables: OUT, SEEDS ("0 1 2"), EPOCHS (10), LANES (3 parallel single-thread runs), PYTHON.
# One folder per arm and seed: OUT/<arm>_seed<S>/ (log.txt, summary.json, checkpoint). Resumable: a run whose
# summary.json exists is skipped; an interrupted one restarts with --auto_resume.
# Recipe: 16x16 inputs (the digits are 8x8 scans), batch 64, blr 5e-3, 1 warm-up epoch, label smoothing 0.1,
# no mixup/cutmix/RandAugment/erasing/drop path (a 1,500-image data set trained for 10 epochs); D3P s=2, p=3,
# n=2 (decisions at epochs 2, 5, 8; 1-based), 32 bins; InfoBatch r=0.5, delta=0.875. The runs share the cores
# (LANES at a time): wall-clock saved is only meaningful with LANES=1 on an idle machine. D3P runs as published
# (--d3p_max_weight 0 --d3p_min_kept 0: main_finetune.py's classification defaults turn its safety rails on; the
# table in docs/reproducing.md was measured without them). The noisy-label benchmark: tools/train_mlp_digits.py.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./output_supervised}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-10}
LANES=${LANES:-3}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$OUT"
TIMES="$OUT/timings.txt"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$TIMES"; }

run() {  # run ARM SEED
  local arm=$1 seed=$2 dir="$OUT/$1_seed$2" extra=()
  [[ -f "$dir/summary.json" ]] && { log "skip $arm seed $seed: $dir/summary.json exists"; return 0; }
  case $arm in
    random) extra=(--random_match "$OUT/d3p_seed$seed")  # wait for the matched D3P run (another lane)
            while [[ ! -f "$OUT/d3p_seed$seed/summary.json" ]]; do
              grep -q "FAILED d3p seed $seed" "$TIMES" && { log "FAILED random seed $seed: no D3P run"; return 1; }
              sleep 5
            done;;
  esac
  mkdir -p "$dir"
  local t0=$SECONDS
  log "start $arm seed $seed"
  if ! $PY main_finetune.py --model vit_tiny_patch4 --input_size 16 --epochs "$EPOCHS" --warmup_epochs 1 \
      --batch_size 64 --blr 5e-3 --layer_decay 0.75 --weight_decay 0.05 --drop_path 0 --mixup 0 --cutmix 0 \
      --reprob 0 --aa none --smoothing 0.1 --num_workers 0 --save_ckpt_freq 5 --seed "$seed" \
      --prune_method "$arm" --d3p_start 2 --d3p_period 3 --d3p_window 2 --d3p_bins 32 \
      --d3p_max_weight 0 --d3p_min_kept 0 \
      --output_dir "$dir" --auto_resume "${extra[@]}" > "$dir/stdout.txt" 2>&1; then
    log "FAILED $arm seed $seed after $((SECONDS - t0)) s (see $dir/stdout.txt)"
    tail -n 20 "$dir/stdout.txt" >&2
    return 1
  fi
  log "done $arm seed $seed in $((SECONDS - t0)) s"
}

# D3P runs first: random of the same seed replays its per-epoch kept counts (log.txt)
JOBS=()
for arm in d3p none random infobatch; do for seed in $SEEDS; do JOBS+=("$arm:$seed"); done; done
T0=$SECONDS
log "supervised digits: seeds [$SEEDS], $EPOCHS epochs, $LANES lanes"
failed=0
for ((i = 0; i < ${#JOBS[@]}; i += LANES)); do
  pids=()
  for ((k = i; k < i + LANES && k < ${#JOBS[@]}; k++)); do
    run "${JOBS[$k]%%:*}" "${JOBS[$k]##*:}" & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
done
log "all runs finished in $((SECONDS - T0)) s (failures: $failed)"
$PY tools/make_table.py "$OUT"/*_seed*/ | tee "$OUT/table.md"
exit $failed
