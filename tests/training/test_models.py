"""models_mae / models_vit: per-sample loss, RNG use, MAE-compatible names and shapes, timm interop, pos-embed."""
import math

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import models_mae
import models_vit
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed


@pytest.fixture(scope="module")
def tiny_mae():
    torch.manual_seed(0)
    return models_mae.mae_vit_tiny_patch4().eval()


def _patchify_reference(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Independent patchify: unfold gives [N, C*p*p, L] in (c, i, j) order; MAE's order is (i, j, c)."""
    n, c = imgs.shape[:2]
    cols = F.unfold(imgs, kernel_size=p, stride=p)  # [N, C*p*p, L]
    length = cols.shape[-1]
    return cols.reshape(n, c, p * p, length).permute(0, 3, 2, 1).reshape(n, length, p * p * c)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_per_sample_loss_matches_mae_scalar(tiny_mae, norm_pix):
    model = tiny_mae
    model.norm_pix_loss = norm_pix
    try:
        torch.manual_seed(1)
        imgs = torch.randn(5, 3, 32, 32)
        with torch.no_grad():
            loss, pred, mask = model(imgs, mask_ratio=0.75)
    finally:
        model.norm_pix_loss = False
    assert loss.shape == (5,)
    assert pred.shape == (5, 64, 4 * 4 * 3) and mask.shape == (5, 64)
    assert torch.equal(mask.sum(1), torch.full((5,), 48.0))  # int(64 * 0.25) = 16 kept per sample

    target = _patchify_reference(imgs, 4)
    assert torch.allclose(target, model.patchify(imgs))
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    mae_scalar = (per_patch * mask).sum() / mask.sum()  # MAE's forward_loss
    assert torch.allclose(loss.mean(), mae_scalar, rtol=1e-5, atol=1e-7)
    per_sample = (per_patch * mask).sum(1) / mask.sum(1)
    assert torch.allclose(loss, per_sample, rtol=1e-5, atol=1e-7)


def test_one_rand_draw_per_forward(tiny_mae):
    imgs = torch.randn(3, 3, 32, 32)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with torch.no_grad():
        _, _, mask = tiny_mae(imgs, mask_ratio=0.75)
    after = torch.get_rng_state()

    torch.set_rng_state(before)
    noise = torch.rand(3, 64)  # the single draw MAE makes
    assert torch.equal(torch.get_rng_state(), after), "forward must consume exactly one torch.rand(N, L)"
    # and that draw decides the mask: the 16 smallest noise values are kept (mask 0)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    assert torch.equal(mask, (ranks >= 16).float())


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_mae_vit_base_names_and_shapes():
    with torch.device("meta"):  # shapes and names only: no memory, no init cost
        model = models_mae.mae_vit_base_patch16()
    sd = model.state_dict()
    expected = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
        "blocks.0.norm1.weight": (768,),
        "blocks.0.attn.qkv.weight": (2304, 768),
        "blocks.0.attn.qkv.bias": (2304,),
        "blocks.0.attn.proj.weight": (768, 768),
        "blocks.0.mlp.fc1.weight": (3072, 768),
        "blocks.11.mlp.fc2.weight": (768, 3072),
        "norm.weight": (768,),
        "decoder_embed.weight": (512, 768),
        "decoder_embed.bias": (512,),
        "mask_token": (1, 1, 512),
        "decoder_pos_embed": (1, 197, 512),
        "decoder_blocks.7.attn.qkv.weight": (1536, 512),
        "decoder_norm.weight": (512,),
        "decoder_pred.weight": (768, 512),
        "decoder_pred.bias": (768,),
    }
    for k, shape in expected.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape))
    assert "blocks.12.norm1.weight" not in sd and "decoder_blocks.8.norm1.weight" not in sd
    assert abs(_count(model) / 1e6 - 111.9) < 0.05  # 111,907,840 incl. the two fixed pos-embeds
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_vit_base_names_shapes_and_timm_strict_load():
    with torch.device("meta"):
        model = models_vit.vit_base_patch16(num_classes=1000, global_pool="avg")
        ref = VisionTransformer(
            img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True,
            global_pool="avg", num_classes=1000,
        )
    sd = model.state_dict()
    assert tuple(sd["fc_norm.weight"].shape) == (768,)
    assert tuple(sd["head.weight"].shape) == (1000, 768)
    assert tuple(sd["blocks.0.attn.qkv.bias"].shape) == (2304,)
    assert "norm.weight" not in sd  # global pooling: fc_norm replaces the final norm (MAE's layout)
    assert abs(_count(model) / 1e6 - 86.6) < 0.05  # 86,567,656
    ref.load_state_dict(sd, strict=True)  # strict: same names, same shapes


