"""D3P — Distribution-aware Dynamic Data Pruning — and its baselines, for any PyTorch training loop.

The public API (see docs/api.md and examples/train_classifier.py):

    DataPruner            the one object a loop uses: sampler, batch loss, recording, end-of-epoch decision,
                          cost ledger, state_dict / load_state_dict        (d3p/integration.py)
    add_pruning_args      the "pruning" flag group of an argparse parser   (d3p/options.py)
    validate_pruning_args messages for forbidden flag values / combinations
    per_sample_cross_entropy  cross-entropy per sample (label smoothing, soft Mixup/CutMix targets)
    D3PFitWarning         D3P's model of the losses fits poorly (docs/supervised.md); DataPruner(...,
                          loss_kind="classification", the default) turns its safety rails on
    register_method, Option   add a method of your own (d3p/registry.py; docs/methods_api.md), on the bases
    BaseStrategy, LossScoredStrategy, StaticSelector, implementing PruningStrategy with EpochPlan
    import_prune_plugins  import the --prune_plugin modules named in argv (before the parser is built)

Layout — shared machinery: stats.py (CLD, ideal density, decision), schedule.py, strategy.py (the
PruningStrategy protocol and EpochPlan), fit.py (the fit threshold and D3PFitWarning), registry.py (methods by name, their kinds and options), sampler.py, recorder.py, distributed.py (the per-epoch reduction and
the rank guard), ledger.py, options.py, integration.py (the API), losses.py, checkpoints.py; one module per
method in d3p/methods/; command-line tools: decide.py (d3p-decide), export.py (d3p-export), static.py
(d3p-static), plot.py. The package depends on numpy, scipy and torch only (matplotlib for figures, imported when drawn).

"spec §N" (or "spec section N") in this package's comments is section N of the method's specification, docs/spec.md
of the source repository.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "1.0.0"

_EXPORTS = {
    "DataPruner": "d3p.integration",
    "build_strategy": "d3p.integration",
    "weighted_batch_loss": "d3p.integration",
    "PRUNE_METHODS": "d3p.options",
    "Option": "d3p.registry",
    "MethodSpec": "d3p.registry",
    "register_method": "d3p.registry",
    "get_method": "d3p.registry",
    "method_names": "d3p.registry",
    "import_prune_plugins": "d3p.registry",
    "BaseStrategy": "d3p.methods.common",
    "LossScoredStrategy": "d3p.methods.common",
    "StaticSelector": "d3p.methods.static_base",
    "add_pruning_args": "d3p.options",
    "validate_pruning_args": "d3p.options",
    "per_sample_cross_entropy": "d3p.losses",
    "D3PFitWarning": "d3p.fit",
    "EpochPlan": "d3p.strategy",
    "EpochLosses": "d3p.strategy",
    "PruningStrategy": "d3p.strategy",
    "PrunedDistributedSampler": "d3p.sampler",
    "BalancedBatchSampler": "d3p.sampler",
    "balanced_batch_sizes": "d3p.sampler",
    "CostLedger": "d3p.ledger",
    "RankDivergenceError": "d3p.distributed",
    "IndexedDataset": "d3p.data",
    "pruned_loader": "d3p.data",
    "CollectiveTimeoutError": "d3p.collectives",
    "PruningCallback": "d3p.lightning",  # imports lightning when first used
    "PruningTrainer": "d3p.hf",  # imports transformers when first used
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # lazy: `python -m d3p.decide` and `import d3p` stay light (torch is imported on first use of the API)
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'd3p' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
