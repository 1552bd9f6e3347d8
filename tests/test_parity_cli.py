"""Behaviour of the parity driver: `python -m parity` (parity/__main__.py), dispatch (parity/cases.py), live mode gating.

Most tests swap the adapters for an "echo" adapter that compares each case's `output/*` and
`grad/*` arrays with those of the pristine bundled case of the same name: a copied fixture then
passes with error 0 and a perturbed copy fails by exactly the perturbation, which pins down the
driver's plumbing (discovery, dispatch, error columns, summary, exit status) without depending on
the ports. One test runs the real CLI in a subprocess with a real adapter.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from parity import cases, live
from parity.__main__ import main
from parity.fixtures import BUNDLED, GRAD_TOL, OUTPUT_TOL, compare, load_case

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(PASS|FAIL)  (\S+)\s+(\S+)\s+out=(\S+)\s+grad=(\S+)(?:\s+(.*))?$")
LAYER_CASES = ["layer_ttt_linear", "layer_ttt_mlp_base"]


def _echo_adapter(case):
    """Compare the case's references with the pristine bundled case of the same name."""
    pristine = load_case(next(BUNDLED.rglob(f"{case.path.stem}.json"))).arrays
    checks = []
    for key, ref in case.arrays.items():
        if key.startswith("output/"):
            checks.append(compare(key, pristine[key], ref, OUTPUT_TOL))
        elif key.startswith("grad/"):
            checks.append(compare(key, pristine[key], ref, GRAD_TOL))
    return checks


@pytest.fixture
def echo(monkeypatch):
    """Route every adapter to `_echo_adapter` (the real ones are not needed for driver behaviour)."""
    module = types.ModuleType("_parity_echo_adapter")
    module.run_case = _echo_adapter
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for name in list(cases.ADAPTERS):
        monkeypatch.setitem(cases.ADAPTERS, name, (module.__name__, "run_case"))
    return module


def _copy(names: list[str], dest: Path, with_npz: bool = True) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        src = next(BUNDLED.rglob(f"{name}.json"))
        shutil.copy(src, dest / src.name)
        if with_npz:
            shutil.copy(src.with_suffix(".npz"), dest / src.with_suffix(".npz").name)
        out.append(dest / src.name)
    return out


def _perturb(json_path: Path, key: str, rel: float) -> None:
    """Move the largest-magnitude element of array `key` by `rel` of max|array|."""
    npz = json_path.with_suffix(".npz")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arr = arrays[key].copy()
    idx = np.unravel_index(np.argmax(np.abs(arr)), arr.shape)
    arr[idx] += rel * np.abs(arr).max()
    arrays[key] = arr
    np.savez_compressed(npz, **arrays)


def _run(argv: list[str]) -> tuple[int, list[str]]:
    buf = io.StringIO()
    status = main(argv, out=buf)
    return status, buf.getvalue().strip().splitlines()


def _case_lines(lines: list[str]) -> dict[str, re.Match]:
    return {m.group(2): m for m in map(LINE.match, lines) if m}


def test_all_pass_exit_0(echo, tmp_path):
    _copy(LAYER_CASES, tmp_path / "cases")
    status, lines = _run(["--fixtures", str(tmp_path / "cases")])
    assert status == 0
    assert lines[-1] == "2 passed, 0 failed"
    rows = _case_lines(lines)
    assert set(rows) == set(LAYER_CASES)
    for row in rows.values():
        assert row.group(1) == "PASS" and row.group(3) == "layer"
        assert float(row.group(4)) == 0.0 and float(row.group(5)) == 0.0


def test_perturbed_reference_fails_exit_1(echo, tmp_path):
    paths = _copy(LAYER_CASES, tmp_path)
    _perturb(paths[0], "output/ttt_output", 3e-5)  # 3x the output tolerance
    status, lines = _run(["--fixtures", str(tmp_path)])
    assert status == 1
    assert lines[-1] == "1 passed, 1 failed"
    rows = _case_lines(lines)
    bad = rows["layer_ttt_linear"]
    assert bad.group(1) == "FAIL" and "output/ttt_output" in bad.group(6)
    assert float(bad.group(4)) == pytest.approx(3e-5, rel=1e-3)  # the error column is the perturbation
    assert rows["layer_ttt_mlp_base"].group(1) == "PASS"


@pytest.mark.parametrize(("rel", "passes"), [(2e-5, True), (1e-4, False)])
def test_gradient_tolerance_boundary(echo, tmp_path, rel, passes):
    # gradients are allowed 5e-5 of max|ref|: 2e-5 must pass, 1e-4 must fail
    (path,) = _copy(["layer_ttt_mlp"], tmp_path)
    _perturb(path, "grad/param/wq/kernel", rel)
    status, lines = _run(["--fixtures", str(tmp_path)])
    assert status == (0 if passes else 1)
    row = _case_lines(lines)["layer_ttt_mlp"]
    assert float(row.group(5)) == pytest.approx(rel, rel=1e-3)
    assert float(row.group(4)) == 0.0


