"""Tokenise a corpus into memory-mapped shards: see `python -m ttt_common.prepare_data --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttt_common.cli import run_cli  # noqa: E402
from ttt_common.prepare_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="prepare_data.py"))
