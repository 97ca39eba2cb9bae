"""Masked Autoencoder with a ViT backbone (He et al., 2021), returning a per-sample loss.

Parameter names and shapes equal MAE's published checkpoints, so they load with strict=True.
"""
from __future__ import annotations

from functools import partial

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from util.pos_embed import get_2d_sincos_pos_embed


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder over the visible patches, light ViT decoder that predicts the masked pixels."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer=nn.LayerNorm,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos embedding: a parameter (as in MAE's checkpoints) that is never trained
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        grid = int(self.patch_embed.num_patches**0.5)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        dec_pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec_pos).float().unsqueeze(0))

        # the patch projection is a linear layer in disguise: init it as one (xavier on [D, C*p*p])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------ patches
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> patches [N, L, p*p*C] (pixel order p, q, c as in MAE)."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        assert h == w and h % p == 0, f"image {h}x{w} is not a square multiple of patch {p}"
        g = h // p
        x = imgs.reshape(n, c, g, p, g, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """patches [N, L, p*p*C] -> imgs [N, C, H, W]."""
        p = self.patch_size
        g = int(x.shape[1] ** 0.5)
        assert g * g == x.shape[1]
        x = x.reshape(x.shape[0], g, g, p, p, self.in_chans)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], self.in_chans, g * p, g * p)

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        """Keep a random subset of patches per sample by sorting one uniform noise draw.

        x [N, L, D] -> (x_visible [N, L_keep, D], mask [N, L] with 1 = masked, ids_restore [N, L]).
        Exactly one torch.rand(N, L) per call, as MAE does, so seeded runs match it.
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_visible, mask, ids_restore

    # ------------------------------------------------------------ forward
    def _with_cls(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L', D] patch tokens -> [N, 1+L', D] with the cls token (and its position) in front."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
        """imgs [N, C, H, W] -> (latent [N, 1+L_keep, D], mask [N, L], ids_restore [N, L])."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        return self._encode(self._with_cls(x)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+L_keep, D] -> predicted patches [N, L, p*p*C]."""
        x = self.decoder_embed(latent)
        n_mask = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], n_mask, -1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [N]: mean over each sample's masked patches of the per-patch MSE.

        Every sample masks the same number of patches, so the mean of this vector is MAE's scalar loss.
        """
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum(dim=1) / mask.sum(dim=1)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75):
        """imgs [N, C, H, W] -> (loss [N], pred [N, L, p*p*C], mask [N, L])."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    @torch.no_grad()
    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder features, mean-pooled over patch tokens: imgs [N, C, H, W] -> [N, D]."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        return self._encode(self._with_cls(x))[:, 1:, :].mean(dim=1)


_ln = partial(nn.LayerNorm, eps=1e-6)


def mae_vit_tiny_patch4(**kwargs) -> MaskedAutoencoderViT:
    """CPU-sized model for 32x32 inputs (CIFAR, the embedded digits): 64 patches of 4x4."""
    kwargs.setdefault("img_size", 32)
    return MaskedAutoencoderViT(
        patch_size=4, embed_dim=192, depth=6, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
        mlp_ratio=4, norm_layer=_ln, **kwargs,
    )


def mae_vit_base_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=_ln, **kwargs,
    )


def mae_vit_large_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=_ln, **kwargs,
    )


def mae_vit_huge_patch14_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=_ln, **kwargs,
    )


# the names MAE's scripts use (decoder: 512-d, 8 blocks)
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b

MODELS = {
    "mae_vit_tiny_patch4": mae_vit_tiny_patch4,
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
}


def patch_size_of(name: str) -> int:
    """The patch size of a model in MODELS, from MAE's naming: mae_vit_base_patch16 -> 16."""
    return int(name.rsplit("_patch", 1)[1])
