"""PonderTTT experiment on a frozen LM: train the adaptive TTT layer, evaluate SKIP / UPDATE_k / gates.

Usage (the default run takes a few minutes on 2 CPU cores with the offline SmolLM2-135M base):

    python scripts/run_ponder.py --mode UPDATE_1
    python scripts/run_ponder.py --mode ADAPTIVE --gate recon --target-rate 0.5
    python scripts/run_ponder.py --ttt-layer ponder-simple --base gpt2 --steps 200 --max-train-docs 64

Writes `results/<run>/` (chunks.jsonl, summary.json, results.md, plots); see `ponder/runner.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ponder.runner import add_arguments, run_experiment  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    return run_experiment(args)


if __name__ == "__main__":
    main()
