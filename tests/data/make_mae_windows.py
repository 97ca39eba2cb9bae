"""Writes tests/data/mae_digits_windows.npz: the loss windows of every D3P decision of the MAE digits demo's
pre-training (train_d3p.sh without DATA_PATH: mae_vit_tiny_patch4, 16 px, 30 epochs, D3P s=3, p=5, n=3, 32 bins,
seed 0), for the fit diagnostic's test (tests/library/test_d3p_fit.py). About 5 minutes on one CPU core:

    OMP_NUM_THREADS=1 python tests/data/make_mae_windows.py [OUT_DIR]

The windows are read from the strategy just before each decision (the D3P class is wrapped in this script only).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import main_pretrain_d3p  # noqa: E402
from d3p.methods.d3p import D3P  # noqa: E402

out_dir = sys.argv[1] if len(sys.argv) > 1 else "./output_mae_windows"
windows, epochs = [], []
decide = D3P._decide


def recording_decide(self, epoch):
    windows.append(self.window.copy())
    epochs.append(epoch)
    return decide(self, epoch)


D3P._decide = recording_decide
main_pretrain_d3p.cli(["--input_size", "16", "--epochs", "30", "--warmup_epochs", "2", "--batch_size", "64",
                       "--blr", "1.5e-3", "--prune_method", "d3p", "--d3p_start", "3", "--d3p_period", "5",
                       "--d3p_window", "3", "--d3p_bins", "32", "--num_workers", "0", "--save_every", "30",
                       "--seed", "0", "--output_dir", out_dir])
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mae_digits_windows.npz")
np.savez_compressed(path, windows=np.stack(windows).astype(np.float32), epochs=np.array(epochs))
print(f"wrote {path}: {len(windows)} windows of shape {windows[0].shape}, decisions at 0-based epochs {epochs}")
