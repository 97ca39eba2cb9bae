#!/usr/bin/env bash
# Reproduce Table 1 of the D3P paper and ask whether pruning pays: every arm pre-trains with the same seeds, then
# is evaluated by a k-NN probe (main_knn.py), a linear probe and fine-tuning; tools/make_table.py prints the table,
# the paired differences by seed (95% t-intervals) and OUT/figure.png. docs/does_pruning_pay.md explains the plans.
#
#   tools/reproduce_table1.sh [converged]        digits: the converged regime (80 epochs, 5 seeds): Whole, D3P,
#                                                Random matched, RS2 / InfoBatch / OrderDP at D3P's ratio, Train less
#   tools/reproduce_table1.sh sweep              digits: D3P (--d3p_target_ratio), OrderDP, random, RS2, InfoBatch,
#                                                Dyn-Unc, D2, random_static, Train less at 30/50/70% pruned (3 seeds,
#                                                80 epochs)
#   tools/reproduce_table1.sh table1             digits: the 20-epoch table of every method (under-trained regime)
#   DATA_PATH=/data/imagenet NPROC=8 tools/reproduce_table1.sh the paper's ImageNet-1K recipe (PLAN table1)
#   DATA_SET=cifar10 DATA_PATH=/data/cifar NPROC=1 tools/reproduce_table1.sh      the paper's CIFAR-10 block
#   DATA_SET=folder DATA_PATH=/data/mine MODEL=mae_vit_base_patch16 INPUT_SIZE=224 EPOCHS=100 tools/reproduce_table1.sh
#
# Variables: PLAN (or the first argument: converged | table1 | sweep; digits: converged, else table1), PLAN_ONLY=1
# (print the jobs and flags, run nothing), OUT (./output_table1), SEEDS (digits: converged "0 1 2 3 4", sweep and
# table1 "0 1 2"; else "0"), ARMS (table1: none infobatch seta d3p random dynunc d2, plus scratch on the digits;
# converged: none d3p random rs2 infobatch orderdp whole_eqc), RATIO (default | match | both; digits table1: both,
# converged and sweep: match, else default), SWEEP_RATIOS ("30 50 70", percent pruned), SWEEP_METHODS (d3p orderdp
# random rs2 infobatch dynunc d2 random_static whole_eqc), DATA_SET (digits without DATA_PATH, imagenet with it; cifar10; folder), EPOCHS,
# FT_EPOCHS, LP_EPOCHS, FT_SEEDS (seeds that are fine-tuned; digits table1 "0", converged/sweep none, else all),
# LP_SEEDS (seeds that get a linear probe; digits converged/sweep none, else all), FT_EQUAL (1: fine-tune the
# equal-ratio arms too; digits 0), LANES (digits: parallel single-thread lanes, 2 = the cores; else 1).
# Multi-GPU: NPROC (GPUs per node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, MAX_RESTARTS (3). Extra flags:
# PRETRAIN_ARGS, FINETUNE_ARGS, LINPROBE_ARGS, KNN_ARGS. Folder mode: MODEL (the MAE model; the fine-tuned ViT is
# its encoder: mae_vit_base_patch16 -> vit_base_patch16), INPUT_SIZE, BATCH (per GPU), EPOCHS; ACCUM (default:
# effective batch 4096), LP_BATCH, LP_ACCUM (default: effective 16384; both capped for a small folder, see
# fit_batches), NUM_WORKERS, STATIC_WARMUP (J).
# CIFAR-10: DATA_PATH holds cifar-10-batches-py/ (python version), CIFAR100_PATH (default DATA_PATH) holds
# cifar-100-python/ for the second fine-tuning; no download.
#
# Arms: none = Whole dataset, infobatch, seta, d3p, random = random dynamic matched epoch by epoch to the D3P run of
# the same seed, rs2 (RS2: random subsets without replacement), dynunc, d2, orderdp (OrderDP), random_static (a fixed
# random subset chosen at the static selectors' warm-up epoch: their control); scratch (digits) = linear probe /
# fine-tune of a randomly initialised ViT. Equal ratio (RATIO=match|both): infobatch_eq, seta_eq, rs2_eq, orderdp_eq,
# dynunc_eq, d2_eq run at the prune ratio the D3P arm of the same seed realised, with flags from tools/match_ratio.py
# (InfoBatch and SeTa are calibrated on their default-ratio arm: of the first seed, CALIBRATE=first, in converged and sweep;
# of the same seed, CALIBRATE=each, in table1);
# random is the matched arm. whole_eqc = Train less: the whole data for the epochs that cost what the D3P arm of
# the seed cost (warm-up and cosine compressed; tools/match_ratio.py whole_eqc). Sweep arms <method>_p<PCT> run at
# PCT% pruned (whole_eqc_p<PCT>: at that compute; d3p_p<PCT>: D3P with --d3p_target_ratio solved so that the run,
# full epochs before the first decision and its forward-only passes included, saves PCT% of the compute, the
# column's compute: it prunes more, 80% at 70); a ratio out of a method's reach is logged as SKIP. One folder
# per arm and seed: OUT/<arm>_seed<S>/{pretrain,knn,linprobe,finetune[,finetune_cifar100]}, ratio_match.json for
# matched arms. Resumable: a stage whose summary.json exists is skipped; an interrupted stage restarts with
# --auto_resume. The table (OUT/table1.md, OUT/table1.json, OUT/figure.png) is printed at the end from whatever
# has finished; stage wall times are in OUT/timings.txt.
#
# Digits sizing (this 2-core machine, one thread per process, 16x16 inputs, idle: ~4 s per whole-data epoch,
# k-NN ~8 s, linear probe 10 epochs ~30 s, fine-tuning 10 epochs ~80 s per arm, process start included).
# converged: 5 seeds x 7 pre-trainings (Whole, D3P, Random, RS2, Train less, InfoBatch at D3P's ratio and its
# calibration run) of 80 epochs, each pruned arm ~85-90% of Whole's samples: ~6 x 80 whole-data epochs per seed,
# ~9,600 s, + 35 k-NN (~280 s) + process starts (~180 s): ~10,000 single-core seconds, ~85 min with 2 lanes
# (LP_SEEDS="0 1 2 3 4" adds 35 linear probes, ~9 min). 80 epochs: the Whole arm's k-NN (seed 0, each length its
# own cosine run) is 76.1% at 20 epochs, 89.2% at 40, 97.6% at 80, 99.0% at 160 (docs/does_pruning_pay.md): the
# doubling to 80 gains 8.4 points, the doubling to 160 1.3, and 80 is the longest run 5 seeds of 7 arms fit in 90
# minutes. Measured 2026-12-06 on the idle machine, with OrderDP (8 pre-trainings per seed): 75 min for the 5 seeds
# with the Whole arms of seeds 0-2 and the calibration already run by the sweep, about 85 min from an empty folder.
# sweep: 3 seeds x (Whole + InfoBatch's calibration + 8 arms x 3 ratios; InfoBatch SKIPs 50 and 70 on the digits);
# measured 2026-12-06: a 70% column ~10-12 min per seed, a 50% column ~10.5 min per seed, so the whole sweep is
# about 2 h 10 min, more than one 90-minute slot: SWEEP_RATIOS picks columns, and a rerun resumes (docs/does_pruning_pay.md).
# table1: 3 seeds x (7 default + 4 equal-ratio pre-trainings) = 33 pre-trainings of 20 epochs (~2,100 s), 33 k-NN
# (~260 s), 36 linear probes (~1,050 s), fine-tuning only for the 8 default-ratio arms of seed 0 (FT_SEEDS,
# FT_EQUAL; ~640 s): ~4,050 single-core seconds, ~35 min with 2 lanes. Choices: D3P s=3, p=5, n=2 (decisions at
# epochs 3, 8, 13, ...; 32 bins for N=1,500), static warm-up J=5, r=0.5, delta=0.875, lr warm-up 3 epochs;
# fine-tune 10 epochs (blr 5e-3, no mixup/cutmix/RandAugment); linear probe 10 epochs, LARS, blr 16 (MAE's blr 0.1
# is tuned for batch 16384 and leaves a batch-64 probe at chance). With 297 validation images (1 image = 0.34
# points) the k-NN column (no training, no seed of its own) separates methods best.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./output_table1}
PY=${PYTHON:-python}
DATA_SET=${DATA_SET:-$([[ -n "${DATA_PATH:-}" ]] && echo imagenet || echo digits)}
NPROC=${NPROC:-1}; NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}; MAX_RESTARTS=${MAX_RESTARTS:-3}
GPUS=$((NPROC * NNODES))
PLAN=${PLAN:-${1:-$([[ $DATA_SET == digits ]] && echo converged || echo table1)}}
case $PLAN in table1|converged|sweep) ;; *) echo "error: PLAN=$PLAN: choose converged, table1 or sweep" >&2; exit 2;; esac
CONVERGED_EPOCHS=80  # digits: where the Whole arm's k-NN flattens (97.6% at 80, 99.0% at 160; docs/does_pruning_pay.md)
ARMS_GIVEN=${ARMS:-}; RATIO_GIVEN=${RATIO:-}
TIMES="$OUT/timings.txt"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$TIMES"; }
die() { echo "error: $*" >&2; exit 2; }
max() { (( $1 > $2 )) && echo "$1" || echo "$2"; }

