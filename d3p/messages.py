"""Messages in the caller's terms, at the caller's line.

A library user passes keywords (`DataPruner(..., d3p_period=2)`), a script user flags (`--d3p_period 2`); the
option checks and the methods word their messages once, in flags. `in_keywords` rewrites such a message for a
library caller. `warn_at_caller` issues a warning attributed to the first frame outside the d3p package (the
user's line), wherever inside d3p it was raised.
"""
from __future__ import annotations

import os
import re
import sys
import warnings

__all__ = ["in_keywords", "warn_at_caller"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# whole phrases that have no one-to-one keyword form (checked before the generic rewrite)
_PHRASES = (
    ("--prune_method random --random_match RUN_DIR",
     "method='random', random_match=[the kept count of each epoch of the run to match]"),
    ("or use a new --output_dir", "or start a new run (another checkpoint)"),
    ("or start a new --output_dir", "or start a new run (another checkpoint)"),
    ("--d3p_start/--d3p_period/--d3p_window", "d3p_start, d3p_period and d3p_window"),
)
_FLAG = re.compile(r"--(\w+)(?: ([-+]?\d[\d.e+-]*|[A-Za-z_][\w]*))?")


def _values() -> set[str]:
    """Words that are an option's value (a method's name, a choice), not the next word of the sentence."""
    from d3p.registry import all_options, method_names

    words = set(method_names())
    for option in all_options().values():
        words |= {str(c) for c in option.choices or ()}
    return words


def in_keywords(message: str) -> str:
    """`message` with its flags written as the keywords of `d3p.DataPruner`: `--prune_method random` ->
    `method='random'`, `--d3p_min_kept 0.6` -> `d3p_min_kept=0.6`, `--d3p_window (n=3)` -> `d3p_window (n=3)`."""
    for flag_text, keyword_text in _PHRASES:
        message = message.replace(flag_text, keyword_text)
    values = _values()

    def rewrite(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        key = "method" if name == "prune_method" else name
        if value is None:
            return key
        if re.fullmatch(r"[-+]?\d[\d.e+-]*", value):
            return f"{key}={value}"
        if value in values:
            return f"{key}={value!r}"
        return f"{key} {value}"

    return _FLAG.sub(rewrite, message)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` attributed to the user's line (the first frame outside d3p)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
