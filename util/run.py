"""How an entry script runs and ends: one exit code per kind of failure, `run_main` that maps errors to them, and
the last act of a run stopped by a signal.

The rest of the run layer is split by concern: util/flags.py (the shared flags), util/stop.py (stop signals),
util/resume.py (checkpoints and resume), util/loader.py (loaders), util/run_log.py (log files), and
util/lifecycle.py (the epoch sequence every training script shares).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from d3p.checkpoints import CheckpointFormatError
from d3p.collectives import get_rank
from d3p.distributed import RankDivergenceError
from util import checkpoint as ckpt_util
from util.dist import cleanup
from util.engine import NonFiniteLossError

# ------------------------------------------------------------------------------------------ exit codes
EXIT_FAILED = 1    # the training failed (NaN loss, diverged replicas): the last checkpoint is intact
EXIT_USAGE = 2     # bad flags or input (argparse's code too): nothing was trained
EXIT_STOPPED = 143  # stopped by a signal after saving (128 + SIGTERM, what a scheduler expects)


class ConfigError(RuntimeError):
    """A problem with the flags or inputs; the message names it and the fix (exit code 2)."""


def _usage_errors() -> tuple[type[BaseException], ...]:
    from util.data_errors import DatasetError

    return (ConfigError, DatasetError, ckpt_util.ResumeMismatchError, CheckpointFormatError, FileNotFoundError)


def run_main(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run an entry script's `main(args)` -> its exit code: EXIT_USAGE for bad input (ConfigError,
    DatasetError, a checkpoint of another run), EXIT_FAILED for a failed run (NonFiniteLossError,
    RankDivergenceError), else what main returned (an int, e.g. EXIT_STOPPED) or 0. The error line is
    written by every rank (not print(): ranks other than 0 are silenced there), without a traceback."""
    try:
        code = main(args)
        return code if isinstance(code, int) else 0
    except _usage_errors() as exc:
        _report(exc)
        return EXIT_USAGE
    except (NonFiniteLossError, RankDivergenceError, ckpt_util.CheckpointSaveError, ValueError) as exc:  # ValueError: a check deeper down
        _report(exc)
        return EXIT_FAILED
    finally:
        cleanup()


def _report(exc: BaseException) -> None:
    sys.stderr.write(f"error (rank {get_rank()}): {exc}\n")
    sys.stderr.flush()


def stopped(stop, message: str) -> int:
    """The last act of a run stopped by a signal after its checkpoint: one clear line, the previous
    handler (submitit's requeue), EXIT_STOPPED."""
    print(f"{message}; checkpoint saved, resume with --auto_resume", force=True)
    stop.hand_over()
    return EXIT_STOPPED