def test_missing_npz_and_unknown_kind_fail_with_reason(echo, tmp_path):
    _copy(["layer_ttt_linear"], tmp_path, with_npz=False)
    (odd,) = _copy(["layer_ttt_mlp"], tmp_path)
    meta = json.loads(odd.read_text())
    meta["kind"] = "banana"
    odd.write_text(json.dumps(meta))
    (tmp_path / "notes.json").write_text('["not a case"]')  # ignored: no npz, not a case object
    status, lines = _run(["--fixtures", str(tmp_path)])
    assert status == 1
    assert lines[-1] == "0 passed, 2 failed"
    rows = _case_lines(lines)
    assert "no array file layer_ttt_linear.npz" in rows["layer_ttt_linear"].group(6)
    assert rows["layer_ttt_mlp"].group(3) == "banana"
    assert "no adapter for kind='banana'" in rows["layer_ttt_mlp"].group(6)


def test_raising_or_empty_adapter_fails_only_its_case(echo, tmp_path, monkeypatch):
    _copy(["layer_ttt_linear", "model_ttt_mlp", "ponder_simple_ff"], tmp_path)

    def boom(case):
        raise RuntimeError(f"cannot build {case.name}\nsecond line")

    monkeypatch.setattr(echo, "boom", boom, raising=False)
    monkeypatch.setattr(echo, "nothing", lambda case: [], raising=False)
    monkeypatch.setitem(cases.ADAPTERS, "official_model", (echo.__name__, "boom"))
    monkeypatch.setitem(cases.ADAPTERS, "ponder", (echo.__name__, "nothing"))
    status, lines = _run(["--fixtures", str(tmp_path)])
    assert status == 1
    assert lines[-1] == "1 passed, 2 failed"
    rows = _case_lines(lines)
    assert rows["model_ttt_mlp"].group(6) == "RuntimeError: cannot build model_ttt_mlp second line"
    assert "no checks" in rows["ponder_simple_ff"].group(6)
    assert rows["layer_ttt_linear"].group(1) == "PASS"


def test_missing_adapter_module_fails_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setitem(cases.ADAPTERS, "official_layer", ("parity._no_such_adapter", "run_case"))
    _copy(["layer_ttt_linear"], tmp_path)
    status, lines = _run(["--fixtures", str(tmp_path)])
    assert status == 1
    assert "adapter module parity._no_such_adapter is not available" in lines[0]


def test_filter_verbose_and_several_dirs(echo, tmp_path):
    _copy(["layer_ttt_linear", "layer_ttt_mlp"], tmp_path / "a")
    _copy(["model_ttt_mlp", "lact_post_nomom"], tmp_path / "b" / "nested")
    status, lines = _run(["--fixtures", str(tmp_path / "a"), "--fixtures", str(tmp_path / "b"),
                          "--filter", "mlp", "--verbose"])
    assert status == 0
    assert lines[-1] == "2 passed, 0 failed"
    assert set(_case_lines(lines)) == {"layer_ttt_mlp", "model_ttt_mlp"}
    n_checks = sum(1 for k in load_case(tmp_path / "a" / "layer_ttt_mlp.json").arrays
                   if k.startswith(("output/", "grad/")))
    n_checks += sum(1 for k in load_case(tmp_path / "b" / "nested" / "model_ttt_mlp.json").arrays
                    if k.startswith(("output/", "grad/")))
    assert sum(1 for line in lines if line.lstrip().startswith("ok ")) == n_checks


def test_single_case_file(echo, tmp_path):
    paths = _copy(["layer_ttt_linear", "model_ttt_linear"], tmp_path)
    status, lines = _run(["--fixtures", str(paths[1])])
    assert status == 0
    assert set(_case_lines(lines)) == {"model_ttt_linear"}
    assert lines[-1] == "1 passed, 0 failed"


def test_default_runs_every_bundled_case(echo):
    status, lines = _run([])
    n_cases = len(cases.discover(BUNDLED))
    assert status == 0
    assert lines[-1] == f"{n_cases} passed, 0 failed"
    kinds = {m.group(3) for m in _case_lines(lines).values()}
    assert kinds == {"layer", "model", "checkpoint", "lact_op", "lact_helper", "lact_layer"}


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["--fixtures", str(tmp_path / "missing")], out=io.StringIO()) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--fixtures", str(tmp_path)], out=io.StringIO()) == 2
    assert "no fixture cases found" in capsys.readouterr().err


def test_live_flag_without_checkout_exit_2(monkeypatch, capsys):
    monkeypatch.delenv(live.ENV_REPO, raising=False)
    assert main(["--live", "--filter", "layer_ttt_linear"], out=io.StringIO()) == 2
    assert f"{live.ENV_REPO} is not set" in capsys.readouterr().err


