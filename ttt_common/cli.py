"""One behaviour for every command-line tool: bad input is one clear line on stderr, never a traceback.

Exit codes, the same for every CLI of the project (documented in the README):

    0   finished
    1   an unexpected internal error (a bug: the message says how to get the full traceback)
    2   bad input: an option, a config key, a missing or damaged file (argparse uses 2 as well)
    75  stopped early by a signal (SIGTERM / SIGINT) after saving: rerun with --resume (EX_TEMPFAIL,
        so schedulers can tell "preempted" from "finished")

`TTT_DEBUG=1` (or `--debug` where a CLI offers it) re-raises, so the full traceback is printed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75


class UsageError(ValueError):
    """Bad input from the user (an option, a config key, a file): reported as one line, exit code 2."""


# exceptions that mean "the input is wrong", not "the program is wrong"
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
    PermissionError, KeyError,
)


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get("TTT_DEBUG", "") not in ("", "0") or "--debug" in argv


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str | None = None) -> int:
    """Call `main(argv)` and turn what it raises into one line on stderr and a documented exit code.

    Returns the exit code (`main`'s own int, or 0 when it returns None or a non-int result).
    """
    prog = prog or os.path.basename(sys.argv[0] or "ttt")
    if debug_enabled(argv):
        code = main(argv)
        return code if isinstance(code, int) else EXIT_OK
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except BAD_INPUT_ERRORS as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - the one place that reports unexpected errors
        print(f"{prog}: internal error: {type(err).__name__}: {err} (rerun with TTT_DEBUG=1 for the traceback)",
              file=sys.stderr, flush=True)
        return EXIT_INTERNAL
    return code if isinstance(code, int) else EXIT_OK
