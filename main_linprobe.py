"""MAE's linear probing: `python main_linprobe.py ARGS` is exactly `python main_finetune.py --linprobe ARGS`.

The recipe (frozen encoder, BatchNorm(affine=False) + linear head, LARS, blr 0.1, weight decay 0, 90 epochs,
10 warm-up epochs, cls token, RandomResizedCrop + flip) lives in main_finetune.py; this is only an entry point.
"""
from main_finetune import cli

if __name__ == "__main__":
    cli(linprobe=True)
