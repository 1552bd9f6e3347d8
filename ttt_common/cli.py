"""One behaviour for every command-line tool: bad input is one clear line on stderr, never a traceback.

Exit codes, the same for every CLI of the project (documented in the README):

    0   finished
    1   an unexpected internal error (a bug: the message says how to get the full traceback), or a
        training run that diverged (`EXIT_DIVERGED`: non-finite losses for N steps in a row, said so)
    2   bad input: an option, a config key, a missing or damaged file (argparse uses 2 as well)
    75  stopped early by a signal (SIGTERM / SIGINT) after saving: rerun with --resume (EX_TEMPFAIL,
        so schedulers can tell "preempted" from "finished"); returned by the CLI that saved
    130 interrupted (Ctrl-C) where the CLI saves nothing on a signal (the shell's 128 + SIGINT)

`TTT_DEBUG=1` or `--debug` (accepted by every CLI that goes through `run_cli`, removed before the
CLI parses its options) re-raises, so the full traceback is printed.

Use: `def main(argv=None) -> int: return run_cli(_main, argv)` where `_main(argv)` parses and runs;
console entry points call `main()` with no arguments, the thin scripts `sys.exit(main())`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_DIVERGED = 1  # a training run stopped by `train_utils.NonFiniteGuard`
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """Bad input from the user (an option, a config key, a file): reported as one line, exit code 2."""


# exceptions that mean "the input is wrong", not "the program is wrong"
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
    PermissionError, KeyError,
)


DEBUG_FLAG = "--debug"


def _split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """`argv` without `--debug` (before a `--` separator), and whether it was there."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    found = DEBUG_FLAG in argv[:end]
    return [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:], found


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    """True when `TTT_DEBUG` is set (not "" or "0") or `argv` (default: sys.argv[1:]) holds `--debug`."""
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get("TTT_DEBUG", "") not in ("", "0") or _split_debug(argv)[1]


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str | None = None) -> int:
    """Call `main(argv)` and turn what it raises into one line on stderr and a documented exit code.

    `argv` None means `sys.argv[1:]`; `--debug` is removed from it before `main` sees it.
    Returns the exit code (`main`'s own int, or 0 when it returns None or a non-int result).
    `SystemExit` (argparse's usage errors: exit 2, `--help`: exit 0) passes through unchanged.
    """
    prog = prog or os.path.basename(sys.argv[0] or "ttt")
    debug = debug_enabled(argv)
    if argv is not None or debug:
        argv, _ = _split_debug(sys.argv[1:] if argv is None else argv)
    if debug:
        # code that reports its own errors asks `debug_enabled()`; worker processes inherit the setting
        previous = os.environ.get("TTT_DEBUG")
        os.environ["TTT_DEBUG"] = "1"
        try:
            code = main(argv)
        finally:
            if previous is None:
                del os.environ["TTT_DEBUG"]
            else:
                os.environ["TTT_DEBUG"] = previous
        return code if isinstance(code, int) else EXIT_OK
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") != "1" else None
    prog = f"[rank {rank}] {prog}" if rank is not None else prog
    try:
        code = main(argv)
    except KeyboardInterrupt:
        # nothing was saved on the way out (a CLI that saves on SIGINT returns EXIT_PREEMPTED itself)
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BAD_INPUT_ERRORS as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - the one place that reports unexpected errors
        print(f"{prog}: internal error: {type(err).__name__}: {err} (rerun with TTT_DEBUG=1 for the traceback)",
              file=sys.stderr, flush=True)
        return EXIT_INTERNAL
    return code if isinstance(code, int) else EXIT_OK
