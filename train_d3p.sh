#!/usr/bin/env bash
# MAE pre-training with D3P pruning, then fine-tuning.
#
#   DATA_PATH=/data/imagenet NPROC=8 NNODES=1 ./train_d3p.sh      published recipe (ViT-B, 800 + 100 epochs)
#   ./train_d3p.sh                                                CPU demo on the embedded digits (< 5 min)
#
# Cluster variables: NPROC (GPUs per node, 8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500), RDZV_ID (job id), MAX_RESTARTS (3: a killed worker restarts the job from
# its last checkpoint). Run variables: METHOD (d3p | none | infobatch | seta | random | dynunc | d2),
# OUTPUT_DIR, EPOCHS, FT_EPOCHS, SEED, PRETRAIN_ARGS and FINETUNE_ARGS (extra flags), SKIP_FINETUNE=1.
set -euo pipefail
cd "$(dirname "$0")"

METHOD=${METHOD:-d3p}
SEED=${SEED:-0}

if [[ -n "${DATA_PATH:-}" ]]; then
  NPROC=${NPROC:-8}; NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
  RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-d3p}}; MAX_RESTARTS=${MAX_RESTARTS:-3}
  EPOCHS=${EPOCHS:-800}; FT_EPOCHS=${FT_EPOCHS:-100}
  OUTPUT_DIR=${OUTPUT_DIR:-./output/${METHOD}_seed${SEED}}
  GPUS=$((NPROC * NNODES))
  # effective batch 4096 = 128 per GPU x GPUs x accum_iter (the published run: 8 GPUs x accum 4)
  ACCUM=$(( 4096 / (128 * GPUS) )); (( ACCUM >= 1 )) || ACCUM=1
  LAUNCH=(torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK"
          --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID"
          --max_restarts="$MAX_RESTARTS")
  "${LAUNCH[@]}" main_pretrain_d3p.py \
    --data_path "$DATA_PATH" --model mae_vit_base_patch16 --norm_pix_loss --mask_ratio 0.75 \
    --batch_size 128 --accum_iter "$ACCUM" --epochs "$EPOCHS" --warmup_epochs 40 \
    --blr 1.5e-4 --weight_decay 0.05 --prune_method "$METHOD" --seed "$SEED" \
    --output_dir "$OUTPUT_DIR/pretrain" --auto_resume ${PRETRAIN_ARGS:-}
  [[ "${SKIP_FINETUNE:-0}" == 1 ]] && exit 0
  "${LAUNCH[@]}" main_finetune.py \
    --data_path "$DATA_PATH" --model vit_base_patch16 --finetune "$OUTPUT_DIR/pretrain/checkpoint-$((EPOCHS - 1)).pth" \
    --batch_size 128 --epochs "$FT_EPOCHS" --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 \
    --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval --seed "$SEED" \
    --output_dir "$OUTPUT_DIR/finetune" --auto_resume ${FINETUNE_ARGS:-}
else
  # CPU demo: tiny MAE on the embedded digits (8x8 scans, so 16 px inputs lose nothing and cost a
  # quarter of 32 px), D3P with a short schedule (decisions at epochs 3, 8, ..., 28), then fine-tuning;
  # prints the accuracy at the end.
  EPOCHS=${EPOCHS:-30}; FT_EPOCHS=${FT_EPOCHS:-10}
  OUTPUT_DIR=${OUTPUT_DIR:-./output_demo/${METHOD}}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  python main_pretrain_d3p.py --input_size 16 --epochs "$EPOCHS" --warmup_epochs 2 --batch_size 64 --blr 1.5e-3 \
    --prune_method "$METHOD" --d3p_start 3 --d3p_period 5 --d3p_window 3 --d3p_bins 32 \
    --num_workers 0 --save_every 5 --seed "$SEED" --output_dir "$OUTPUT_DIR/pretrain" --auto_resume ${PRETRAIN_ARGS:-}
  [[ "${SKIP_FINETUNE:-0}" == 1 ]] && exit 0
  python main_finetune.py --model vit_tiny_patch4 --input_size 16 \
    --finetune "$OUTPUT_DIR/pretrain/checkpoint-$((EPOCHS - 1)).pth" \
    --epochs "$FT_EPOCHS" --warmup_epochs 1 --batch_size 64 --blr 5e-3 \
    --aa none --mixup 0 --cutmix 0 --reprob 0 --drop_path 0 --num_workers 0 --seed "$SEED" \
    --output_dir "$OUTPUT_DIR/finetune" ${FINETUNE_ARGS:-}
fi
