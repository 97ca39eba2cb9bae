"""Submit MAE fine-tuning (or --linprobe) to SLURM through submitit, as MAE's submitit_finetune.py (same flags).

    python submitit_finetune.py --nodes 1 --ngpus 8 --partition PART --job_dir /shared/ft/%j \
        --data_path /data/imagenet --finetune /shared/d3p/JOB/checkpoint-799.pth --model vit_base_patch16 \
        --batch_size 32 --accum_iter 4 --epochs 100 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 \
        --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval

One task per GPU; every flag that is not a SLURM flag goes to main_finetune.py. On preemption or timeout the
job is requeued with --auto_resume and continues from its newest checkpoint. Needs `pip install submitit`.
"""
import sys

import main_finetune
from d3p.registry import import_prune_plugins
from util.submitit_job import submit


def main(argv: list[str] | None = None) -> int:
    import_prune_plugins(argv)  # a --prune_plugin's options must be flags of the parser built next
    return submit("main_finetune", main_finetune.get_args_parser(),
                  "Submitit for MAE fine-tuning / linear probing", argv, job_name="mae_finetune")


if __name__ == "__main__":
    sys.exit(main())