def test_tiny_vit_matches_mae_encoder_and_timm():
    vit = models_vit.vit_tiny_patch4(num_classes=10, global_pool="token")
    mae_sd = models_mae.mae_vit_tiny_patch4().state_dict()
    encoder = {k: v for k, v in mae_sd.items() if not k.startswith("decoder") and k != "mask_token"}
    missing, unexpected = vit.load_state_dict(encoder, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    ref = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4,
                            qkv_bias=True, global_pool="avg", num_classes=10)
    ref.load_state_dict(models_vit.vit_tiny_patch4(num_classes=10).state_dict(), strict=True)


def test_sincos_pos_embed_formula():
    dim, grid = 16, 4
    emb = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert emb.shape == (1 + grid * grid, dim)
    assert np.all(emb[0] == 0)  # cls token
    quarter = dim // 4
    omega = [1.0 / 10000 ** (d / quarter) for d in range(quarter)]
    for h, w in [(0, 0), (1, 2), (3, 1)]:
        row = emb[1 + h * grid + w]
        for d in range(quarter):
            # first half encodes the column (w), second half the row (h): MAE's channel order
            assert math.isclose(row[d], math.sin(w * omega[d]), abs_tol=1e-6)
            assert math.isclose(row[quarter + d], math.cos(w * omega[d]), abs_tol=1e-6)
            assert math.isclose(row[2 * quarter + d], math.sin(h * omega[d]), abs_tol=1e-6)
            assert math.isclose(row[3 * quarter + d], math.cos(h * omega[d]), abs_tol=1e-6)


def test_interpolate_pos_embed_14_to_16():
    dim = 32

    class Target(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = torch.nn.Module()
            self.patch_embed.num_patches = 16 * 16
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + 16 * 16, dim))

    old = torch.from_numpy(get_2d_sincos_pos_embed(dim, 14, cls_token=True)).float().unsqueeze(0)
    old[:, 0] = torch.randn(dim)  # a distinctive cls token
    ckpt = {"pos_embed": old.clone()}
    interpolate_pos_embed(Target(), ckpt)
    new = ckpt["pos_embed"]
    assert new.shape == (1, 257, dim)
    assert torch.equal(new[:, 0], old[:, 0])  # cls token kept as is
    grid = old[:, 1:].reshape(1, 14, 14, dim).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, dim)
    assert torch.allclose(new[:, 1:], ref)
    # a constant field stays constant (row-major token order survives the round trip)
    const = {"pos_embed": torch.cat([torch.zeros(1, 1, dim), torch.full((1, 196, dim), 0.5)], dim=1)}
    interpolate_pos_embed(Target(), const)
    assert torch.allclose(const["pos_embed"][:, 1:], torch.tensor(0.5), atol=1e-5)


@pytest.mark.parametrize("factory", ["vit_tiny_patch4", "vit_base_patch16"])
def test_vit_factories_take_maes_bool_global_pool(factory):
    """MAE's main_finetune.py and notebooks call `vit_*(global_pool=True/False)` (issue 9, item 13)."""
    with torch.device("meta"):
        pooled = models_vit.MODELS[factory](num_classes=10, global_pool=True)
        token = models_vit.MODELS[factory](num_classes=10, global_pool=False)
        by_name = models_vit.MODELS[factory](num_classes=10, global_pool="avg")
    assert pooled.global_pool == "avg" and token.global_pool == "token" and by_name.global_pool == "avg"
    assert pooled.state_dict().keys() == by_name.state_dict().keys()
    assert "fc_norm.weight" in pooled.state_dict() and "norm.weight" not in pooled.state_dict()  # MAE's layout
    assert "norm.weight" in token.state_dict() and "fc_norm.weight" not in token.state_dict()
    with pytest.raises(TypeError, match="True/False"):
        models_vit.MODELS[factory](num_classes=10, global_pool=1.0)


def test_bool_global_pool_forward_is_maes_mean_of_patch_tokens_then_fc_norm():
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch4(num_classes=10, global_pool=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)  # [2, 1 + 64, 192]: cls token + patch tokens
        expected = model.head(model.fc_norm(tokens[:, 1:, :].mean(dim=1)))
        assert torch.allclose(model(x), expected, atol=1e-6)