# fit_batches N: a folder of N training images. MAE's effective batches (pre-training 4096, linear probe 16384)
# would leave a small folder one optimizer step per epoch (the partial accumulation group) with a learning rate
# scaled for the full batch. Each effective batch is capped at the largest power of two <= N / 32 (at least 32
# steps per epoch; ImageNet keeps MAE's), split into BATCH (x4 for the probe) per GPU and accumulation. The probe's
# LARS keeps MAE's absolute learning rate 0.1 x 16384 / 256 = 6.4 (blr 0.1 x 16384 / effective; the digits'
# batch-64 probe needed the same order, blr 16 = lr 4). Sets ACCUM, LP_BATCH, LP_ACCUM, LP_BLR unless given, and
# lowers the default BATCH (also the fine-tuning batch) when the pre-training batch needs it.
fit_batches() {
  local n=$1 pre=4096 lp=16384 per
  while (( pre > 1 && pre * 32 > n )); do pre=$((pre / 2)); done
  while (( lp > 1 && lp * 32 > n )); do lp=$((lp / 2)); done
  (( lp >= 8 * GPUS )) || die "DATA_PATH/train holds $n images: too few for a linear probe with batches of 8 per \
GPU and 32 steps per epoch ($((256 * GPUS)) images at least). Fix: use a larger folder, or set LP_BATCH and LP_ACCUM"
  if [[ -z ${ACCUM:-} ]]; then
    per=$(( pre / GPUS < BATCH ? pre / GPUS : BATCH ))
    (( per >= 1 )) || die "DATA_PATH/train holds $n images: too few for $GPUS GPUs. Fix: fewer GPUs (NPROC)"
    if (( per < BATCH )); then
      [[ -z ${BATCH_GIVEN:-} ]] || die "DATA_PATH/train holds $n images: an effective pre-training batch of $pre" \
        "(32 steps per epoch) leaves less than BATCH=$BATCH per GPU. Fix: BATCH=$per, or set ACCUM"
      BATCH=$per
    fi
    ACCUM=$(max $(( pre / (BATCH * GPUS) )) 1)
  fi
  if [[ -z ${LP_BATCH:-} && -z ${LP_ACCUM:-} ]]; then
    LP_BATCH=$(( BATCH * 4 < lp / GPUS ? BATCH * 4 : lp / GPUS ))
    LP_ACCUM=$(max $(( lp / (LP_BATCH * GPUS) )) 1)
    LP_BLR=$(awk -v e=$(( LP_BATCH * LP_ACCUM * GPUS )) 'BEGIN { printf "%.6g", 0.1 * 16384 / e }')
  fi
}

