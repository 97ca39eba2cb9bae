"""Runs main_pretrain_d3p.cli (or main_finetune.cli with FAULT_SCRIPT=finetune) with one injected fault, for
the reliability tests only.

    FAULT=kind:epoch:step[:rank] python tests/fault_runner.py [main_pretrain_d3p flags]

kind: sigterm (the process sends itself SIGTERM, as a scheduler would), sigterm_agent (under torchrun: SIGTERM
to the torchrun agent, which then signals every rank's whole process group, DataLoader workers included, as
SLURM and torchrun do; the rank then waits 2 s so that the signal arrives before its next step), sigkill (SIGKILL, only in
the first torchrun attempt: the elastic restart must then finish the run), nan (the batch's images
become NaN, so the loss does). The fault fires when `epoch` reaches batch `step` on rank `rank` (0).
sigterm_forward: SIGTERM at batch `step` of `epoch`'s forward-only pass instead of its training.
sigterm_embed: SIGTERM at batch `step` of `epoch`'s embedding pass (D2).
sigterm_eval (fine-tuning only): SIGTERM at batch `step` of the run's `epoch`-th evaluation (0-based).
sigterm_forward_agent, sigterm_embed_agent, sigterm_eval_agent: the same under torchrun, with the SIGTERM sent to
the agent, which signals every rank's process group (as sigterm_agent does in training).
disk_full: rank `rank` cannot write checkpoint-`epoch`.pth (OSError: no space left); `step` is unused.
stale_listing: rank `rank` sees no checkpoint of epoch >= `epoch` when it lists --output_dir (node-
local or lagging storage); `step` is unused.
"""
import os
import signal
import sys
import time

import torch

import main_pretrain_d3p
from util import checkpoint as ckpt_util
from util import engine


def _faulty_loader(loader, kind: str, at_step: int):
    for step, batch in enumerate(loader):
        images, *rest = batch
        if step == at_step:
            if kind == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif kind == "sigterm_agent":
                os.kill(os.getppid(), signal.SIGTERM)
                time.sleep(2.0)
            elif kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "nan":
                images = torch.full_like(images, float("nan"), dtype=torch.float32)  # uint8 cannot hold NaN
        yield (images, *rest)


class _Sized:
    def __init__(self, loader, kind, step):
        self.loader, self.kind, self.step = loader, kind, step

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return _faulty_loader(self.loader, self.kind, self.step)


def main() -> int:
    kind, epoch, step, *rank = os.environ["FAULT"].split(":")
    rank = int(rank[0]) if rank else 0
    me = int(os.environ.get("RANK", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    real_train, real_forward = engine.train_one_epoch, engine.forward_only_pass
    # a fault in a pass without gradient: the process signals itself, or with the suffix _agent torchrun's agent
    # signals every rank's process group
    pass_signal = "sigterm_agent" if kind.endswith("_agent") else "sigterm"
    kind = kind.removesuffix("_agent") if kind != "sigterm_agent" else kind

    def train_one_epoch(model, loader, optimizer, loss_scaler, ep, *args, **kwargs):  # the one training loop
        if ep == int(epoch) and me == rank and (kind != "sigkill" or first_attempt):
            loader = _Sized(loader, kind, int(step))
        return real_train(model, loader, optimizer, loss_scaler, ep, *args, **kwargs)

    def forward_only_pass(model, loader, batch_losses, pruner, ep, *args, **kwargs):  # the one forward-only pass
        if ep == int(epoch) and me == rank:
            loader = _Sized(loader, pass_signal, int(step))
        return real_forward(model, loader, batch_losses, pruner, ep, *args, **kwargs)

    if os.environ.get("FAULT_SCRIPT") == "finetune":
        import main_finetune

        real_evaluate, evaluations = main_finetune.evaluate, [0]

        def evaluate(loader, *args, **kwargs):  # `epoch` counts the run's evaluations (one per epoch)
            if evaluations[0] == int(epoch) and me == rank:
                loader = _Sized(loader, pass_signal, int(step))
            evaluations[0] += 1
            return real_evaluate(loader, *args, **kwargs)

        if kind == "sigterm_forward":
            engine.forward_only_pass = forward_only_pass
        elif kind == "sigterm_eval":
            main_finetune.evaluate = evaluate
        else:
            engine.train_one_epoch = train_one_epoch
        main_finetune.cli(sys.argv[1:])
        return 0

    real_embed = main_pretrain_d3p.compute_embeddings

    def compute_embeddings(model, loader, *args, **kwargs):
        if me == rank:
            loader = _Sized(loader, pass_signal, int(step))
        return real_embed(model, loader, *args, **kwargs)

    real_find = ckpt_util.find_latest_checkpoint

    def find_latest_checkpoint(output_dir):
        """This rank's view of the folder lags: checkpoints of `epoch` and later are not there yet."""
        hidden = os.path.join(output_dir, ".stale_view")
        os.makedirs(hidden, exist_ok=True)
        for name in os.listdir(output_dir):
            m = ckpt_util.CHECKPOINT_RE.search(name)
            if m and int(m.group(1)) < int(epoch) and not os.path.exists(os.path.join(hidden, name)):
                os.symlink(os.path.join(os.path.abspath(output_dir), name), os.path.join(hidden, name))
        return real_find(hidden)

    real_save = ckpt_util.atomic_torch_save

    def atomic_torch_save(obj, path):
        """Rank `rank`'s disk is full when it writes the checkpoint of `epoch`."""
        if os.path.basename(path) == f"checkpoint-{epoch}.pth":
            raise OSError(28, "No space left on device")
        return real_save(obj, path)

    if kind == "sigterm_forward":
        engine.forward_only_pass = forward_only_pass
    elif kind == "disk_full":
        if me == rank:
            ckpt_util.atomic_torch_save = atomic_torch_save
    elif kind == "sigterm_embed":
        main_pretrain_d3p.compute_embeddings = compute_embeddings
    elif kind == "stale_listing":
        if me == rank:
            ckpt_util.find_latest_checkpoint = find_latest_checkpoint
    else:
        engine.train_one_epoch = train_one_epoch
    return main_pretrain_d3p.cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
