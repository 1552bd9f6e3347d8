"""`python -m parity`: check the ports against golden fixture cases, one line per case.

Usage:
    python -m parity                          # every bundled case (parity/fixtures/...)
    python -m parity --fixtures DIR [DIR ...] # every case under DIR (recursively), other shapes welcome
    python -m parity --filter mlp --verbose   # cases whose name/path contains 'mlp', every check shown
    python -m parity --live                   # also fresh cases from the official JAX code (TTT_LM_JAX)

Each case prints `PASS|FAIL  <case>  <kind>  out=<max rel err>  grad=<max rel err>`, where each
number is the largest scale-relative error (`max|port - ref| / max|ref|`) over that case's output
resp. gradient tensors ('-' when it has none). A failing case adds why. The last line is exactly
`N passed, M failed` (counts of cases); the exit status is 1 if any case failed, 2 on a usage error
(no such directory, no case found, live mode requested but unavailable), else 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from parity.cases import CaseResult, describe_check, discover, run_case_file
from parity.fixtures import BUNDLED


def _fmt(err: float | None) -> str:
    return "-" if err is None else f"{err:.2e}"


def format_result(result: CaseResult, name_width: int = 0, kind_width: int = 0) -> str:
    """The one report line of a case (see the module docstring)."""
    status = "PASS" if result.passed else "FAIL"
    line = (
        f"{status}  {result.name:<{name_width}}  {result.kind:<{kind_width}}  "
        f"out={_fmt(result.out_err)}  grad={_fmt(result.grad_err)}"
    )
    if not result.passed:
        line += f"  {result.reason()}"
    return line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parity",
        description="Compare the PyTorch ports with golden cases produced by the reference implementations.",
    )
    parser.add_argument(
        "--fixtures",
        action="append",
        type=Path,
        metavar="DIR",
        nargs="+",
        help=f"directory of <case>.json + <case>.npz pairs, searched recursively, or one <case>.json; "
        f"repeatable (default: the bundled cases in {BUNDLED})",
    )
    parser.add_argument("--filter", metavar="SUBSTR", help="only cases whose name or path contains SUBSTR")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every check of every case")
    parser.add_argument(
        "--live",
        action="store_true",
        help="also generate fresh cases with the official JAX code (needs TTT_LM_JAX, see parity/README.md)",
    )
    parser.add_argument(
        "--lact-live",
        action="store_true",
        help="also generate fresh LaCT whole-layer cases with the reference layer (needs LACT_REF, see "
        "parity/lact_live.py)",
    )
    return parser


def _collect(dirs: Sequence[Path], substr: str | None) -> list[Path]:
    paths: list[Path] = []
    seen: set[Path] = set()
    for directory in dirs:
        for path in discover(directory):
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            paths.append(path)
    if substr:
        paths = [p for p in paths if substr in p.stem or substr in str(p)]
    return paths


def _print_result(result: CaseResult, widths: tuple[int, int], verbose: bool, out) -> None:
    print(format_result(result, *widths), file=out, flush=True)
    if verbose:
        for check in result.checks:
            print(f"      {'ok  ' if check.passed else 'BAD '} {describe_check(check)}", file=out)
        if result.error:
            print(f"      error: {result.error}", file=out)
        print(f"      ({result.seconds:.2f} s, {result.path})", file=out, flush=True)


def main(argv: Sequence[str] | None = None, out=None) -> int:
    """Run the CLI; returns the exit status (0 all passed, 1 some failed, 2 usage error). Unexpected
    errors are one line on stderr (`ttt_common.cli.run_cli`; TTT_DEBUG=1 or --debug for the traceback)."""
    from ttt_common.cli import run_cli

    return run_cli(lambda a: _main(a, out), argv, prog="python -m parity")


def _main(argv: Sequence[str] | None = None, out=None) -> int:
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    dirs = [d for group in args.fixtures for d in group] if args.fixtures else [BUNDLED]
    try:
        paths = _collect(dirs, args.filter)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="parity-live-") as live_dir:
        if args.live:
            from parity import live

            reason = live.unavailable_reason()
            if reason:
                print(f"error: --live: {reason}", file=sys.stderr)
                return 2
            # only the live cases the filter keeps: compiling the official modules is the cost
            names = [n for n in live.LIVE_CASE_NAMES if not args.filter or args.filter in n]
            if names:
                print(f"generating {len(names)} live case(s) with the official JAX code in "
                      f"{live.official_dir()} ...", file=out, flush=True)
                try:
                    paths += live.generate_cases(Path(live_dir), names=names)
                except live.LiveGenerationError as exc:
                    print(f"error: --live: {exc}", file=sys.stderr)
                    return 2
        if args.lact_live:
            from parity import lact_live

            reason = lact_live.unavailable_reason()
            if reason:
                print(f"error: --lact-live: {reason}", file=sys.stderr)
                return 2
            names = [n for n in lact_live.case_names(live=True) if not args.filter or args.filter in n]
            if names:
                print(f"generating {len(names)} live LaCT layer case(s) with the reference in "
                      f"{lact_live.reference_dir()} ...", file=out, flush=True)
                paths += lact_live.generate_cases(Path(live_dir) / "lact", names=names)
        if not paths:
            where = ", ".join(str(d) for d in dirs)
            extra = f" matching --filter {args.filter!r}" if args.filter else ""
            print(f"error: no fixture cases{extra} found in {where}", file=sys.stderr)
            return 2
        # lines are printed as cases finish; names are padded to the longest file stem (= case name)
        widths = (max(len(p.stem) for p in paths), len("lact_helper"))
        for path in paths:
            result = run_case_file(path)
            results.append(result)
            _print_result(result, widths, args.verbose, out)

    n_pass = sum(r.passed for r in results)
    n_fail = len(results) - n_pass
    print(f"{n_pass} passed, {n_fail} failed", file=out)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
