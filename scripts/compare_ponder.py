"""Compare the three adaptive layers of PonderTTT on the same cached data (see `ponder/compare.py`).

Thin wrapper so the command runs from a checkout without installing; the code is `ponder.compare`.
After `pip install .` the same command is `ttt-compare-ponder`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ponder.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
