#!/usr/bin/env bash
# Reproduce Table 1 of the D3P paper: every arm pre-trains with the same epochs and seeds, then is fine-tuned and
# linearly probed, then tools/make_table.py prints the table.
#
#   tools/reproduce_table1.sh                          CPU: the embedded digits, tiny model (21-25 min, 2 cores)
#   DATA_PATH=/data/imagenet NPROC=8 tools/reproduce_table1.sh   the paper's recipe, arm by arm through train_d3p.sh
#
# Variables: OUT (./output_table1), SEEDS ("0"), ARMS (all: none infobatch seta d3p random dynunc d2, plus scratch
# on the digits), LANES (digits only: arms run in this many parallel single-thread lanes, default 2 = the cores).
# DATA_PATH mode also honours train_d3p.sh's cluster variables (NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# EPOCHS, FT_EPOCHS, ...) and LP_EPOCHS (90).
#
# Arms: none = Whole dataset, infobatch, seta, d3p, random = random dynamic matched epoch by epoch to the D3P run
# of the same seed (--random_match OUT/d3p_seed<S>/pretrain; the D3P arm always runs first), dynunc, d2, and on
# the digits scratch = fine-tune / linear probe of a randomly initialised ViT (no pre-training: shows what the
# pre-training is worth). One folder per arm and seed: OUT/<arm>_seed<S>/{pretrain,finetune,linprobe}.
# Resumable: a stage whose summary.json exists is skipped; an interrupted stage restarts with --auto_resume.
#
# Digits sizing (measured on this 2-core machine while it was shared, load ~3; one thread per process, 16x16
# inputs, 2 lanes): whole-data pre-training 30 epochs 271 s (7-10 s/epoch; ~4 s/epoch when the cores are idle),
# fine-tuning 10 epochs ~160 s, linear probe 10 epochs ~40 s; all 8 arms of one seed: 1,261 s (21 min) wall; LANES=1 on an idle machine: 1,495 s (25 min).
# The digits are 8x8 scans, so 16x16 inputs lose nothing and cost a quarter of 32x32 (16 vs 64 patches).
# Choices: 30 pre-training epochs (D3P decides at epochs 3, 8, ..., 28: s=3, p=5, n=2; 32 bins for N=1,500),
# static warm-up J=5, the other flags at their defaults (r=0.5, delta=0.875); fine-tune 10 epochs (blr 5e-3, no
# mixup/cutmix/RandAugment: the pre-trained model reaches ~97-98% vs ~85% from scratch); linear probe 10 epochs,
# LARS, blr 16 (lr 4.0 at batch 64: MAE's blr 0.1 is tuned for batch 16384 and leaves a 64-batch probe at chance,
# ~15%; blr 16 gives ~82% pre-trained vs ~29% from scratch). ONE seed by default: a second seed doubles the time
# (~40 min when shared, too close to the 45-minute budget). With one seed and 297 validation images (1 image =
# 0.34 points) FT/LP differences below ~1-2 points are within noise: use SEEDS="0 1 2" for error bars.
# Wall-clock saved is only meaningful on an otherwise idle machine (two lanes share the cores).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./output_table1}
SEEDS=${SEEDS:-0}
PY=${PYTHON:-python}
mkdir -p "$OUT"
TIMES="$OUT/timings.txt"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$TIMES"; }

# run_stage NAME FOLDER COMMAND...: skip when FOLDER/summary.json exists, else run and log the wall time
run_stage() {
  local name=$1 folder=$2; shift 2
  if [[ -f "$folder/summary.json" ]]; then
    log "skip $name: $folder/summary.json exists"
    return 0
  fi
  mkdir -p "$folder"
  local t0=$SECONDS
  log "start $name"
  if ! "$@" > "$folder/stdout.txt" 2>&1; then
    log "FAILED $name after $((SECONDS - t0)) s (see $folder/stdout.txt)"
    tail -n 20 "$folder/stdout.txt" >&2
    return 1
  fi
  log "done $name in $((SECONDS - t0)) s"
}