# ------------------------------------------------------------------------------------------------------ recipes
D3P_SCHEDULE=()  # D3P's --d3p_start/--d3p_period/--d3p_window when a recipe sets them (match_ratio.py reads them too)
# Each recipe sets: MODEL VIT SIZE EPOCHS FT_EPOCHS LP_EPOCHS J (static warm-up), PRE FT LP KNN (flag arrays),
# FT2 (second fine-tuning data set, or empty), LANES, SEEDS, RATIO, ARMS, FT_SEEDS.
case $DATA_SET in
  digits)
    [[ -z "${DATA_PATH:-}" ]] || die "DATA_SET=digits is embedded: unset DATA_PATH"
    MODEL=mae_vit_tiny_patch4; VIT=vit_tiny_patch4; SIZE=16
    if [[ $PLAN == table1 ]]; then  # the under-trained regime: 20 epochs, every method, 3 seeds
      EPOCHS=${EPOCHS:-20}; SEEDS=${SEEDS:-"0 1 2"}; RATIO=${RATIO:-both}; FT_SEEDS=${FT_SEEDS:-0}
      ARMS=${ARMS:-"none infobatch seta d3p random dynunc d2 scratch"}
    else  # converged: 5 seeds of the equal-compute table; sweep: 3 seeds; k-NN and linear probe, no fine-tuning
      EPOCHS=${EPOCHS:-$CONVERGED_EPOCHS}; FT_SEEDS=${FT_SEEDS:-none}; RATIO=${RATIO:-match}; ARMS=${ARMS:-}
      LP_SEEDS=${LP_SEEDS:-none}  # k-NN only: the linear probes (~30 s each) would take the table past 90 min
      [[ $PLAN == converged ]] && SEEDS=${SEEDS:-"0 1 2 3 4"} || SEEDS=${SEEDS:-"0 1 2"}
    fi
    FT_EPOCHS=${FT_EPOCHS:-10}; LP_EPOCHS=${LP_EPOCHS:-10}; J=${STATIC_WARMUP:-5}; FT_EQUAL=${FT_EQUAL:-0}
    LANES=${LANES:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
    DATA=()
    WARMUP=3
    D3P_SCHEDULE=(--d3p_start 3 --d3p_period 5 --d3p_window 2)
    PRE=(--model "$MODEL" --input_size "$SIZE" --warmup_epochs "$WARMUP" --batch_size 64 --blr 1.5e-3
         "${D3P_SCHEDULE[@]}" --d3p_bins 32 --num_workers 0 --save_every 10)
    FT=(--model "$VIT" --input_size "$SIZE" --warmup_epochs 1 --batch_size 64 --blr 5e-3 --layer_decay 0.75
        --weight_decay 0.05 --drop_path 0 --mixup 0 --cutmix 0 --reprob 0 --aa none --smoothing 0.1 --num_workers 0
        --save_ckpt_freq 5)
    LP=(--model "$VIT" --input_size "$SIZE" --warmup_epochs 1 --batch_size 64 --blr 16 --num_workers 0
        --save_ckpt_freq 5)
    KNN=(--num_workers 0 --batch_size 256)
    FT2="";;
  cifar10)
    # The CIFAR-10 block of Table 1 on one GPU or several. Model: mae_vit_tiny_patch4 at the native 32x32 (64
    # patches of 4x4, 5.5M encoder parameters): ViT-B/16 would see 2x2 patches of a 32x32 image, and upsampling
    # to 224 multiplies the cost 50x for a 50k-image set. Schedule: the paper's 800 pre-training epochs, 40
    # warm-up, effective batch 512 (blr 1.5e-4, 98 steps/epoch; the paper's 4096 would leave 12 steps per epoch),
    # D3P's paper schedule (s=3, p=10, n=3, 128 bins), static warm-up J=10; fine-tuning 100 epochs with MAE's
    # recipe (blr 5e-4 at batch 512, layer decay 0.65, drop path 0.1, mixup 0.8, cutmix 1.0, RandAugment, reprob
    # 0.25) on CIFAR-10 and on CIFAR-100; linear probe 90 epochs (LARS, batch 4096, blr 0.1); k-NN.
    [[ -n "${DATA_PATH:-}" ]] || die "DATA_SET=cifar10 needs DATA_PATH (the folder holding cifar-10-batches-py/)"
    MODEL=mae_vit_tiny_patch4; VIT=vit_tiny_patch4; SIZE=32
    EPOCHS=${EPOCHS:-800}; FT_EPOCHS=${FT_EPOCHS:-100}; LP_EPOCHS=${LP_EPOCHS:-90}; J=${STATIC_WARMUP:-10}
    SEEDS=${SEEDS:-0}; RATIO=${RATIO:-default}; FT_SEEDS=${FT_SEEDS:-$SEEDS}; FT_EQUAL=${FT_EQUAL:-1}; LANES=1
    ARMS=${ARMS:-"none infobatch seta d3p random dynunc d2"}
    BATCH=${BATCH:-$(max $((512 / GPUS)) 1)}
    NW=${NUM_WORKERS:-8}
    DATA=(--data_set cifar10 --data_path "$DATA_PATH")
    WARMUP=$(( EPOCHS < 40 ? 1 : 40 ))
    PRE=(--model "$MODEL" --input_size "$SIZE" --warmup_epochs "$WARMUP" --batch_size "$BATCH"
         --blr 1.5e-4 --weight_decay 0.05 --num_workers "$NW" --save_every 20 --keep_last 2)
    FT=(--model "$VIT" --input_size "$SIZE" --warmup_epochs "$(( FT_EPOCHS < 5 ? 0 : 5 ))" --batch_size "$BATCH"
        --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25
        --dist_eval --num_workers "$NW" --save_ckpt_freq 10)
    LP=(--model "$VIT" --input_size "$SIZE" --warmup_epochs "$(( LP_EPOCHS < 10 ? 0 : 10 ))"
        --batch_size "${LP_BATCH:-$(max $((4096 / GPUS)) 1)}" --blr 0.1 --weight_decay 0.0 --dist_eval --num_workers "$NW"
        --save_ckpt_freq 10)
    KNN=(--num_workers "$NW")
    FT2=cifar100; FT2_PATH=${CIFAR100_PATH:-$DATA_PATH};;
  folder|imagenet)
    # Any ImageFolder (DATA_PATH/train/<class>/*, DATA_PATH/val/<class>/*); imagenet = the paper's recipe:
    # ViT-B/16, 800 epochs, effective batch 4096, blr 1.5e-4, fine-tune 100 epochs, linear probe 90.
    [[ -n "${DATA_PATH:-}" ]] || die "DATA_SET=$DATA_SET needs DATA_PATH (with train/ and val/ class folders)"
    MODEL=${MODEL:-mae_vit_base_patch16}
    [[ $MODEL == mae_* ]] || die "MODEL must be an MAE model (mae_vit_tiny_patch4, mae_vit_base_patch16, ...)"
    VIT=${MODEL#mae_}; SIZE=${INPUT_SIZE:-224}
    if [[ $DATA_SET == imagenet ]]; then EPOCHS=${EPOCHS:-800}; else EPOCHS=${EPOCHS:?folder mode needs EPOCHS}; fi
    FT_EPOCHS=${FT_EPOCHS:-100}; LP_EPOCHS=${LP_EPOCHS:-90}
    J=${STATIC_WARMUP:-$(( EPOCHS / 3 < 2 ? 2 : (EPOCHS / 3 > 10 ? 10 : EPOCHS / 3) ))}
    SEEDS=${SEEDS:-0}; RATIO=${RATIO:-default}; FT_SEEDS=${FT_SEEDS:-$SEEDS}; FT_EQUAL=${FT_EQUAL:-1}; LANES=1
    ARMS=${ARMS:-"none infobatch seta d3p random dynunc d2"}
    BATCH_GIVEN=${BATCH:+1}; BATCH=${BATCH:-128}
    LP_BLR=0.1
    if [[ $DATA_SET == folder && ( -z ${ACCUM:-} || ( -z ${LP_BATCH:-} && -z ${LP_ACCUM:-} ) ) ]]; then
      NTRAIN=$(find -L "$DATA_PATH/train" -type f | wc -l)
      fit_batches "$NTRAIN"
    fi
    ACCUM=${ACCUM:-$(max $(( 4096 / (BATCH * GPUS) )) 1)}
    LP_BATCH=${LP_BATCH:-$(( BATCH * 4 ))}; LP_ACCUM=${LP_ACCUM:-$(max $(( 16384 / (LP_BATCH * GPUS) )) 1)}
    NW=${NUM_WORKERS:-10}
    DATA=(--data_set "$DATA_SET" --data_path "$DATA_PATH")
    WARMUP=$(( EPOCHS / 20 ))
    PRE=(--model "$MODEL" --input_size "$SIZE" --warmup_epochs "$WARMUP" --batch_size "$BATCH"
         --accum_iter "$ACCUM" --blr 1.5e-4 --weight_decay 0.05 --num_workers "$NW" --save_every 20 --keep_last 2)
    FT=(--model "$VIT" --input_size "$SIZE" --warmup_epochs "$(( FT_EPOCHS / 20 ))" --batch_size "$BATCH"
        --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25
        --dist_eval --num_workers "$NW" --save_ckpt_freq 10)
    LP=(--model "$VIT" --input_size "$SIZE" --warmup_epochs "$(( LP_EPOCHS / 9 ))" --batch_size "$LP_BATCH"
        --accum_iter "$LP_ACCUM" --blr "$LP_BLR" --weight_decay 0.0 --dist_eval --num_workers "$NW" --save_ckpt_freq 10)
    KNN=(--num_workers "$NW")
    FT2="";;
  *) die "unknown DATA_SET=$DATA_SET: choose digits, cifar10, folder or imagenet";;
