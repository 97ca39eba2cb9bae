"""The method registry: each pruning method registers itself, by name, with its kind, its options and its factory.

    @d3p.register_method("topk", kind="dynamic", options=[Option("topk_ratio", 0.3, float, "share pruned")])
    class TopK(d3p.BaseStrategy):
        def __init__(self, num_samples: int, topk_ratio: float = 0.3, seed: int = 0): ...

After its module is imported, the method is everywhere a name is accepted: `DataPruner(n, method="topk",
topk_ratio=0.2)`, `--prune_method topk --topk_ratio 0.2` (its options become flags of `d3p.add_pruning_args`), the
option validation, and the tools that ask a method's kind. A method outside this package is imported with
`--prune_plugin FILE_OR_MODULE` (`import_prune_plugins`) or a plain `import`.

This module holds the records and the lookups only; it imports no method. The built-in methods (d3p/methods/)
register themselves when `d3p.methods` is imported, which `methods()` / `get_method()` do first.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = ["CONTEXT", "KINDS", "LOSS_KINDS", "MethodSpec", "Option", "all_options", "build", "get_method", "import_prune_plugin",
           "import_prune_plugins", "method_names", "methods", "register_method"]

KINDS = ("dynamic", "static")
# the kinds of loss a method's defaults may depend on: MAE's reconstruction loss (the published setting), or a
# classifier's cross-entropy (D3P's model of the losses does not hold there: its safety rails are on)
LOSS_KINDS = ("reconstruction", "classification")


def check_loss_kind(loss_kind: str) -> None:
    if loss_kind not in LOSS_KINDS:
        raise ValueError(f"loss_kind must be one of {', '.join(LOSS_KINDS)}, got {loss_kind!r}. Fix: "
                         "loss_kind='classification' for a cross-entropy, 'reconstruction' for MAE's loss")
# what DataPruner knows besides the method's options; a factory receives those its signature names
CONTEXT = ("epochs", "seed", "min_kept", "knn_device")


@dataclass(frozen=True)
class Option:
    """One option of a method: a keyword of `DataPruner(...)` and, as `--<name>`, a command-line flag.

    name:    the keyword and the flag's dest (`--name`); must not clash with another method's option of the same
             name unless it is the same Option object (shared options such as prune_ratio are one object).
    default: the value when not given.
    type:    how the flag's text becomes the value (argparse `type`; None: the text itself).
    help:    the flag's help line.
    aliases: further flag spellings (e.g. "--s" for --d3p_start).
    choices: the allowed values, or None.
    valid:   value -> bool; a False value is refused with "--name <rule>, got <value>".
    rule:    the words of that refusal, e.g. "must be >= 2".
    only_for_owner: giving a value other than the default with another --prune_method is an error.
    presets: (loss kind, default) pairs: the default for training with that kind of loss (`LOSS_KINDS`), e.g.
             (("classification", 4.0),); `default` holds for the others ("reconstruction": MAE's loss).
    """

    name: str
    default: Any
    type: Callable[[str], Any] | None = None
    help: str = ""
    aliases: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    valid: Callable[[Any], bool] | None = None
    rule: str = ""
    only_for_owner: bool = False
    presets: tuple[tuple[str, Any], ...] = ()

    def default_for(self, loss_kind: str = "reconstruction") -> Any:
        """The default for training with a loss of kind `loss_kind` (`LOSS_KINDS`)."""
        check_loss_kind(loss_kind)
        return dict(self.presets).get(loss_kind, self.default)

    def problem(self, value: Any) -> str | None:
        """The message naming a forbidden value, or None."""
        if self.valid is not None and value is not None and not self.valid(value):
            return f"--{self.name} {self.rule}, got {value}"
        return None


Factory = Callable[..., Any]  # (num_samples, **context it names, **options) -> a d3p.PruningStrategy


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    name:    the --prune_method / DataPruner(method=...) name; the strategy's `name` must equal it.
    kind:    "dynamic" (a plan per epoch) or "static" (one subset selected after warm-up; `d3p-export` reads it from
             the strategy's state "subset", the fine-tuning scripts refuse it).
    factory: builds the strategy: factory(num_samples, **context, **options). Context (`CONTEXT`: epochs, seed,
             min_kept, knn_device) is passed only where its signature names it (or takes **kwargs).
    options: the method's options, in flag order.
    needs_epochs: DataPruner refuses epochs=None (the method's schedule depends on the run's length).
    check:   (options with defaults filled in, epochs) -> messages for forbidden combinations; [] when valid.
    kept_set: (strategy state_dict) -> int64 sorted kept indices of its last decision, or None when the method
             keeps no persistent set (`d3p-export`). Static methods default to the state's "subset".
    help:    one line for the method's listing.
    """

    name: str
    kind: str
    factory: Factory
    options: tuple[Option, ...] = ()
    needs_epochs: bool = False
    check: Callable[[dict[str, Any], int | None], list[str]] | None = None
    kept_set: Callable[[dict[str, Any]], Any] | None = None
    help: str = ""

    def option_names(self) -> list[str]:
        return [o.name for o in self.options]


_METHODS: dict[str, MethodSpec] = {}
_OPTIONS: dict[str, Option] = {}


def register_method(
    name: str,
    kind: str = "dynamic",
    options: Iterable[Option] = (),
    *,
    needs_epochs: bool = False,
    check: Callable[[dict[str, Any], int | None], list[str]] | None = None,
    kept_set: Callable[[dict[str, Any]], Any] | None = None,
    help: str = "",
) -> Callable[[Factory], Factory]:
    """Decorator: register the decorated class (or factory function) as method `name`; returns it unchanged.

    The class implements `d3p.PruningStrategy` (`name` = the registered name); its constructor takes num_samples
    plus the options as keywords, and any of epochs, seed, min_kept, knn_device it wants. Registering a name twice
    is an error, unless it is the same definition imported again (same module file and qualified name).
    """
    if kind not in KINDS:
        raise ValueError(f"register_method({name!r}): kind must be one of {KINDS}, got {kind!r}")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"register_method: {name!r} is not a method name (letters, digits, '_' or '-')")
    options = tuple(options)

    def register(factory: Factory) -> Factory:
        _load_builtins()  # the built-ins first: they own the shared option names, and list first
        _check_new(name, factory, options)
        for option in options:
            _OPTIONS.setdefault(option.name, option)
        _METHODS[name] = MethodSpec(name, kind, factory, options, needs_epochs, check, kept_set, help)
        return factory

    return register


