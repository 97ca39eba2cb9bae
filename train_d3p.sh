#!/usr/bin/env bash
# MAE pre-training with D3P pruning, then fine-tuning.
#
#   DATA_PATH=/data/imagenet NPROC=8 NNODES=1 ./train_d3p.sh      published recipe (ViT-B, 800 + 100 epochs)
#   ./train_d3p.sh                                                CPU demo on the embedded digits (< 5 min)
#
# Cluster variables: NPROC (GPUs per node, 8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1 on one
# node; required with NNODES > 1), MASTER_PORT (29500), RDZV_ID (job id), MAX_RESTARTS (3: a killed worker
# restarts the job from its last checkpoint), SHUTDOWN_TIMEOUT (120: seconds torchrun lets the ranks save a
# mid-epoch checkpoint after a stop signal before SIGKILL; see docs/preemption.md). Batch: EFF_BATCH (4096) and FT_EFF_BATCH (1024) are kept for
# any GPU count; BATCH and FT_BATCH (128) are the most samples per GPU per step (gradient accumulation
# makes up the rest). Run variables: METHOD (d3p | none | infobatch | seta | random | dynunc | d2),
# OUTPUT_DIR, EPOCHS, FT_EPOCHS, SEED, PRETRAIN_ARGS and FINETUNE_ARGS (extra flags), SKIP_FINETUNE=1.
# DRY_RUN=1 prints the commands (and the batch arithmetic) instead of running them.
set -euo pipefail
cd "$(dirname "$0")"

METHOD=${METHOD:-d3p}
SEED=${SEED:-0}

run() {  # DRY_RUN=1: print the command, shell-quoted, instead of running it
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# split_batch NAME LABEL EFFECTIVE MAX_PER_GPU GPUS: sets NAME_BATCH (per GPU per step) and NAME_ACCUM so
# that NAME_BATCH x NAME_ACCUM x GPUS is EFFECTIVE (the nearest below it when GPUS does not divide EFFECTIVE)
split_batch() {
  local name=$1 label=$2 effective=$3 max_batch=$4 gpus=$5 per_gpu accum batch
  per_gpu=$(( effective / gpus ))
  if (( per_gpu < 1 )); then
    echo "error: $gpus GPUs exceed the effective batch $effective (fewer than one sample per GPU). Fix: use at most $effective GPUs" >&2
    exit 2
  fi
  accum=$(( (per_gpu + max_batch - 1) / max_batch ))
  batch=$(( per_gpu / accum ))
  printf -v "${name}_BATCH" %d "$batch"; printf -v "${name}_ACCUM" %d "$accum"
  local note=""
  (( batch < max_batch && accum == 1 )) && note+=" (per-GPU batch lowered from $max_batch to keep the effective batch)"
  (( batch * accum * gpus != effective )) && note+=" (nearest to $effective: $gpus GPUs do not divide it; the lr follows the effective batch)"
  echo "train_d3p.sh: $label: $batch per GPU x accum $accum x $gpus GPUs = effective batch $((batch * accum * gpus))$note"
}

if [[ -n "${DATA_PATH:-}" ]]; then
  NPROC=${NPROC:-8}; NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
  if (( NNODES > 1 )) && [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "error: NNODES=$NNODES needs MASTER_ADDR, the address of the node with NODE_RANK=0, the same on every" \
         "node (without it each node would wait at 127.0.0.1 for peers that never come, until the timeout)." \
         "Fix: MASTER_ADDR=<first node> ./train_d3p.sh on every node; under SLURM:" \
         'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' >&2
    exit 2
  fi
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
  RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-d3p}}; MAX_RESTARTS=${MAX_RESTARTS:-3}
  EPOCHS=${EPOCHS:-800}; FT_EPOCHS=${FT_EPOCHS:-100}
  OUTPUT_DIR=${OUTPUT_DIR:-./output/${METHOD}_seed${SEED}}
  GPUS=$((NPROC * NNODES))
  # MAE's recipes: pre-training at effective batch 4096 (the published run: 128 per GPU x accum 4 x 8 GPUs),
  # fine-tuning at 1024 (MAE: 32 x accum 4 x 8 GPUs); the same for any GPU count
  split_batch PRETRAIN pre-training "${EFF_BATCH:-4096}" "${BATCH:-128}" "$GPUS"
  split_batch FINETUNE fine-tuning "${FT_EFF_BATCH:-1024}" "${FT_BATCH:-128}" "$GPUS"
  LAUNCH=(torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK"
          --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID"
          --max_restarts="$MAX_RESTARTS" --shutdown_timeout="${SHUTDOWN_TIMEOUT:-120}"
          --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2)  # SLURM's --signal warning too
  run "${LAUNCH[@]}" main_pretrain_d3p.py \
    --data_path "$DATA_PATH" --model mae_vit_base_patch16 --norm_pix_loss --mask_ratio 0.75 \
    --batch_size "$PRETRAIN_BATCH" --accum_iter "$PRETRAIN_ACCUM" --epochs "$EPOCHS" --warmup_epochs 40 \
    --blr 1.5e-4 --weight_decay 0.05 --prune_method "$METHOD" --seed "$SEED" \
    --output_dir "$OUTPUT_DIR/pretrain" --auto_resume ${PRETRAIN_ARGS:-}
  [[ "${SKIP_FINETUNE:-0}" == 1 ]] && exit 0
  run "${LAUNCH[@]}" main_finetune.py \
    --data_path "$DATA_PATH" --model vit_base_patch16 --finetune "$OUTPUT_DIR/pretrain/checkpoint-$((EPOCHS - 1)).pth" \
    --batch_size "$FINETUNE_BATCH" --accum_iter "$FINETUNE_ACCUM" --epochs "$FT_EPOCHS" --blr 5e-4 --layer_decay 0.65 \
    --weight_decay 0.05 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval --seed "$SEED" \
    --output_dir "$OUTPUT_DIR/finetune" --auto_resume ${FINETUNE_ARGS:-}
else
  # CPU demo: tiny MAE on the embedded digits (8x8 scans, so 16 px inputs lose nothing and cost a
  # quarter of 32 px), D3P with a short schedule (decisions at epochs 3, 8, ..., 28), then fine-tuning;
  # prints the accuracy at the end.
  EPOCHS=${EPOCHS:-30}; FT_EPOCHS=${FT_EPOCHS:-10}
  OUTPUT_DIR=${OUTPUT_DIR:-./output_demo/${METHOD}}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  run python main_pretrain_d3p.py --input_size 16 --epochs "$EPOCHS" --warmup_epochs 2 --batch_size 64 --blr 1.5e-3 \
    --prune_method "$METHOD" --d3p_start 3 --d3p_period 5 --d3p_window 3 --d3p_bins 32 \
    --num_workers 0 --save_every 5 --seed "$SEED" --output_dir "$OUTPUT_DIR/pretrain" --auto_resume ${PRETRAIN_ARGS:-}
  [[ "${SKIP_FINETUNE:-0}" == 1 ]] && exit 0
  run python main_finetune.py --model vit_tiny_patch4 --input_size 16 \
    --finetune "$OUTPUT_DIR/pretrain/checkpoint-$((EPOCHS - 1)).pth" \
    --epochs "$FT_EPOCHS" --warmup_epochs 1 --batch_size 64 --blr 5e-3 \
    --aa none --mixup 0 --cutmix 0 --reprob 0 --drop_path 0 --num_workers 0 --seed "$SEED" \
    --output_dir "$OUTPUT_DIR/finetune" ${FINETUNE_ARGS:-}
fi
