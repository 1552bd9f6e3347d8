"""A plain (non-editable) `pip install .` works from any folder: entry points, bundled configs, fixtures.

Builds the wheel offline (setuptools is in the lock), installs it with --no-deps into a temporary
target (the venv provides the dependencies) and runs the tools from another directory, checking that the
code they import is the installed copy, not this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("ttt-run-ponder", "ttt-compare-ponder", "ttt-train", "ttt-convert-jax", "ttt-parity",
           "ttt-bench-official", "ttt-bench-lact")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    # build from a copy: setuptools writes build/ and *.egg-info into the source folder
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "results", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("ttt_toolkit-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(tmp / "site"))
    work = tmp / "elsewhere"
    work.mkdir()
    return tmp / "site", env, work


def _run(cmd, env, cwd):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_installed_package_runs_from_another_folder(installed):
    site, env, work = installed
    for name in SCRIPTS:
        assert (site / "bin" / name).is_file(), f"console script {name} not installed"
    # only the project's own top-level names land in site-packages (no bare `tests`, `scripts`, `common`)
    top = {p.name for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info") and p.name != "bin"}
    assert top == {"official_port", "ponder", "lact", "parity", "ttt_common"}, sorted(top)
    # every bundled fixture file and the live-mode JAX script travel with the package
    fixtures = sorted(p.relative_to(ROOT / "parity").as_posix() for p in (ROOT / "parity" / "fixtures").rglob("*")
                      if p.is_file() and p.name != "README.md")
    installed_fixtures = sorted(p.relative_to(site / "parity").as_posix()
                                for p in (site / "parity" / "fixtures").rglob("*") if p.is_file())
    assert installed_fixtures == fixtures
    assert (site / "parity" / "live_jax.py").is_file()
    # the C kernels' sources and the headers they include (compiled on first use)
    csrc = "official_port/ops/csrc"
    assert sorted(p.name for p in (site / csrc).iterdir()) == sorted(p.name for p in (ROOT / csrc).iterdir())
    code = ("import official_port, lact, ponder, parity, ttt_common\n"
            "from ttt_common.config_files import resolve_config\n"
            "print(official_port.__file__); print(resolve_config('lact_debug_r2'))\n"
            "from lact import LaCTSWIGLUConfig\n"
            "print(LaCTSWIGLUConfig.from_json_file(str(resolve_config('816M_lact_swiglu_nh4_fwlow_rank_momentum_r2_e2e'))).r)")
    res = _run([sys.executable, "-c", code], env, work)
    assert res.returncode == 0, res.stderr
    module_file, config_file, r = res.stdout.split()
    assert module_file.startswith(str(site)) and config_file.startswith(str(site)) and r == "2"
    # the bundled parity fixtures travel with the package; the console script runs them
    res = _run([str(site / "bin" / "ttt-parity"), "--filter", "lact_post"], env, work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "5 passed, 0 failed" in res.stdout
    for name in ("ttt-run-ponder", "ttt-train", "ttt-convert-jax"):
        res = _run([str(site / "bin" / name), "--help"], env, work)
        assert res.returncode == 0 and "usage" in res.stdout.lower(), (name, res.stderr)
