"""2 gloo ranks under torchrun (tests/library/test_hf.py): a PruningTrainer whose loader went through accelerate's
prepare (re-split across ranks) is refused with the fix named; then the HF classifier example on 2 ranks.
`python tests/hf_worker.py OUT_DIR`."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d3p  # noqa: E402
from examples.hf_trainer_classifier import main  # noqa: E402

FLAGS = ["--subset", "128", "--batch_size", "16", "--prune_method", "d3p", "--d3p_start", "1", "--d3p_period", "1",
         "--d3p_window", "1", "--d3p_bins", "16"]


class PreparedLoader(d3p.PruningTrainer):
    """The mistake: the Trainer's usual accelerator.prepare on the training loader."""

    def get_train_dataloader(self):
        return self.accelerator.prepare(super().get_train_dataloader())


if __name__ == "__main__":
    out = sys.argv[1]
    try:
        main([*FLAGS, "--epochs", "1", "--output_dir", os.path.join(out, "replaced")], PreparedLoader)
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    main([*FLAGS, "--epochs", "3", "--output_dir", out])
    with open(os.path.join(out, f"refused-rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(refused, f)