def _origin(factory: Factory) -> tuple[str, str]:
    try:
        path = os.path.realpath(inspect.getfile(factory))
    except TypeError:  # built in / defined interactively
        path = ""
    return path, getattr(factory, "__qualname__", repr(factory))


def _check_new(name: str, factory: Factory, options: tuple[Option, ...]) -> None:
    old = _METHODS.get(name)
    if old is not None and _origin(old.factory) != _origin(factory):
        raise ValueError(f"prune method {name!r} is already registered by {_origin(old.factory)[1]} "
                         f"({_origin(old.factory)[0] or 'unknown file'}). Fix: register yours under another name")
    owners = {o.name: m.name for m in _METHODS.values() if m.name != name for o in m.options}
    for option in options:
        known = _OPTIONS.get(option.name)
        if option.name in CONTEXT or option.name in ("num_samples", "method", "prune_method", "prune_plugin"):
            raise ValueError(f"prune method {name!r}: option name {option.name!r} is reserved. Fix: rename it")
        if known is not None and known != option and option.name in owners:
            raise ValueError(f"prune method {name!r}: option {option.name!r} is already defined differently by "
                             f"method {owners[option.name]!r}. Fix: reuse that Option object, or rename yours")


# ------------------------------------------------------------------------------------------------ lookups
def _load_builtins() -> None:
    """Import the package of built-in methods (each registers itself on import)."""
    if "d3p.methods" not in sys.modules:
        importlib.import_module("d3p.methods")


