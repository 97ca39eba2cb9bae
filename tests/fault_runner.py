"""Runs main_pretrain_d3p.cli with one injected fault, for the reliability tests only.

    FAULT=kind:epoch:step[:rank] python tests/fault_runner.py [main_pretrain_d3p flags]

kind: sigterm (the process sends itself SIGTERM, as a scheduler would), sigkill (SIGKILL, only in
the first torchrun attempt: the elastic restart must then finish the run), nan (the batch's images
become NaN, so the loss does). The fault fires when `epoch` reaches batch `step` on rank `rank` (0).
"""
import os
import signal
import sys

import torch

import main_pretrain_d3p


def _faulty_loader(loader, kind: str, at_step: int):
    for step, (images, targets, index) in enumerate(loader):
        if step == at_step:
            if kind == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "nan":
                images = torch.full_like(images, float("nan"), dtype=torch.float32)  # uint8 cannot hold NaN
        yield images, targets, index


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
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    real = main_pretrain_d3p.train_one_epoch

    def train_one_epoch(model, loader, optimizer, device, ep, *args, **kwargs):
        me = int(os.environ.get("RANK", "0"))
        if ep == int(epoch) and me == rank and (kind != "sigkill" or first_attempt):
            loader = _Sized(loader, kind, int(step))
        return real(model, loader, optimizer, device, ep, *args, **kwargs)

    main_pretrain_d3p.train_one_epoch = train_one_epoch
    return main_pretrain_d3p.cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
