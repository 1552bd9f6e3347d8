"""Thin CLI for `lact.bench`: peak memory and time of the LaCT chunk op, autograd vs manual backprop.

    python scripts/bench_lact.py --configs 2:8192 --reference /path/to/lact_model/ttt_operation.py
"""

from lact.bench import main

if __name__ == "__main__":
    main()
