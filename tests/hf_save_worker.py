"""2 gloo ranks under torchrun (tests/library/test_hf.py): rank 0's checkpoint save fails (a full disk); every rank
must stop at that save with rank 0's error. `python tests/hf_save_worker.py OUT_DIR`."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before lightning/transformers

import transformers  # noqa: E402

from examples.hf_trainer_classifier import main  # noqa: E402

FLAGS = ["--subset", "64", "--batch_size", "16", "--prune_method", "d3p", "--d3p_start", "1", "--d3p_period", "1",
         "--d3p_window", "1", "--d3p_bins", "16"]


def disk_full(self, output_dir=None, _internal_call=False):
    raise OSError(28, "No space left on device")


if __name__ == "__main__":
    out, rank = sys.argv[1], os.environ["RANK"]
    if rank == "0":
        transformers.Trainer.save_model = disk_full  # the model's files, written by rank 0 only
    try:
        main([*FLAGS, "--epochs", "3", "--output_dir", os.path.join(out, "run")])
        error = ""
    except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
        error = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"save-rank{rank}.json"), "w") as f:
        json.dump(error, f)
    import torch.distributed as dist

    if dist.is_initialized():  # leave the group in order: a gloo group torn down at interpreter exit can abort
        dist.barrier()
        dist.destroy_process_group()
