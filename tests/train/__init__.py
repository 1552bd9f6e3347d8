"""Tests of the trainer (ttt_common/trainer.py) and ttt_common/{checkpoint,packing,parallelize,metrics}.py (a package, so that
its test_train.py does not clash with tests/ponder/test_train.py)."""