esac
case $PLAN in
  converged) ARMS=${ARMS_GIVEN:-"none d3p random rs2 infobatch orderdp whole_eqc"}; RATIO=${RATIO_GIVEN:-match};;
  sweep) SWEEP_RATIOS=${SWEEP_RATIOS:-"30 50 70"}
         SWEEP_METHODS=${SWEEP_METHODS:-"d3p orderdp random rs2 infobatch dynunc d2 random_static whole_eqc"}
         for p in $SWEEP_RATIOS; do [[ $p =~ ^[0-9]+$ ]] && (( p >= 1 && p <= 99 )) \
           || die "SWEEP_RATIOS: $p is not a percentage in 1..99"; done
         SWEEPABLE=" d3p orderdp random rs2 infobatch seta dynunc d2 random_static whole_eqc "
         for m in $SWEEP_METHODS; do [[ $SWEEPABLE == *" $m "* ]] \
           || die "SWEEP_METHODS: $m is not one of$SWEEPABLE"; done;;
esac
case $RATIO in default|match|both) ;; *) die "RATIO=$RATIO: choose default, match or both";; esac
# The equal-ratio arms of InfoBatch and SeTa take their flags from a default-ratio run of the method (a
# calibration). converged and sweep calibrate once, on the first seed, for every seed (CALIBRATE=first): the
# calibration is a property of method, data and recipe (on the digits, seed 0's run predicts seed 1's InfoBatch flag
# within 0.5%), and the table's time goes to its arms. table1 (CALIBRATE=each): the default-ratio runs are rows
# of the table, so every seed runs them, and each seed calibrates on its own.
CALIBRATE=${CALIBRATE:-$([[ $PLAN == table1 ]] && echo each || echo first)}
case $CALIBRATE in first|each) ;; *) die "CALIBRATE=$CALIBRATE: choose first or each";; esac
FIRST_SEED=${SEEDS%% *}
# calibration_seed SEED: the seed whose default-ratio run calibrates the equal-ratio arms of SEED
calibration_seed() { [[ $CALIBRATE == each ]] && echo "$1" || echo "$FIRST_SEED"; }
LP_SEEDS=${LP_SEEDS:-$SEEDS}

