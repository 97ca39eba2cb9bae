"""Utilities of the MAE fork. Importing this package has no side effect: a module that imports torchvision or
timm calls `util.torchvision_compat.ensure_torchvision_importable()` first (see there)."""