def test_live_unavailable_reasons(monkeypatch, tmp_path):
    monkeypatch.delenv(live.ENV_REPO, raising=False)
    assert "is not set" in live.unavailable_reason()
    monkeypatch.setenv(live.ENV_REPO, str(tmp_path))
    assert "ttt/models/ttt_layer.py" in live.unavailable_reason()
    for rel in live.OFFICIAL_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    monkeypatch.setenv(live.ENV_PYTHON, str(tmp_path / "no-python"))
    assert "cannot be run" in live.unavailable_reason()
    monkeypatch.setenv(live.ENV_PYTHON, sys.executable)  # ours: has no jax
    if subprocess.run([sys.executable, "-c", "import jax, flax"], capture_output=True).returncode != 0:
        assert "cannot import jax and flax" in live.unavailable_reason()
    with pytest.raises(ValueError, match="unknown live case"):
        live.generate_cases(tmp_path / "out", names=["live_nope"])


@pytest.mark.parametrize(
    ("folder", "adapter"),
    [("official", None), ("checkpoints", "official_checkpoint"), ("ponder", "ponder"), ("lact", "lact")],
)
def test_dispatch_of_bundled_cases(folder, adapter):
    for path in sorted((BUNDLED / folder).glob("*.json")):
        meta = json.loads(path.read_text())
        expected = adapter or ("official_layer" if path.stem.startswith("layer_") else "official_model")
        if folder == "lact" and path.stem.startswith("lact_layer_"):  # whole-layer cases (issue 16)
            expected = "lact_layer"
        assert cases.adapter_name(meta) == expected, path.name


def test_dispatch_unknown_names_the_rule():
    with pytest.raises(cases.UnknownCaseError, match=r"kind='layer' class='mylib.Layer'.*known are"):
        cases.adapter_name({"kind": "layer", "class": "mylib.Layer"})
    with pytest.raises(cases.UnknownCaseError, match="kind=None"):
        cases.adapter_name({})


def test_cli_subprocess_real_adapter(tmp_path):
    # the real entry point and a real adapter (PonderTTT's layer, the fastest bundled case); one
    # subprocess only: importing torch dominates its cost
    _copy(["ponder_simple_ff"], tmp_path / "good")
    (bad,) = _copy(["ponder_simple_ff"], tmp_path / "bad")
    _perturb(bad, "output/ttt_output", 1e-3)
    meta = json.loads(bad.read_text())
    meta["case"] = "ponder_simple_ff_perturbed"
    bad.write_text(json.dumps(meta))
    cmd = [sys.executable, "-m", "parity", "--fixtures", str(tmp_path / "good"), str(tmp_path / "bad")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines[-1] == "1 passed, 1 failed"
    rows = _case_lines(lines)
    assert rows["ponder_simple_ff"].group(1) == "PASS"
    assert float(rows["ponder_simple_ff"].group(4)) < OUTPUT_TOL
    assert rows["ponder_simple_ff_perturbed"].group(1) == "FAIL"
    assert float(rows["ponder_simple_ff_perturbed"].group(4)) == pytest.approx(1e-3, rel=0.02)


@pytest.mark.parametrize(
    ("name", "is_grad"),
    [("grad/param/wq/kernel", True), ("manual/grad/input/q", True), ("streaming_params: grad/x", True),
     ("output/ttt_output", False), ("autograd/output/o", False), ("ns_G", False), ("output/stat_0", False)],
)
def test_grad_column_classification(name, is_grad):
    from parity.fixtures import Check

    assert cases.is_grad_check(Check(name, 0.0, 1.0)) is is_grad


def test_reason_lists_at_most_three_failed_checks():
    from parity.fixtures import Check

    checks = [Check(f"grad/param/p{i}", 1e-3 * (i + 1), GRAD_TOL) for i in range(5)] + [Check("output/o", 0.0, 1e-5)]
    result = cases.CaseResult("c", "layer", checks=checks)
    assert not result.passed
    assert result.out_err == 0.0 and result.grad_err == pytest.approx(5e-3)
    reason = result.reason()
    assert "grad/param/p2 max_rel=3.000e-03" in reason and "p3" not in reason
    assert reason.endswith("(+2 more, see --verbose)")
    nan = cases.CaseResult("c", "layer", checks=[Check("output/o", float("nan"), 1e-5), Check("output/b", 1.0, 1e-5)])
    assert np.isnan(nan.out_err) and not nan.passed


def test_live_flag_adds_generated_cases(echo, monkeypatch, tmp_path):
    # stand-in for the JAX subprocess: "generates" a live case by copying a bundled layer case
    requested = []

    def fake_generate(out_dir, names=None, timeout=900):
        requested.append(list(names))
        (path,) = _copy(["layer_ttt_mlp"], Path(out_dir))
        return [path]

    monkeypatch.setattr(live, "unavailable_reason", lambda: "")
    monkeypatch.setattr(live, "generate_cases", fake_generate)
    status, lines = _run(["--live", "--filter", "live_layer_ttt_mlp_h96"])
    assert status == 0
    assert requested == [["live_layer_ttt_mlp_h96_nh4_mb8_w3_b1_pos5"]]  # only what the filter keeps
    assert set(_case_lines(lines)) == {"layer_ttt_mlp"}  # bundled cases filtered out, live one run
    assert lines[-1] == "1 passed, 0 failed"
