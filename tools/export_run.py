#!/usr/bin/env python
"""Export the kept set, or the per-sample trained counts, of a pre-training run of this fork, as a .npy file.

    python tools/export_run.py RUN_DIR --out kept.npy             sorted int64 indices kept at the last decision
    python tools/export_run.py RUN_DIR --out counts.npy --counts  int64 [N]: epochs each sample was trained in

RUN_DIR is a pre-training --output_dir (checkpoint-E.pth, log.txt), an arm folder holding it as RUN_DIR/pretrain
(the layout of train_d3p.sh and tools/reproduce_table1.sh), or a checkpoint file. The newest checkpoint that loads
completely is used (a torn one is skipped, as --auto_resume does). What is exported, and when it is exact: see
`d3p.export` (`d3p-export CHECKPOINT` does the same from one checkpoint file).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d3p.export import build_parser, main as export_main  # noqa: E402  (needs the repository on sys.path)
from util.run_folder import resolve_run_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(prog="python tools/export_run.py",
                          source_help="pre-training --output_dir, an arm folder holding pretrain/, or a checkpoint-E.pth")
    return export_main(argv, resolve=resolve_run_checkpoint, parser=parser)


if __name__ == "__main__":
    sys.exit(main())
