"""Fail when the installed versions drift from requirements/lock.txt (what CI tested).

    python scripts/check_lock.py            # exit 0: every installed locked package has its locked version
    TTT_ALLOW_DRIFT=1 python scripts/check_lock.py   # report only (e.g. testing a newer transformers on purpose)

Only packages that are installed and whose lock line applies to this Python/platform are compared: the lock
also pins CUDA-only and other-Python packages that a CPU venv does not install. Local version labels are
ignored (torch 2.13.0+cpu satisfies torch==2.13.0).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of the lock lines that apply to this interpreter and platform."""
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        (spec,) = req.specifier  # every lock line is name==version
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def drift(lock: Path = LOCK) -> list[str]:
    """One line per installed package whose version differs from the lock."""
    out = []
    for name, want in sorted(locked_versions(lock).items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(have).public != Version(want).public:
            out.append(f"{name}: installed {have}, locked {want}")
    return out


def main() -> int:
    if not LOCK.is_file():
        print(f"check_lock: {LOCK.name} not found: run from a checkout of the repository", file=sys.stderr)
        return 2
    lines = drift()
    if not lines:
        print(f"check_lock: installed versions match requirements/lock.txt ({len(locked_versions())} pins apply here)")
        return 0
    allowed = os.environ.get("TTT_ALLOW_DRIFT", "") not in ("", "0")
    print(f"check_lock: {len(lines)} installed package(s) differ from requirements/lock.txt"
          f"{' (allowed by TTT_ALLOW_DRIFT)' if allowed else ''}:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    if not allowed:
        print("Rebuild the venv from the lock (rm -rf .venv && make venv), or refresh the lock on purpose "
              "(make lock) and commit it.", file=sys.stderr)
    return 0 if allowed else 1


if __name__ == "__main__":
    sys.exit(main())