if [[ -z "${DATA_PATH:-}" ]]; then
  # ------------------------------------------------------------------------------------------------ digits, CPU
  ARMS=${ARMS:-"none infobatch seta d3p random dynunc d2 scratch"}
  LANES=${LANES:-2}
  EPOCHS=${EPOCHS:-30}; FT_EPOCHS=${FT_EPOCHS:-10}; LP_EPOCHS=${LP_EPOCHS:-10}
  SIZE=${SIZE:-16}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}

  pretrain() {  # pretrain ARM SEED DIR
    local arm=$1 seed=$2 dir=$3 extra=()
    case $arm in
      random) local d3p="$OUT/d3p_seed$seed/pretrain"
              if [[ ! -f "$d3p/summary.json" ]]; then
                log "FAILED random_seed$seed: the matched D3P run $d3p has not finished (ARMS must include d3p)"
                return 1
              fi
              extra=(--random_match "$d3p");;
      dynunc|d2) extra=(--static_warmup_epochs 5);;
    esac
    run_stage "${arm}_seed$seed/pretrain" "$dir" \
      $PY main_pretrain_d3p.py --input_size "$SIZE" --epochs "$EPOCHS" --warmup_epochs 3 --batch_size 64 \
        --blr 1.5e-3 --prune_method "$arm" --d3p_start 3 --d3p_period 5 --d3p_window 2 --d3p_bins 32 \
        --num_workers 0 --save_every 10 --seed "$seed" --output_dir "$dir" --auto_resume "${extra[@]}"
  }

  downstream() {  # downstream ARM SEED CKPT ARMDIR: fine-tune and linear probe (CKPT "" = random init)
    local arm=$1 seed=$2 ckpt=$3 dir=$4 init=()
    [[ -n "$ckpt" ]] && init=(--finetune "$ckpt")
    local status=0
    run_stage "${arm}_seed$seed/finetune" "$dir/finetune" \
      $PY main_finetune.py --model vit_tiny_patch4 --input_size "$SIZE" "${init[@]}" --epochs "$FT_EPOCHS" \
        --warmup_epochs 1 --batch_size 64 --blr 5e-3 --layer_decay 0.75 --weight_decay 0.05 --drop_path 0 \
        --mixup 0 --cutmix 0 --reprob 0 --aa none --smoothing 0.1 --num_workers 0 --save_ckpt_freq 5 \
        --seed "$seed" --output_dir "$dir/finetune" --auto_resume || status=1
    run_stage "${arm}_seed$seed/linprobe" "$dir/linprobe" \
      $PY main_finetune.py --linprobe --model vit_tiny_patch4 --input_size "$SIZE" "${init[@]}" \
        --epochs "$LP_EPOCHS" --warmup_epochs 1 --batch_size 64 --blr 16 --num_workers 0 --save_ckpt_freq 5 \
        --seed "$seed" --output_dir "$dir/linprobe" --auto_resume || status=1
    return $status
  }

  run_arm() {  # run_arm ARM SEED
    local arm=$1 seed=$2 dir="$OUT/$1_seed$2"
    if [[ $arm == scratch ]]; then
      downstream "$arm" "$seed" "" "$dir"
    else
      pretrain "$arm" "$seed" "$dir/pretrain" || return 1
      downstream "$arm" "$seed" "$dir/pretrain/checkpoint-$((EPOCHS - 1)).pth" "$dir"
    fi
  }

  # Jobs in order; d3p before random of the same seed. Lanes take jobs round-robin; random waits for its D3P run.
  JOBS=()
  for seed in $SEEDS; do
    for arm in d3p $ARMS; do
      [[ $arm == d3p && " $ARMS " != *" d3p "* ]] && continue
      [[ " ${JOBS[*]:-} " == *" $arm:$seed "* ]] && continue
      JOBS+=("$arm:$seed")
    done
  done
  lane() {  # lane K: jobs K, K+LANES, ...
    local k=$1 i status=0
    for ((i = k; i < ${#JOBS[@]}; i += LANES)); do
      local arm=${JOBS[$i]%%:*} seed=${JOBS[$i]##*:}
      if [[ $arm == random ]]; then  # wait for the matched D3P pre-training (run by some lane)
        while [[ " $ARMS " == *" d3p "* && ! -f "$OUT/d3p_seed$seed/pretrain/summary.json" ]] \
              && ! grep -q "FAILED d3p_seed$seed/pretrain" "$TIMES" 2>/dev/null; do sleep 5; done
      fi
      run_arm "$arm" "$seed" || status=1
    done
    return $status
  }
  log "digits: arms [$ARMS], seeds [$SEEDS], $EPOCHS pre-train / $FT_EPOCHS FT / $LP_EPOCHS LP epochs, ${SIZE}px, $LANES lanes"
  T0=$SECONDS
  pids=()
  for ((k = 0; k < LANES; k++)); do lane "$k" & pids+=($!); done
  failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  log "all arms finished in $((SECONDS - T0)) s (failures: $failed)"
else
  # ---------------------------------------------------------------------------------------- the paper's recipe
  ARMS=${ARMS:-"none infobatch seta d3p random dynunc d2"}
  EPOCHS=${EPOCHS:-800}; LP_EPOCHS=${LP_EPOCHS:-90}
  NPROC=${NPROC:-8}; NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
  export EPOCHS NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT DATA_PATH
  GPUS=$((NPROC * NNODES))
  LP_ACCUM=$(( 16384 / (512 * GPUS) )); (( LP_ACCUM >= 1 )) || LP_ACCUM=1  # MAE's linear probe: batch 16384
  failed=0
  for seed in $SEEDS; do
    ordered=()
    [[ " $ARMS " == *" d3p "* ]] && ordered+=(d3p)
    for arm in $ARMS; do [[ $arm != d3p ]] && ordered+=("$arm"); done
    for arm in "${ordered[@]}"; do
      dir="$OUT/${arm}_seed$seed"
      if [[ $arm == scratch ]]; then log "skip scratch: only on the digits (DATA_PATH unset)"; continue; fi
      extra=""
      if [[ $arm == random ]]; then
        if [[ ! -f "$OUT/d3p_seed$seed/pretrain/summary.json" ]]; then
          log "skip random_seed$seed: the D3P run $OUT/d3p_seed$seed/pretrain has not finished"; failed=1; continue
        fi
        extra="--random_match $OUT/d3p_seed$seed/pretrain"
      fi
      if [[ -f "$dir/pretrain/summary.json" && -f "$dir/finetune/summary.json" ]]; then
        log "skip ${arm}_seed$seed pre-train + fine-tune: summaries exist"
      else
        # train_d3p.sh: pre-training (--auto_resume), then fine-tuning (--auto_resume); a finished pre-training
        # only reloads its last checkpoint and rewrites its summary
        t0=$SECONDS; log "start ${arm}_seed$seed (train_d3p.sh)"
        if METHOD=$arm SEED=$seed OUTPUT_DIR="$dir" PRETRAIN_ARGS="${PRETRAIN_ARGS:-} $extra" ./train_d3p.sh; then
          log "done ${arm}_seed$seed in $((SECONDS - t0)) s"
        else
          log "FAILED ${arm}_seed$seed after $((SECONDS - t0)) s"; failed=1; continue
        fi
      fi
      run_stage "${arm}_seed$seed/linprobe" "$dir/linprobe" \
        torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK" \
          --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="lp_${arm}_$seed" \
          main_finetune.py --linprobe --data_path "$DATA_PATH" --model vit_base_patch16 \
          --finetune "$dir/pretrain/checkpoint-$((EPOCHS - 1)).pth" --batch_size 512 --accum_iter "$LP_ACCUM" \
          --epochs "$LP_EPOCHS" --blr 0.1 --weight_decay 0.0 --dist_eval --seed "$seed" \
          --output_dir "$dir/linprobe" --auto_resume || failed=1
    done
  done
fi

# ----------------------------------------------------------------------------------------------------- the table
dirs=()
for seed in $SEEDS; do for arm in $ARMS; do [[ -d "$OUT/${arm}_seed$seed" ]] && dirs+=("$OUT/${arm}_seed$seed"); done; done
if (( ${#dirs[@]} )); then
  $PY tools/make_table.py "${dirs[@]}" | tee "$OUT/table1.md"
  $PY tools/make_table.py "${dirs[@]}" --json > "$OUT/table1.json"
fi
exit $failed
