"""Learning-rate schedule (warm-up + half-cycle cosine) and layer-wise lr decay."""
import argparse
import math

import pytest
import torch

import models_vit
from util.lr_decay import get_layer_id_for_vit, param_groups_lrd
from util.lr_sched import adjust_learning_rate, lr_at

LR, MIN_LR, WARMUP, EPOCHS = 1e-3, 1e-6, 5, 50


def test_warmup_is_linear():
    assert lr_at(0.0, LR, MIN_LR, WARMUP, EPOCHS) == 0.0
    for e in (0.5, 1.0, 2.5, 4.75):
        assert lr_at(e, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx(LR * e / WARMUP, rel=1e-12)
    assert lr_at(WARMUP, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx(LR)


def test_cosine_midpoint_and_end():
    mid = WARMUP + (EPOCHS - WARMUP) / 2
    assert lr_at(mid, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx(MIN_LR + (LR - MIN_LR) / 2, rel=1e-12)
    assert lr_at(EPOCHS, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx(MIN_LR, rel=1e-9)
    q = WARMUP + (EPOCHS - WARMUP) / 4
    assert lr_at(q, LR, MIN_LR, WARMUP, EPOCHS) == pytest.approx(
        MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12
    )
    vals = [lr_at(WARMUP + i * 0.5, LR, MIN_LR, WARMUP, EPOCHS) for i in range(2 * (EPOCHS - WARMUP) + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_no_warmup():
    assert lr_at(0.0, LR, MIN_LR, 0, EPOCHS) == pytest.approx(LR)


def test_layer_decay_scales_and_weight_decay():
    model = models_vit.vit_tiny_patch4(num_classes=10)  # 6 blocks -> num_layers = 7
    decay, wd = 0.75, 0.05
    groups = param_groups_lrd(model, wd, no_weight_decay_list=model.no_weight_decay(), layer_decay=decay)
    scale_of, wd_of = {}, {}
    for g in groups:
        for p in g["params"]:
            scale_of[id(p)], wd_of[id(p)] = g["lr_scale"], g["weight_decay"]
    named = dict(model.named_parameters())
    assert set(scale_of) == {id(p) for p in named.values()}  # every parameter in exactly one group
    expect = {
        "cls_token": decay**7, "pos_embed": decay**7, "patch_embed.proj.weight": decay**7,
        "blocks.0.attn.qkv.weight": decay**6, "blocks.3.mlp.fc1.weight": decay**3,
        "blocks.5.norm2.weight": decay**1, "fc_norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0,
    }
    for name, scale in expect.items():
        assert scale_of[id(named[name])] == pytest.approx(scale), name
    for name in ("cls_token", "pos_embed", "head.bias", "fc_norm.weight", "blocks.0.attn.qkv.bias"):
        assert wd_of[id(named[name])] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"):
        assert wd_of[id(named[name])] == wd, name
    assert get_layer_id_for_vit("blocks.10.attn.qkv.weight", 13) == 11


def test_adjust_learning_rate_applies_scales():
    model = models_vit.vit_tiny_patch4(num_classes=10)
    groups = param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.5)
    opt = torch.optim.AdamW(groups, lr=LR)
    args = argparse.Namespace(lr=LR, min_lr=MIN_LR, warmup_epochs=WARMUP, epochs=EPOCHS)
    lr = adjust_learning_rate(opt, 2.5, args)
    assert lr == pytest.approx(LR / 2)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"])
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(lr)
    assert min(g["lr"] for g in opt.param_groups) == pytest.approx(lr * 0.5**7)