# launch NAME SCRIPT ARGS...: one process, or torchrun over NPROC x NNODES (elastic restarts resume the stage)
launch() {
  local name=$1; shift
  if (( GPUS > 1 )); then
    torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK" --max_restarts="$MAX_RESTARTS" \
      --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${name//\//_}" "$@"
  else
    $PY "$@"
  fi
}

# run_stage NAME FOLDER SCRIPT ARGS...: skip when FOLDER/summary.json exists, else run and log the wall time
run_stage() {
  local name=$1 folder=$2; shift 2
  if [[ -f "$folder/summary.json" ]]; then
    log "skip $name: $folder/summary.json exists"
    return 0
  fi
  mkdir -p "$folder"
  local t0=$SECONDS
  log "start $name"
  if ! launch "$name" "$@" > "$folder/stdout.txt" 2>&1; then
    log "FAILED $name after $((SECONDS - t0)) s (see $folder/stdout.txt)"
    tail -n 20 "$folder/stdout.txt" >&2
    return 1
  fi
  log "done $name in $((SECONDS - t0)) s"
}

# wait_pretrain ARM SEED: block until OUT/ARM_seedSEED/pretrain finished (0) or failed / is not scheduled (1)
wait_pretrain() {
  local dep="$1_seed$2"
  while [[ ! -f "$OUT/$dep/pretrain/summary.json" ]]; do
    if [[ " ${JOBS[*]} " != *" $1:$2 "* ]] || grep -q "FAILED $dep/pretrain\|FAILED $dep " "$TIMES" 2>/dev/null; then
      return 1
    fi
    sleep 5
  done
}