def methods(kind: str | None = None) -> list[MethodSpec]:
    """The registered methods in registration order (built-ins first), optionally of one kind."""
    _load_builtins()
    return [m for m in _METHODS.values() if kind is None or m.kind == kind]


def method_names(kind: str | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in methods(kind))


def get_method(name: str) -> MethodSpec:
    """The spec of `name`; ValueError naming the registered ones (and how to add one) otherwise."""
    _load_builtins()
    if name not in _METHODS:
        raise ValueError(f"unknown prune method {name!r}; choose one of {', '.join(_METHODS)} (a method of your "
                         "own: import its module first, or pass --prune_plugin FILE_OR_MODULE)")
    return _METHODS[name]


def all_options(names: Sequence[str] | None = None) -> dict[str, Option]:
    """Option name -> Option for the methods `names` (default: all), each once, in registration order."""
    out: dict[str, Option] = {}
    for m in methods():
        if names is None or m.name in names:
            for option in m.options:
                out.setdefault(option.name, option)
    return out


class RegisteredNames:
    """A live view of the registered method names (argparse `choices` that include methods imported later)."""

    def __init__(self, kind: str | None = None) -> None:
        self.kind = kind

    def __contains__(self, name: object) -> bool:
        return name in method_names(self.kind)

    def __iter__(self) -> Iterator[str]:
        return iter(method_names(self.kind))

    def __len__(self) -> int:
        return len(method_names(self.kind))


def build(name: str, num_samples: int, context: dict[str, Any], options: dict[str, Any]) -> Any:
    """The strategy of method `name`: its factory called with num_samples, the context entries its signature
    names, and the method's own options (defaults filled in; options of other methods are left out)."""
    spec = get_method(name)
    own = {o.name: options.get(o.name, o.default) for o in spec.options}
    strategy = spec.factory(int(num_samples), **_accepted(spec.factory, context), **own)
    if getattr(strategy, "name", None) != name:
        raise TypeError(f"prune method {name!r} built a strategy named {getattr(strategy, 'name', None)!r}. Fix: "
                        f"set the class attribute name = {name!r}")
    return strategy


def _accepted(factory: Factory, context: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(context)
    return {k: v for k, v in context.items() if k in params}


# ------------------------------------------------------------------------------------------------ plugins
def import_prune_plugin(source: str) -> str:
    """Import a module that registers methods: a .py file path or an importable module name. Returns the module's
    name. Importing the same file again does nothing (it stays registered once)."""
    if source.endswith(".py") or os.sep in source or (os.altsep and os.altsep in source):
        path = os.path.realpath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--prune_plugin {source}: no such file. Fix: pass a .py file that registers a "
                                    "method with @d3p.register_method, or an importable module name")
        stem = os.path.splitext(os.path.basename(path))[0]
        module_name = f"d3p_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        if module_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
        return module_name
    try:
        importlib.import_module(source)
    except ModuleNotFoundError as exc:
        if exc.name and source.startswith(exc.name):
            raise ModuleNotFoundError(f"--prune_plugin {source}: no module {exc.name!r}. Fix: pass a .py file path, "
                                      "or put the module on PYTHONPATH") from None
        raise
    return source


def plugins_in_argv(argv: Sequence[str]) -> list[str]:
    """The values of every `--prune_plugin X` / `--prune_plugin=X` in argv."""
    found, argv = [], list(argv)
    for i, arg in enumerate(argv):
        if arg == "--prune_plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--prune_plugin="):
            found.append(arg.split("=", 1)[1])
    return found


def import_prune_plugins(argv: Sequence[str] | None = None) -> list[str]:
    """Import the --prune_plugin modules named in argv (default: sys.argv[1:]), before the parser is built, so that
    their methods and options are among the flags. Entry scripts call it first thing."""
    return [import_prune_plugin(s) for s in plugins_in_argv(sys.argv[1:] if argv is None else argv)]
