"""Submit MAE + D3P pre-training to SLURM through submitit, as MAE's submitit_pretrain.py (same flags).

    python submitit_pretrain.py --nodes 4 --ngpus 8 --partition PART --job_dir /shared/d3p/%j \
        --data_path /data/imagenet --batch_size 128 --accum_iter 1 --epochs 800 --warmup_epochs 40 \
        --blr 1.5e-4 --weight_decay 0.05 --norm_pix_loss --prune_method d3p

One task per GPU; every flag that is not a SLURM flag goes to main_pretrain_d3p.py. On preemption or timeout
the job is requeued with --auto_resume and continues from its newest checkpoint. Needs `pip install submitit`.
"""
import sys

import main_pretrain_d3p
from d3p.registry import import_prune_plugins
from util.submitit_job import submit


def main(argv: list[str] | None = None) -> int:
    import_prune_plugins(argv)  # a --prune_plugin's options must be flags of the parser built next
    return submit("main_pretrain_d3p", main_pretrain_d3p.get_args_parser(),
                  "Submitit for MAE + D3P pre-training", argv, job_name="mae_d3p_pretrain")


if __name__ == "__main__":
    sys.exit(main())
