"""Per-sample losses for supervised training (what `DataPruner.batch_loss` weighs and records)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each sample: logits [B, C], targets int64 [B] (class ids) or float [B, C] (soft
    targets, e.g. Mixup/CutMix's mixed one-hot rows) -> float32 [B].

    Hard targets with label smoothing eps: (1 - eps) * nll + eps * mean_c(-log p_c) (timm's
    LabelSmoothingCrossEntropy per sample); soft targets: sum_c(-t_c * log p_c) (timm's SoftTargetCrossEntropy
    per sample; smoothing is then already part of the targets). The mean over the batch equals those losses.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    if targets.dim() == logits.dim():
        return -(targets.float() * logp).sum(dim=-1)
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must be [B] class ids or [B, C] soft targets, got {tuple(targets.shape)} "
                         f"for logits {tuple(logits.shape)}")
    nll = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if smoothing == 0.0:
        return nll
    return (1.0 - smoothing) * nll - smoothing * logp.mean(dim=-1)
