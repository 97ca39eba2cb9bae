"""The built-in pruning methods, one module each; each registers itself (`d3p.registry.register_method`) when
imported. Importing this package imports every module in it, so a new built-in method is one new file here.

    d3p.py        D3P (spec §2-§7)                 infobatch.py  InfoBatch          seta.py     SeTa
    random.py     random dynamic (+ matched)        none.py       whole dataset      dynunc.py   Dyn-Unc (static)
    d2.py         D2 Pruning (static)             orderdp.py    OrderDP            random_static.py  fixed random subset (static)
    common.py     the public bases BaseStrategy, LossScoredStrategy and the dynamic baselines' bookkeeping
    static_base.py  StaticSelector, the warm-up-then-select frame of the static selectors

A method of your own can also live outside this package (docs/methods_api.md): import it, or --prune_plugin it.
"""
import importlib
import pkgutil

# the order listings and flags show first (help text only); any other module of the package follows by name
_LISTED_FIRST = ("d3p", "none", "infobatch", "seta", "random", "dynunc", "d2", "orderdp", "random_static")


def _import_all() -> None:
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in sorted(found, key=lambda n: (_LISTED_FIRST.index(n) if n in _LISTED_FIRST else len(_LISTED_FIRST), n)):
        importlib.import_module(f"{__name__}.{name}")


_import_all()
