"""Tests of scripts/train.py and common/{checkpoint,packing,parallelize,metrics}.py (a package, so that
its test_train.py does not clash with tests/ponder/test_train.py)."""
