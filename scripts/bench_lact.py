"""Peak memory and time of LaCT, autograd vs manual backprop (see `lact/bench.py`).

Thin wrapper so the command runs from a checkout without installing; the code is `lact.bench`.
After `pip install .` the same command is `ttt-bench-lact`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lact.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