# arm_method ARM: the --prune_method of an arm (whole_eqc* trains the whole data; X_eq and X_p<PCT> run method X)
arm_method() {
  case $1 in
    whole_eqc*) echo none;;
    *_eq) echo "${1%_eq}";;
    *_p[0-9]*) echo "${1%_p*}";;
    *) echo "$1";;
  esac
}

# pretrain_flags ARM SEED: ARM_FLAGS (the method's flags; equal-ratio, equal-compute and sweep arms: solved by
# tools/match_ratio.py) and ARM_EPOCHS. Returns 1 on failure, 3 when the arm's ratio is out of its method's reach.
pretrain_flags() {
  local arm=$1 seed=$2 method d3p="$OUT/d3p_seed$2/pretrain" target="" solver
  method=$(arm_method "$arm")
  ARM_FLAGS=(--prune_method "$method"); ARM_EPOCHS=$EPOCHS
  [[ $method == dynunc || $method == d2 || $method == random_static ]] && ARM_FLAGS+=(--static_warmup_epochs "$J")
  [[ $method == dynunc ]] && ARM_FLAGS+=(--dynunc_window "$(( J < 3 ? J : 3 ))")  # window in [2, J]
  case $arm in
    random) wait_pretrain d3p "$seed" || { log "FAILED ${arm}_seed$seed: no finished D3P run $d3p to match"; return 1; }
            ARM_FLAGS+=(--random_match "$d3p"); return 0;;
    *_eq|whole_eqc) target=$d3p;;
    *_p[0-9]*) target=$(awk -v p="${arm##*_p}" 'BEGIN { print p / 100 }');;
    *) return 0;;
  esac
  if [[ $target == "$d3p" ]]; then
    wait_pretrain d3p "$seed" || { log "FAILED ${arm}_seed$seed: no finished D3P run $d3p to match"; return 1; }
  fi
  local cal=()
  if [[ $method == infobatch || $method == seta ]]; then
    local cs; cs=$(calibration_seed "$seed")
    wait_pretrain "$method" "$cs" || { log "FAILED ${arm}_seed$seed: no finished calibration run ${method}_seed$cs"; return 1; }
    cal=(--calibration "$OUT/${method}_seed$cs/pretrain")
  fi
  solver=$method; [[ $arm == whole_eqc* ]] && solver=whole_eqc
  # D3P's recording epochs add forward-only passes: its sweep arm matches the column's compute, not its ratio
  [[ $method == d3p && $arm == *_p[0-9]* ]] && cal+=(--by_compute)
  local solved more err="$OUT/${arm}_seed$seed/ratio_match.err"
  mkdir -p "$OUT/${arm}_seed$seed"
  if ! solved=$($PY tools/match_ratio.py "$solver" --target "$target" "${cal[@]}" --epochs "$EPOCHS" \
                --static_warmup_epochs "$J" --warmup_epochs "$WARMUP" "${D3P_SCHEDULE[@]}" \
                --out "$OUT/${arm}_seed$seed/ratio_match.json" \
                2>"$err"); then
    cat "$err" >> "$TIMES"
    if grep -q "out of reach" "$err"; then log "SKIP ${arm}_seed$seed: $(cat "$err")"; return 3; fi
    log "FAILED ${arm}_seed$seed: tools/match_ratio.py found no flags (see above)"; return 1
  fi
  cat "$err" >> "$TIMES"
  local what
  if [[ $solver == whole_eqc ]]; then
    [[ $target == "$d3p" ]] && what="D3P's compute" || what="the compute of prune ratio $target"
  else
    [[ $target == "$d3p" ]] && what="D3P's ratio" || what="prune ratio $target"
  fi
  log "${arm}_seed$seed at $what: $solved"
  read -r -a more <<< "$solved"
  if [[ $solver == whole_eqc ]]; then  # --epochs E' --warmup_epochs W'
    ARM_EPOCHS=${more[1]}; ARM_FLAGS+=("${more[@]:2}")
  else
    ARM_FLAGS+=("${more[@]}")
  fi
}

