"""`pytest parity/`: every bundled golden case through its adapter, plus live cases from the official JAX code.

The same dispatch and checks as `python -m parity` (`parity/cases.py`): one test per bundled case
(id = `<folder>/<case>`), asserting that every compared tensor is within its tolerance. The
`test_live_*` tests build fresh cases with test-time-training/ttt-lm-jax (other seeds and shapes)
when `TTT_LM_JAX` points to a checkout and its python (`TTT_LM_JAX_PYTHON`) imports jax and flax;
otherwise they skip and say why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity import lact_live, live, official_layer
from parity.cases import CaseResult, describe_check, discover, run_case_file, run_loaded_case
from parity.fixtures import BUNDLED, compare, load_case

BUNDLED_CASES = discover(BUNDLED)


def _case_id(path: Path) -> str:
    return path.relative_to(BUNDLED).with_suffix("").as_posix()


def _failure_message(result: CaseResult) -> str:
    lines = [f"case {result.name} ({result.kind}, {result.path}) failed: {result.error or 'see below'}"]
    lines += [f"  {describe_check(c)}" for c in result.failed_checks]
    if not result.error and not result.checks:
        lines.append(f"  {result.reason()}")
    return "\n".join(lines)


def test_bundled_fixtures_present():
    # the public sets: 9 official cases, the checkpoint, 4 ponder, 8 lact
    folders = sorted({p.parent.name for p in BUNDLED_CASES})
    assert folders == ["checkpoints", "lact", "official", "ponder"], folders
    assert len(BUNDLED_CASES) >= 22, [p.name for p in BUNDLED_CASES]
    assert sum(official_layer.handles(load_case(p)) for p in BUNDLED_CASES) == 6


def _assert_coverage(path: Path, result: CaseResult) -> None:
    """What each official kind must have compared, not just that the comparisons passed. (Here, and not
    in tests/official_port, so that every bundled fixture runs once in the suite.)"""
    names = {c.name for c in result.checks}
    case = load_case(path)
    if official_layer.handles(case):
        assert {"output/ttt_output", "grad/input/hidden_states"} <= names, sorted(names)
        assert {f"output/stat_{i}" for i in range(4)} <= names, sorted(names)
    elif result.kind == "model":
        assert {"output/logits", "output/loss"} <= names, sorted(names)
        # one gradient check per flax parameter of the case
        assert sum(n.startswith("grad/param/") for n in names) == sum(k.startswith("param/") for k in case.arrays)
    elif result.kind == "checkpoint":
        assert len(result.checks) == 2, sorted(names)  # streaming_params and streaming_train_state


@pytest.mark.parametrize("path", BUNDLED_CASES, ids=_case_id)
def test_bundled_case(path: Path):
    result = run_case_file(path)
    assert result.passed, _failure_message(result)
    _assert_coverage(path, result)


# --------------------------------------------------------------------------- live mode

# one layer (MLP, shifted per-row positions, ttt_lr_mult 0.5) and one model: compiling is the cost
REPLAYED = ["official/layer_ttt_mlp_lrmult0p5_pos_rows3_21", "official/model_ttt_linear"]


def _skip_unless_live() -> None:
    reason = live.unavailable_reason()
    if reason:
        pytest.skip(f"live parity off: {reason}")


@pytest.fixture(scope="session")
def live_cases(tmp_path_factory) -> dict[str, Path]:
    _skip_unless_live()
    out = tmp_path_factory.mktemp("live_cases")
    return {p.stem: p for p in live.generate_cases(out)}


@pytest.fixture(scope="session")
def replayed_cases(tmp_path_factory) -> dict[str, Path]:
    _skip_unless_live()
    out = tmp_path_factory.mktemp("replayed")
    paths = live.replay_cases([BUNDLED / f"{name}.json" for name in REPLAYED], out)
    return {p.stem: p for p in paths}


def test_live_cases_differ_from_bundled():
    # live mode is only worth something if its cases are not the bundled ones again
    bundled = [load_case(p).meta for p in BUNDLED_CASES if p.parent.name == "official"]
    for spec in live.LIVE_CASES:
        for meta in bundled:
            same_shape = all(meta["config_overrides"].get(k) == v for k, v in spec["config"].items()
                             if k in ("hidden_size", "num_attention_heads", "mini_batch_size"))
            assert not same_shape or meta["seed"] != spec["seed"], (spec["case"], meta["case"])
        assert spec["case"].startswith(live.LIVE_PREFIX)


@pytest.mark.slow
@pytest.mark.parametrize("name", live.LIVE_CASE_NAMES)
def test_live_case(live_cases: dict[str, Path], name: str):
    case = load_case(live_cases[name])
    # the generated case is complete: every parameter has its gradient, shapes follow the spec
    spec = next(s for s in live.LIVE_CASES if s["case"] == name)
    params = [k for k in case.arrays if k.startswith("param/")]
    assert params and all(f"grad/{k}" in case.arrays for k in params)
    assert set(case.meta["param_paths"]) == set(params)
    lead = case.arrays["input/hidden_states" if spec["kind"] == "layer" else "input/input_ids"]
    assert lead.shape[:2] == (spec["batch"], spec["config"]["max_sequence_length"])
    result = run_loaded_case(case)
    assert result.passed, _failure_message(result)


@pytest.mark.slow
@pytest.mark.parametrize("name", REPLAYED)
def test_live_generator_replays_bundled_fixtures(replayed_cases: dict[str, Path], name: str):
    """The generator, fed a bundled case's own params and inputs, reproduces its stored outputs.

    This checks the live path (how the official modules are called, key naming, VJP, loss) against
    the fixtures, independently of any port.
    """
    got = load_case(replayed_cases[Path(name).name]).arrays
    ref = load_case(BUNDLED / f"{name}.json").arrays
    compared = [k for k in got if k.startswith(("output/", "grad/"))]
    assert set(compared) == {k for k in ref if k.startswith(("output/", "grad/"))}
    for key in compared:
        # same official code, same versions, same CPU backend: only float32 rounding may differ
        # (measured: 4.7e-7 on the layer, where forward and VJP are compiled as one function; 0 on the model)
        check = compare(key, got[key], ref[key], 2e-6)
        assert check.passed, f"replay differs from the fixture: {describe_check(check)}"


# --------------------------------------------------------------------------- LaCT whole layer (issue 16)

LACT_LAYER_CASES = sorted((BUNDLED / "lact").glob(f"{lact_live.BUNDLED_PREFIX}*.json"))


def test_lact_layer_fixtures_cover_every_configuration():
    assert [p.stem for p in LACT_LAYER_CASES] == sorted(lact_live.case_names(live=False))
    for path in LACT_LAYER_CASES:
        meta = load_case(path).meta
        assert meta["kind"] == "lact_layer" and meta["layer"] == lact_live.CONFIGS[path.stem.removeprefix("lact_layer_")]


@pytest.mark.parametrize("change", [dict(window_size=4), dict(ttt_prenorm=True), dict(lact_chunk_size=7)])
def test_lact_layer_case_fails_for_a_wrong_configuration(change):
    """The layer check can fail: the same weights in a layer built with one option changed miss the case."""
    case = load_case(BUNDLED / "lact" / "lact_layer_post_mom_lowrank_scale.json")
    case.meta["layer"] = {**case.meta["layer"], **change}
    result = run_loaded_case(case)
    assert not result.passed and result.failed_checks


@pytest.fixture(scope="session")
def lact_live_cases(tmp_path_factory) -> dict[str, Path]:
    reason = lact_live.unavailable_reason()
    if reason:
        pytest.skip(f"LaCT live parity off: {reason}")
    return {p.stem: p for p in lact_live.generate_cases(tmp_path_factory.mktemp("lact_live"))}


@pytest.mark.parametrize("name", lact_live.case_names(live=True))
def test_lact_live_case(lact_live_cases: dict[str, Path], name: str):
    case = load_case(lact_live_cases[name])
    assert case.meta["seed"] != load_case(BUNDLED / "lact" / f"{name.removeprefix('live_')}.json").meta["seed"]
    result = run_loaded_case(case)
    assert result.passed, _failure_message(result)
