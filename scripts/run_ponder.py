"""PonderTTT experiment on a frozen LM: train the adaptive TTT layer, evaluate SKIP / UPDATE_k / gates (see `ponder/runner.py`).

Thin wrapper so the command runs from a checkout without installing; the code is `ponder.runner`.
After `pip install .` the same command is `ttt-run-ponder`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ponder.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