# run_arm ARM SEED: pre-train, k-NN, linear probe, fine-tune (FT_SEEDS), second fine-tune (CIFAR-100)
run_arm() {
  local arm=$1 seed=$2 dir="$OUT/$1_seed$2" status=0 ckpt="" init=()
  if [[ $arm != scratch ]]; then
    pretrain_flags "$arm" "$seed" || return $?
    run_stage "${arm}_seed$seed/pretrain" "$dir/pretrain" main_pretrain_d3p.py "${DATA[@]}" "${PRE[@]}" \
      --epochs "$ARM_EPOCHS" "${ARM_FLAGS[@]}" --seed "$seed" --output_dir "$dir/pretrain" --auto_resume \
      ${PRETRAIN_ARGS:-} || return 1
    ckpt="$dir/pretrain/checkpoint-$((ARM_EPOCHS - 1)).pth"; init=(--finetune "$ckpt")
    run_stage "${arm}_seed$seed/knn" "$dir/knn" main_knn.py "${DATA[@]}" --checkpoint "$ckpt" "${KNN[@]}" \
      --output_dir "$dir/knn" ${KNN_ARGS:-} || status=1
  fi
  if [[ $arm == scratch || " $LP_SEEDS " == *" $seed "* ]]; then
    run_stage "${arm}_seed$seed/linprobe" "$dir/linprobe" main_finetune.py --linprobe "${DATA[@]}" "${LP[@]}" \
      "${init[@]}" --epochs "$LP_EPOCHS" --seed "$seed" --output_dir "$dir/linprobe" --auto_resume \
      ${LINPROBE_ARGS:-} || status=1
  fi
  if [[ " $FT_SEEDS " == *" $seed "* && ( $arm != *_eq || $FT_EQUAL == 1 ) ]]; then
    run_stage "${arm}_seed$seed/finetune" "$dir/finetune" main_finetune.py "${DATA[@]}" "${FT[@]}" "${init[@]}" \
      --epochs "$FT_EPOCHS" --seed "$seed" --output_dir "$dir/finetune" --auto_resume ${FINETUNE_ARGS:-} || status=1
    if [[ -n $FT2 ]]; then
      run_stage "${arm}_seed$seed/finetune_$FT2" "$dir/finetune_$FT2" main_finetune.py --data_set "$FT2" \
        --data_path "$FT2_PATH" "${FT[@]}" "${init[@]}" --epochs "$FT_EPOCHS" --seed "$seed" \
        --output_dir "$dir/finetune_$FT2" --auto_resume ${FINETUNE_ARGS:-} || status=1
    fi
  fi
  return $status
}

