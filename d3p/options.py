"""The pruning options as flags, read from the method registry (`d3p.registry`): every registered method's options
become flags of the "pruning" group, validated by the same rules `DataPruner` applies.

    d3p.import_prune_plugins(argv)                                          # --prune_plugin modules, first
    parser = argparse.ArgumentParser(); d3p.add_pruning_args(parser)        # --prune_method, --d3p_start, ...
    args = parser.parse_args(argv); problems = d3p.validate_pruning_args(args)  # [] when valid
    pruner = d3p.DataPruner.from_args(args, num_samples)
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from d3p.registry import RegisteredNames, all_options, get_method, method_names

__all__ = ["PRUNE_METHODS", "add_pruning_args", "defaults", "options_of", "preset_options", "validate_options",
           "validate_pruning_args"]


def __getattr__(name: str) -> Any:
    # PRUNE_METHODS: the registered names at the time of asking (a method imported later is in the next answer)
    if name == "PRUNE_METHODS":
        return method_names()
    raise AttributeError(f"module 'd3p.options' has no attribute {name!r}")


def defaults(methods: Sequence[str] | None = None, loss_kind: str = "reconstruction") -> dict[str, Any]:
    """Option name -> default, for the options of `methods` (default: every registered method), when training
    with a loss of kind `loss_kind` (`d3p.registry.LOSS_KINDS`)."""
    return {name: option.default_for(loss_kind) for name, option in all_options(methods).items()}


def preset_options(loss_kind: str) -> dict[str, Any]:
    """The options whose default differs for `loss_kind` -> that default (e.g. D3P's rails for "classification")."""
    return {name: option.default_for(loss_kind) for name, option in all_options().items()
            if option.default_for(loss_kind) != option.default}


def add_pruning_args(
    parser: argparse.ArgumentParser, methods: Sequence[str] | None = None, default: str = "d3p",
    loss_kind: str = "classification",
) -> argparse._ArgumentGroup:
    """Add the "pruning" flag group: --prune_method, --prune_plugin and the options of the methods `methods`
    supports (default: every registered one). `validate_pruning_args(args, methods)` refuses the other methods
    with a message. Methods registered by a --prune_plugin are among them when `import_prune_plugins(argv)` ran
    before this call. loss_kind: the training loss's kind; the flags default to its presets ("classification", the
    default: D3P's safety rails on; "reconstruction": MAE's loss, the published method, as main_pretrain_d3p.py)."""
    names = None if methods is None else tuple(methods)
    shown = names if names is not None else method_names()
    g = parser.add_argument_group("pruning")
    g.add_argument("--prune_method", default=default, choices=RegisteredNames(),
                   help=f"one of {', '.join(shown)} (default: {default})")
    g.add_argument("--prune_plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="import a module (a .py file or a module name) that registers a method with "
                        "@d3p.register_method before the flags are read; repeatable")
    for option in all_options(names).values():
        kwargs: dict[str, Any] = {"dest": option.name, "default": option.default_for(loss_kind),
                                  "help": option.help or None}
        if option.type is not None:
            kwargs["type"] = option.type
        if option.choices is not None:
            kwargs["choices"] = list(option.choices)
        g.add_argument(f"--{option.name}", *option.aliases, **kwargs)
    return g


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The pruning options held by parsed flags (those this entry point defines)."""
    return {k: getattr(args, k) for k in all_options() if hasattr(args, k)}


def validate_options(method: str, epochs: int | None, options: dict[str, Any],
                     methods: Sequence[str] | None = None) -> list[str]:
    """Messages naming each forbidden value or combination and its fix; empty when valid.

    methods: the methods this entry point supports (default: every registered one)."""
    supported = method_names() if methods is None else tuple(methods)
    problems = []
    if method not in supported:
        why = ""
        if method in method_names("static"):
            why = (" (a static coreset selected during pre-training; to train on it, export it with "
                   "`d3p-export CHECKPOINT --out kept.npy` and train on that subset)")
        problems.append(f"--prune_method {method} is not supported here{why}. Fix: use one of {', '.join(supported)}")
    known = all_options()
    o = {**defaults(), **options}
    for name, option in known.items():
        problem = option.problem(o[name])
        if problem:
            problems.append(problem)
    spec = get_method(method) if method in method_names() else None
    for name, option in known.items():
        if option.only_for_owner and o[name] != option.default and (spec is None or name not in spec.option_names()):
            owners = [m for m in method_names() if name in get_method(m).option_names()]
            problems.append(f"--{name} needs --prune_method {' or '.join(owners)}")
    if spec is not None:
        if spec.check is not None:
            problems += spec.check(o, epochs)
        if spec.needs_epochs and epochs is None:
            problems.append(f"method {method} needs the number of epochs (its schedule). Fix: pass epochs=E")
    return problems


def validate_pruning_args(args: argparse.Namespace, methods: Sequence[str] | None = None) -> list[str]:
    """`validate_options` for parsed flags (`add_pruning_args`): the entry point reports the messages."""
    return validate_options(args.prune_method, getattr(args, "epochs", None), options_of(args), methods)
