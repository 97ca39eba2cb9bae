"""A small causal language model trained by the Hugging Face Trainer with dynamic data pruning.

    python examples/hf_trainer_causal_lm.py --prune_method d3p                   (digit token corpus, CPU)
    torchrun --nproc_per_node 2 examples/hf_trainer_causal_lm.py

A 2-layer GPT-2 built from a config (no download) learns sequences made from the digits: BOS, a class token,
then the scan's 64 pixel intensities as tokens (examples/digits.py). A sample's loss is the mean next-token
loss of its sequence (d3p.hf.per_sequence_token_loss), in training and in the forward-only pass alike.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # this repository's shim for CPU-only torch, before timm/torchvision; drop it in your project

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import d3p  # noqa: E402
from d3p.hf import per_sequence_token_loss  # noqa: E402
from examples.digits import digit_sequences  # noqa: E402
from examples.hf_run import parser, train  # noqa: E402


class Sequences(Dataset):
    """{"input_ids": int64 [T], "labels": int64 [T]} (the model shifts nothing: the loss does)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main(argv=None) -> d3p.DataPruner:
    args = parser(__doc__.split("\n")[0], "./output_hf_causal_lm").parse_args(argv)
    torch.manual_seed(args.seed)
    tokens, vocab = digit_sequences(args.subset)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=tokens.shape[1], n_embd=32, n_layer=2,
                                       n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0))
    return train(args, model, Sequences(tokens), per_sequence_token_loss)


if __name__ == "__main__":
    main()
