"""Fine-tuning ViT: timm's VisionTransformer configured as MAE fine-tunes it.

Using timm's class directly (not a copy) means a fine-tuned checkpoint's `model` state_dict loads
into `timm.models.vision_transformer.VisionTransformer(global_pool='avg', ...)` with strict=True.
`global_pool='avg'` averages patch tokens and applies `fc_norm` (MAE's default); 'token' uses the
cls token after `norm`. MAE's own call, `global_pool=True/False`, means 'avg'/'token'.
"""
from __future__ import annotations

from functools import partial

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

_ln = partial(nn.LayerNorm, eps=1e-6)


def _pool_name(global_pool: str | bool) -> str:
    """MAE's scripts and notebooks pass `global_pool=True/False`; timm takes a name. True -> 'avg' (mean of the
    patch tokens, then fc_norm: MAE's global pooling), False -> 'token' (the cls token after norm)."""
    if isinstance(global_pool, bool):
        return "avg" if global_pool else "token"
    if isinstance(global_pool, str):
        return global_pool
    raise TypeError(f"global_pool={global_pool!r}: pass True/False (MAE's way) or one of timm's names ('avg', 'token')")


def _vit(global_pool: str | bool = "avg", **kwargs) -> VisionTransformer:
    kwargs.setdefault("qkv_bias", True)
    kwargs.setdefault("mlp_ratio", 4)
    return VisionTransformer(global_pool=_pool_name(global_pool), norm_layer=_ln, **kwargs)


def vit_tiny_patch4(**kwargs) -> VisionTransformer:
    """Matches `mae_vit_tiny_patch4`'s encoder: 32x32 inputs, 4x4 patches."""
    kwargs.setdefault("img_size", 32)
    return _vit(patch_size=4, embed_dim=192, depth=6, num_heads=3, **kwargs)


def vit_base_patch16(**kwargs) -> VisionTransformer:
    return _vit(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)


def vit_large_patch16(**kwargs) -> VisionTransformer:
    return _vit(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **kwargs)


def vit_huge_patch14(**kwargs) -> VisionTransformer:
    return _vit(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **kwargs)


MODELS = {
    "vit_tiny_patch4": vit_tiny_patch4,
    "vit_base_patch16": vit_base_patch16,
    "vit_large_patch16": vit_large_patch16,
    "vit_huge_patch14": vit_huge_patch14,
}
