"""Training-side sweep of the PonderTTT adaptive layer on validation documents (see `ponder/sweep.py`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ponder.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
