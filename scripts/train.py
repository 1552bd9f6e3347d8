"""Train a LaCT or TTT language model with FSDP2 (see `ttt_common/trainer.py` and the README).

Thin wrapper so the command runs from a checkout without installing; the code is `ttt_common.trainer`.
After `pip install .` the same command is `ttt-train`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttt_common.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
