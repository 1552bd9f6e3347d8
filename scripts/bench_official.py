"""Speed and memory of the ported official TTT layers (see `official_port/bench.py`).

Thin wrapper so the command runs from a checkout without installing; the code is `official_port.bench`.
After `pip install .` the same command is `ttt-bench-official`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from official_port.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
