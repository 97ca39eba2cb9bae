"""An image classifier trained by the Hugging Face Trainer with dynamic data pruning: d3p.PruningTrainer.

    python examples/hf_trainer_classifier.py --prune_method d3p                  (embedded digits, CPU)
    torchrun --nproc_per_node 2 examples/hf_trainer_classifier.py               (2 processes)

A tiny ViT built from a config (no download) on the digits. Against a plain Trainer run, pruning changes two
lines (marked `# d3p` in examples/hf_run.py): the pruner, and PruningTrainer in place of Trainer. Rerun with
--resume to continue from the last checkpoint in OUTPUT_DIR (exact, also mid-epoch with --save_steps).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # this repository's shim for CPU-only torch, before timm/torchvision; drop it in your project

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

import d3p  # noqa: E402
from examples.digits import digit_images  # noqa: E402
from examples.hf_run import parser, train  # noqa: E402


class PixelsAndLabels(Dataset):
    """The Trainer's item format: {"pixel_values": float [3, S, S], "labels": int64}."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x, y = self.images[i]
        return {"pixel_values": x, "labels": y}


def main(argv=None, trainer_class=None) -> d3p.DataPruner:
    args = parser(__doc__.split("\n")[0], "./output_hf_classifier").parse_args(argv)
    torch.manual_seed(args.seed)
    train_images, _, classes = digit_images(8, args.subset)
    model = ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return train(args, model, PixelsAndLabels(train_images), d3p.per_sample_cross_entropy, trainer_class)


if __name__ == "__main__":
    main()
