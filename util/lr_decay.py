"""Layer-wise learning-rate decay (ELECTRA/BEiT style) for fine-tuning ViTs."""
from __future__ import annotations

import torch


def get_layer_id_for_vit(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for `blocks.i`, num_layers for everything after the blocks."""
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(
    model: torch.nn.Module, weight_decay: float = 0.05, no_weight_decay_list=(), layer_decay: float = 0.75
) -> list[dict]:
    """Parameter groups with `lr_scale = layer_decay ** (num_layers - layer_id)`.

    Biases, norms (1-D parameters) and names in `no_weight_decay_list` get no weight decay.
    """
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in no_weight_decay_list
        layer_id = get_layer_id_for_vit(name, num_layers)
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "lr_scale": scales[layer_id],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "params": [],
            }
        groups[key]["params"].append(param)
    return list(groups.values())
