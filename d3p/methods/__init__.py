"""One module per pruning method, each a `d3p.strategy.PruningStrategy`; `d3p.DataPruner` builds them by name.

    d3p.py        D3P (spec §2-§7)                 infobatch.py  InfoBatch          seta.py     SeTa
    random.py     random dynamic (+ matched)        none.py       whole dataset      dynunc.py   Dyn-Unc (static)
    rs2.py        RS2 (random subsets without replacement)
    d2.py         D2 Pruning (static)               common.py     shared bookkeeping of the dynamic baselines
    static_base.py  the warm-up-then-select frame of the static selectors
"""
