"""Fixed 2-D sine-cosine position embeddings and their interpolation to a new grid size."""
from __future__ import annotations

import numpy as np
import torch


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """positions: any shape, M values -> [M, embed_dim] (first half sin, second half cos)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for sin-cos embeddings, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """-> [grid_size**2 (+1 if cls_token), embed_dim]; half the channels encode the row, half the column.

    Channel order matches MAE's published weights (width coordinate first), so fixed embeddings
    computed here equal the `pos_embed` buffers stored in those checkpoints.
    """
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # MAE stacks (w, h)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_w)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_h)
    emb = np.concatenate([emb_w, emb_h], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def interpolate_pos_embed(model: torch.nn.Module, checkpoint_model: dict) -> None:
    """Resize `checkpoint_model['pos_embed']` in place (bicubic) to the model's patch grid.

    Extra tokens (cls) are kept as they are; only the patch-position part is interpolated.
    """
    if "pos_embed" not in checkpoint_model:
        return
    pos_embed_checkpoint = checkpoint_model["pos_embed"]
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = model.patch_embed.num_patches
    num_extra_tokens = model.pos_embed.shape[-2] - num_patches
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches**0.5)
    if orig_size == new_size:
        return
    print(f"Position interpolate from {orig_size}x{orig_size} to {new_size}x{new_size}")
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = torch.nn.functional.interpolate(
        pos_tokens.float(), size=(new_size, new_size), mode="bicubic", align_corners=False
    )
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed_checkpoint.dtype)
    checkpoint_model["pos_embed"] = torch.cat((extra_tokens, pos_tokens), dim=1)
