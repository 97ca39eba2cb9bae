"""2 gloo ranks under torchrun (tests/library/test_lightning.py): Lightning's own sampler replacement is refused with the
fix named, then a DDP run with the pruner's sampler. `python tests/lightning_worker.py OUT_DIR`."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.lightning_classifier import main  # noqa: E402

FLAGS = ["--subset", "128", "--batch_size", "16", "--devices", "2", "--prune_method", "d3p", "--d3p_start", "1",
         "--d3p_period", "1", "--d3p_window", "1", "--d3p_bins", "16"]

if __name__ == "__main__":
    out = sys.argv[1]
    try:
        main([*FLAGS, "--epochs", "1", "--use_distributed_sampler", "--output_dir", os.path.join(out, "replaced")])
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    main([*FLAGS, "--epochs", "3", "--output_dir", out])
    with open(os.path.join(out, f"refused-rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(refused, f)
