"""The installed environment is the one requirements/lock.txt pins (what CI tested), and the check can fail."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_lock.py"


def _module():
    spec = importlib.util.spec_from_file_location("check_lock", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(os.environ.get("TTT_ALLOW_DRIFT", "") not in ("", "0"),
                    reason="TTT_ALLOW_DRIFT set: testing other versions than the lock on purpose")
def test_installed_versions_match_the_lock():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_drift_is_detected_and_named(tmp_path):
    mod = _module()
    import numpy
    import torch

    lock = tmp_path / "lock.txt"
    lock.write_text(f"numpy==0.0.1\n    # via x\ntorch=={torch.__version__.split('+')[0]}\n"
                    "not-installed-pkg==1.0\nnumpy==9.9 ; python_version < '3.0'\n")
    assert mod.locked_versions(lock) == {"numpy": "0.0.1", "torch": torch.__version__.split("+")[0],
                                         "not-installed-pkg": "1.0"}
    assert mod.drift(lock) == [f"numpy: installed {numpy.__version__}, locked 0.0.1"]
