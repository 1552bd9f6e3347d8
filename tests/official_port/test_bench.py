"""The official-layer benchmark's FLOP model and its `--ref` argument checks (no timing here)."""

import json

import pytest

from official_port.bench import KEEP_FREED_MEMORY, layer_matmul_flops_per_token, main


def test_flops_per_token_match_hand_count():
    # 125m layer, 2048 tokens: four D x D projections = 4 * 2 * 768^2 * 2048 = 9.66 GFLOP, and the
    # dual form adds per head and mini-batch (d = 64, m = 16): [K;Q] W 2*32*65*64, Q K^T 2*16*16*65,
    # M G 2*16*16*64, update 2*65*16*64 -> 0.72 GFLOP over 128 mini-batches x 12 heads.
    proj = 4 * 2 * 768 ** 2 * 2048
    inner = 128 * 12 * (2 * 32 * 65 * 64 + 2 * 16 * 16 * 65 + 2 * 16 * 16 * 64 + 2 * 65 * 16 * 64)
    assert layer_matmul_flops_per_token("ttt_linear", 768, 12, 16) * 2048 == pytest.approx(proj + inner, rel=1e-12)
    assert (proj + inner) / 1e9 == pytest.approx(10.38, abs=0.01)
    assert layer_matmul_flops_per_token("ttt_mlp", 768, 12, 16) > layer_matmul_flops_per_token("ttt_linear", 768, 12, 16)


def test_ref_without_checkout_is_a_clear_error(tmp_path, capsys):
    assert main(["--ref", str(tmp_path)]) == 2
    assert "no ttt.py there" in capsys.readouterr().err


def test_ref_jax_without_checkout_is_a_clear_error(tmp_path, capsys):
    assert main(["--ref-jax", str(tmp_path)]) == 2
    assert "no ttt/models/ttt_layer.py there" in capsys.readouterr().err


def test_ref_jax_with_a_python_lacking_jax_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "ttt" / "models").mkdir(parents=True)
    (tmp_path / "ttt" / "models" / "ttt_layer.py").write_text("")
    fake = tmp_path / "nojax"  # a "python" that fails like one without jax
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'jax'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    assert main(["--ref-jax", str(tmp_path), "--jax-python", str(fake)]) == 2
    err = capsys.readouterr().err
    assert "cannot import jax and flax" in err and "No module named 'jax'" in err and len(err.strip().splitlines()) == 1


def test_baseline_must_be_a_checkout_of_this_project(tmp_path, capsys):
    assert main(["--baseline", str(tmp_path)]) == 2
    assert "no official_port/bench.py there" in capsys.readouterr().err


def test_keep_freed_memory_reaches_the_measured_processes(monkeypatch, tmp_path):
    """--keep-freed-memory sets glibc's tunables for the spawned measurement processes (which report what
    they saw); without it they run with glibc's defaults."""
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    tiny = ["--seq-len", "16", "--batch", "1", "--repeats", "1", "--layers", "ttt_linear", "--skip-naive",
            "--threads", "1"]
    seen = {}
    for flag in ([], ["--keep-freed-memory"]):
        out = tmp_path / "bench.json"
        assert main([*tiny, *flag, "--json", str(out)]) == 0
        row = json.loads(out.read_text())[0]
        seen[bool(flag)] = {row["dual"][mode]["glibc_tunables"] for mode in ("fwd", "fwd+bwd")}
    assert seen == {False: {""}, True: {KEEP_FREED_MEMORY}}
