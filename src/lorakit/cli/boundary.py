"""The command line's one error boundary: any failure of ``lorakit <command>`` is one clear message and a
non-zero exit status; the traceback only with ``--debug`` (or ``LORAKIT_DEBUG=1``).

lorakit's own errors (:class:`~lorakit.errors.LorakitError`) already say what, where and how to fix it: they are
printed as they are (exit status 2). Anything else reaching here is an input lorakit does not check yet, or a
bug; it is still one message (exit status 1) that names the kind of failure and how to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from lorakit.errors import LorakitError

DEBUG_ENV = "LORAKIT_DEBUG"
MAX_MESSAGE_CHARS = 2000  # longer messages keep their head and tail


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` was given (``args.debug_traceback``) or ``LORAKIT_DEBUG`` is set to something but 0/empty."""
    flag = bool(getattr(args, "debug_traceback", False))
    return flag or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def _cut(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    half = MAX_MESSAGE_CHARS // 2
    return f"{text[:half]} ... [{len(text) - MAX_MESSAGE_CHARS} chars cut] ... {text[-half:]}"


def describe_failure(err: BaseException) -> str:
    """One line for an error that is not a :class:`LorakitError`: what kind of failure, and the fix if known."""
    if isinstance(err, RecursionError):
        return "an input is nested too deeply to process (RecursionError); flatten it"
    if isinstance(err, MemoryError):
        return "out of memory; lower train.batch_size / data.max_length, or use a smaller model"
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or type(err).__name__}"
    if isinstance(err, UnicodeError):
        return f"text that is not valid Unicode: {err}"
    message = str(err) or "(no message)"
    return f"{type(err).__name__}: {message} (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one subcommand inside the boundary; returns the process exit status.

    Returns:
        int: The command's status; 2 for a :class:`LorakitError`, 1 for any other failure, 130 on Ctrl-C.
    """
    debug = debug_requested(args)
    try:
        return command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # the boundary: every failure becomes one message
        if debug:
            traceback.print_exc()
        if isinstance(err, LorakitError):
            print(f"error: {_cut(str(err))}", file=sys.stderr)
            return 2
        print(f"error: {_cut(describe_failure(err))}", file=sys.stderr)
        return 1


def add_debug_flag(parser: argparse.ArgumentParser, top_level: bool) -> None:
    """``--debug``: show tracebacks. On a subcommand its default is left to the top-level flag (so
    ``lorakit --debug train`` and ``lorakit train --debug`` both work)."""
    parser.add_argument(
        "--debug", dest="debug_traceback", action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help=f"print the traceback of a failure (also {DEBUG_ENV}=1)",
    )  # fmt: skip


__all__ = ["DEBUG_ENV", "add_debug_flag", "debug_requested", "describe_failure", "run_command"]