# ------------------------------------------------------------------------------------------------------- jobs
# Per seed: D3P first (random and the equal-ratio arms wait for it), the calibration arms next, equal-ratio last.
has() { [[ " $ARMS " == *" $1 "* ]]; }
# The sweep: Whole, the calibration runs of InfoBatch / SeTa, then each method at each ratio (X_p30, ...).
# whole_eqc (whole data, fewer epochs) follows the D3P arm of its seed; whole_eqc_p30 costs 70% of Whole.
JOBS=()
for seed in $SEEDS; do
  arms=()
  calibrates=$([[ $(calibration_seed "$seed") == "$seed" ]] && echo 1 || echo 0)  # this seed runs the calibrations
  if [[ $PLAN == sweep ]]; then
    for arm in infobatch seta; do [[ " $SWEEP_METHODS " == *" $arm "* && $calibrates == 1 ]] && arms+=("$arm"); done
    arms+=(none)
    for p in $SWEEP_RATIOS; do for m in $SWEEP_METHODS; do arms+=("${m}_p$p"); done; done
  else
    has d3p && arms+=(d3p)
    for arm in infobatch seta; do  # the default-ratio runs; with RATIO=match only the calibrations (CALIBRATE)
      has "$arm" && [[ $RATIO != match || $calibrates == 1 ]] && arms+=("$arm")
    done
    for arm in none dynunc d2 scratch random rs2 orderdp random_static; do
      has "$arm" || continue
      [[ $RATIO == match && ( $arm == dynunc || $arm == d2 || $arm == scratch || $arm == rs2 || $arm == orderdp \
                             || $arm == random_static ) ]] && continue
      arms+=("$arm")
    done
    if [[ $RATIO != default ]]; then
      for arm in infobatch seta rs2 orderdp dynunc d2 random_static; do has "$arm" && has d3p && arms+=("${arm}_eq"); done
    fi
    has whole_eqc && has d3p && arms+=(whole_eqc)
  fi
  for arm in "${arms[@]}"; do JOBS+=("$arm:$seed"); done
done
if [[ ${PLAN_ONLY:-0} == 1 ]]; then  # print the plan and the flags, run nothing
  echo "plan: $PLAN, $DATA_SET, $EPOCHS epochs (warm-up $WARMUP), seeds [$SEEDS], ratio $RATIO, $LANES lane(s)," \
       "linear probe seeds [$LP_SEEDS], fine-tune seeds [$FT_SEEDS]"
  echo "jobs: ${JOBS[*]}"
  echo "pretrain: ${PRE[*]}"
  echo "linprobe: ${LP[*]}"
  echo "finetune: ${FT[*]}"
  exit 0
fi
mkdir -p "$OUT"

# Lanes claim jobs in list order (mkdir is atomic); a job only waits for jobs earlier in the list: no deadlock.
CLAIMS="$OUT/.claims_node$NODE_RANK"  # every node walks the same list (its ranks join the same stages)
rm -rf "$CLAIMS"; mkdir -p "$CLAIMS"
lane() {
  local job status=0
  for job in "${JOBS[@]}"; do
    mkdir "$CLAIMS/${job/:/_}" 2>/dev/null || continue
    run_arm "${job%%:*}" "${job##*:}" || { (( $? == 3 )) || status=1; }  # 3: out of the method's reach
  done
  return $status
}
log "$DATA_SET ($PLAN): jobs [${JOBS[*]}], $EPOCHS pre-train / $LP_EPOCHS LP / $FT_EPOCHS FT epochs (FT seeds: $FT_SEEDS)," \
    "${SIZE}px, $MODEL, $LANES lane(s), $GPUS process(es) per stage"
T0=$SECONDS
pids=()
for ((k = 0; k < LANES; k++)); do lane & pids+=($!); done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
rm -rf "$CLAIMS"
log "all arms finished in $((SECONDS - T0)) s (failures: $failed)"

# ----------------------------------------------------------------------------------------------------- the table
dirs=()
for job in "${JOBS[@]}"; do
  d="$OUT/${job%%:*}_seed${job##*:}"
  [[ -d $d ]] && dirs+=("$d")
done
if (( ${#dirs[@]} )); then
  $PY tools/make_table.py "${dirs[@]}" --plot "$OUT/figure.png" | tee "$OUT/table1.md"
  $PY tools/make_table.py "${dirs[@]}" --json > "$OUT/table1.json"
fi
exit $failed
