"""The built-in pruning methods, one module each; each registers itself (`d3p.registry.register_method`) when
imported, and this package imports them in the order the flags and listings show them.

    d3p.py        D3P (spec §2-§7)                 infobatch.py  InfoBatch          seta.py     SeTa
    random.py     random dynamic (+ matched)        none.py       whole dataset      dynunc.py   Dyn-Unc (static)
    d2.py         D2 Pruning (static)
    common.py     the public bases BaseStrategy, LossScoredStrategy and the dynamic baselines' bookkeeping
    static_base.py  StaticSelector, the warm-up-then-select frame of the static selectors

A method of your own is one module outside this package (docs/methods_api.md); it is not listed here.
"""
from d3p.methods import d3p, none, infobatch, seta, random, dynunc, d2  # noqa: F401  (registration order)
