"""Every command-line tool reports bad input as one line on stderr with a documented exit code, never a
traceback; `TTT_DEBUG=1` / `--debug` gives the traceback (issue 11, items 7, 8 and 11).

The CLIs run as real subprocesses, each stopped by an early check (no model is built, no data loaded).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ttt_common import cli

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], tmp_path: Path, debug: bool = False, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TTT_DEBUG", "RANK", "WORLD_SIZE")}
    env.update(TTT_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if debug:
        env["TTT_DEBUG"] = "1"
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(res: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    error_lines = [ln for ln in lines if "error" in ln]
    assert len(error_lines) == 1, lines
    for w in words:
        assert w in error_lines[0], (w, error_lines[0])


S = str(ROOT / "scripts")


def test_run_ponder_bad_option_is_one_line_and_debug_gives_the_traceback(tmp_path):
    res = run([f"{S}/run_ponder.py", "--chunk-size", "1"], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "run_ponder.py: error:", "--chunk-size 1")
    res = run([f"{S}/run_ponder.py", "--chunk-size", "1", "--debug"], tmp_path)
    assert res.returncode == 1 and "Traceback" in res.stderr and "ValueError: --chunk-size 1" in res.stderr
    res = run([f"{S}/run_ponder.py", "--chunk-size", "1"], tmp_path, debug=True)
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_compare_ponder_bad_option(tmp_path):
    res = run([f"{S}/compare_ponder.py", "--chunk-size", "1", "--layers", "ponder-simple"], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "compare_ponder.py: error:", "--chunk-size 1")


def test_train_refuses_a_missing_tokenizer_and_an_empty_jsonl_before_building_anything(tmp_path):
    base = [f"{S}/train.py", "--config", "train_debug_lact", "--out", str(tmp_path / "run")]
    res = run(base + ["--tokenizer", str(tmp_path / "no_such_tokenizer")], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "--tokenizer", "no such folder")
    (tmp_path / "empty.jsonl").write_text("\n")
    res = run(base + ["--dataset", str(tmp_path / "empty.jsonl")], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "--dataset", "empty")
    res = run(base + ["--config", "no_such_config"], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "--config", "no_such_config")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing built or cached


def test_convert_jax_checks_options_before_reading_the_checkpoint(tmp_path):
    ckpt = tmp_path / "model.streaming_params"
    ckpt.write_bytes(b"\x00" * 16)  # never read: the config is refused first
    res = run(["-m", "official_port.convert_jax", str(ckpt), "--config", "no-such-preset", "--out",
               str(tmp_path / "hf")], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "convert_jax.py: error: --config no-such-preset")
    res = run(["-m", "official_port.convert_jax", str(tmp_path / "missing"), "--config", "125m-TTT", "--out",
               str(tmp_path / "hf")], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "does not exist")


def test_parity_and_benches_bad_input(tmp_path):
    res = run(["-m", "parity", "--fixtures", str(tmp_path / "missing")], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "does not exist")
    res = run([f"{S}/bench_official.py", "--layers", "ttt_bogus"], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "bench_official.py: error: --layers ttt_bogus")
    res = run([f"{S}/bench_lact.py", "--configs", "2x80"], tmp_path)
    assert_one_line_error(res, cli.EXIT_BAD_INPUT, "bench_lact.py: error: --configs")


# ------------------------------------------------------------------------------ run_cli itself (in process)
def test_run_cli_exit_codes_and_debug_flag(capsys, monkeypatch):
    monkeypatch.delenv("TTT_DEBUG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = []

    def main(argv):
        seen.append((list(argv), os.environ.get("TTT_DEBUG")))
        if "bad" in argv:
            raise cli.UsageError("--x bad: must be good")
        if "bug" in argv:
            raise RuntimeError("boom")
        if "stop" in argv:
            raise KeyboardInterrupt
        return 0

    assert cli.run_cli(main, ["ok"], prog="t") == cli.EXIT_OK
    assert cli.run_cli(main, ["bad"], prog="t") == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err == "t: error: --x bad: must be good\n"
    assert cli.run_cli(main, ["bug"], prog="t") == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("t: internal error: RuntimeError: boom") and "TTT_DEBUG=1" in err and err.count("\n") == 1
    assert cli.run_cli(main, ["stop"], prog="t") == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "t: interrupted\n"
    # --debug is removed before main parses, re-raises, and is visible to code that asks debug_enabled()
    with pytest.raises(cli.UsageError):
        cli.run_cli(main, ["--debug", "bad"], prog="t")
    assert seen[-1] == (["bad"], "1") and "TTT_DEBUG" not in os.environ
    cli.run_cli(main, ["ok", "--", "--debug"], prog="t")  # after "--" it is an argument, not the flag
    assert seen[-1] == (["ok", "--", "--debug"], None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.run_cli(main, ["bad"], prog="t") == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("[rank 1] t: error:")


# ------------------------------------------------------------------------------ item 11: the recipe's python
def _fake_repo(tmp_path: Path, with_venv: bool) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "train_tttdr_2-layer-mlp.sh", repo / "scripts")
    if with_venv:
        fake = repo / ".venv" / "bin" / "python"
        fake.parent.mkdir(parents=True)
        # records how it was called; "-c" is the script's import check
        fake.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\necho "venv-python $*" > "$(dirname "$0")/called"\n')
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return repo


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_train_recipe_uses_the_project_venv_without_PYTHON_or_an_active_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"  # no venv's bin first on the PATH
    repo = _fake_repo(tmp_path, with_venv=True)
    # run from outside the repo: the script cds there itself and must pick the fake .venv python
    cwd_script = repo / "scripts" / "train_tttdr_2-layer-mlp.sh"
    res = subprocess.run(["bash", str(cwd_script), "cpu", "--steps", "1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    called = (repo / ".venv" / "bin" / "called").read_text()
    assert called.startswith("venv-python scripts/train.py --model lact") and "--steps 1" in called
    # an explicit PYTHON still wins; a python that lacks torch is refused with one line and exit code 2
    bad = tmp_path / "nopython"
    bad.write_text("#!/bin/sh\nexit 1\n")
    bad.chmod(bad.stat().st_mode | stat.S_IEXEC)
    res = subprocess.run(["bash", str(cwd_script), "cpu"], cwd=tmp_path, env={**env, "PYTHON": str(bad)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "cannot import torch" in res.stderr and "PYTHON=" in res.stderr
