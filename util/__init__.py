"""Utilities of the MAE fork. Importing this package first makes torchvision importable on CPU-only
torch (see `util/torchvision_compat.py`)."""
from util.torchvision_compat import register_missing_torchvision_ops

register_missing_torchvision_ops()
