"""Make `import torchvision` (and so `import timm`) work with a CPU torch and a CUDA torchvision wheel.

Why: the registry's torchvision 0.28.0 wheel is built against CUDA. With the CPU build of
torch 2.13.0 its compiled extension `_C.so` cannot load, and torchvision's import then fails in
`_meta_registrations.py` with "operator torchvision::nms does not exist", because it registers
fake kernels for `nms`/`qnms` whose schemas only `_C.so` would have defined. We define those two
schemas ourselves (nothing else: no kernel, so calling nms still fails loudly) and only when the
extension really cannot load. On a CUDA machine the extension loads and this does nothing.

Every module that imports torchvision or timm (or a library that imports them: lightning, transformers) calls
`ensure_torchvision_importable()` itself, just before those imports:

    from util.torchvision_compat import ensure_torchvision_importable
    ensure_torchvision_importable()  # before timm/torchvision
    import timm

It is idempotent and cheap after the first call; importing `util` alone does not run it (and does not import
torchvision or timm). This is the project's only compatibility shim: keep it here.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

# Dropping a torch.library.Library object unregisters what it defined: keep it for the process.
_schema_library: torch.library.Library | None = None


def _extension_loads(package_dir: str) -> bool:
    candidates = glob.glob(os.path.join(package_dir, "_C.*so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
        return True
    except (OSError, RuntimeError):
        return False


def ensure_torchvision_importable() -> bool:
    """Make the next `import torchvision` succeed on CPU-only torch: define the `torchvision::nms`/`qnms`
    schemas when torchvision's C++ ops cannot load. Does nothing when the extension loads (CUDA torch), when
    torchvision is not installed, or when torchvision was already imported (by then it is too late, or done).

    Returns True when the schemas were registered by this call.
    """
    global _schema_library
    if _schema_library is not None or "torchvision" in sys.modules:
        return False  # already done, or too late to matter
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _extension_loads(os.path.dirname(spec.origin)):
        return False
    _schema_library = torch.library.Library("torchvision", "DEF")
    _schema_library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _schema_library.define(
        "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor"
    )
    return True
