"""The experiment runner and CLI (ponder/runner.py, scripts/run_ponder.py) end to end on a tiny
random GPT-2, plus the evaluation protocol with a stand-in gate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ponder.gates import Gate
from ponder.runner import default_args, evaluate_gate, run_experiment
from ponder.types import ALL_ACTIONS
from tests.ponder.synthetic import make_tiny_gpt2, synthetic_env

ROOT = Path(__file__).resolve().parents[2]


class RecordingGate(Gate):
    """Stand-in gate: alternates SKIP / UPDATE_2 and records what the runner showed it."""

    name = "stand-in"

    def __init__(self, lookahead=False, uses_labels=False):
        super().__init__()
        self.lookahead, self.uses_labels, self.target_rate = lookahead, uses_labels, 0.5
        self.seen, self.observed, self.last_signal = [], [], None

    def prepare(self, env, doc_ids):
        pass

    def reset(self, doc_id):
        self.doc = doc_id

    def decide(self, ctx):
        self.seen.append(ctx)
        self.last_signal = float(ctx.chunk_idx)
        return "UPDATE_2" if ctx.chunk_idx % 2 else "SKIP"

    def observe(self, record):
        self.observed.append(record)


@pytest.mark.parametrize("lookahead,labels", [(False, False), (True, False), (False, True)],
                         ids=["causal", "lookahead", "labels"])
def test_protocol_shows_each_gate_only_what_it_may_see(lookahead, labels):
    env = synthetic_env()
    gate = RecordingGate(lookahead, labels)
    rows = evaluate_gate(env, gate, env.doc_ids())
    assert len(rows) == len(gate.seen) == len(gate.observed) == 6
    for ctx in gate.seen:
        assert (ctx.current is not None) == lookahead
        assert (ctx.oracle_losses is not None) == labels
        if labels:
            assert set(ctx.oracle_losses) == set(ALL_ACTIONS)
        assert ctx.budget_left == pytest.approx(0.5 * ctx.n_chunks - (ctx.chunk_idx // 2))
    assert [r["action"] for r in rows[:3]] == ["SKIP", "UPDATE_2", "SKIP"]
    assert [r["gate_signal"] for r in rows[:3]] == [0.0, 1.0, 2.0]
    assert rows[0]["loss"] == pytest.approx(rows[0]["skip_loss"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))
    out = tmp_path_factory.mktemp("results")
    args = dict(base=base, chunk_size=16, max_train_docs=2, max_eval_docs=2, max_chunks_per_doc=3,
                min_doc_chunks=2, steps=4, batch_chunks=2, max_val_docs=1, eval_every=2, patience=0,
                out=str(out), run_name="tiny", cache_dir=str(out / "cache"),
                compare_gates="random,recon,recon-lookahead,oracle,budgeted-oracle", mini_batch_size=4,
                no_progress=True, mode="ADAPTIVE", gate=["recon"])
    return run_experiment(args), out / "tiny", args


def test_run_writes_all_outputs(tiny_run):
    summary, run_dir, _ = tiny_run
    gates = summary["gates"]
    assert len(gates) == 10  # 4 fixed modes + STATIC + 5 gates
    n_chunks = summary["data"]["eval_chunks"]
    rows = [json.loads(line) for line in (run_dir / "chunks.jsonl").read_text().splitlines()]
    assert len(rows) == 10 * n_chunks
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["base_reason"].endswith("(local folder)") and saved["ttt_layer"] == "official-linear"
    assert (run_dir / "results.md").exists() and (run_dir / "ckpt.pt").exists()
    md = (run_dir / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| fixed:UPDATE_1 |"))
    assert row.count("[") >= 3  # loss, gain vs SKIP, gain vs STATIC with intervals
    assert "fixed:STATIC" in gates and gates["fixed:STATIC"]["update_rate"] == 0.0
    # the causal recon gate runs STATIC on the chunks it does not update and pays for the layer pass its
    # signal needs there: costlier than fixed:STATIC on the same chunk
    static = {(r["doc_id"], r["chunk_idx"]): r["flops"] for r in rows if r["gate"] == "fixed:STATIC"}
    recon_static = [r for r in rows if r["gate"] == "recon" and r["action"] == "STATIC"]
    assert recon_static and {r["action"] for r in rows if r["gate"] == "recon"} <= {"STATIC", "UPDATE_1"}
    assert all(r["flops"] > static[(r["doc_id"], r["chunk_idx"])] for r in recon_static)
    # summary numbers are the token-weighted means of the per-chunk records
    skip_rows = [r for r in rows if r["action"] == "SKIP" and r["gate"] == rows[0]["gate"]]
    mean = sum(r["loss"] * r["n_tokens"] for r in skip_rows) / sum(r["n_tokens"] for r in skip_rows)
    assert gates[rows[0]["gate"]]["loss"] == pytest.approx(mean)
    flags = {k: (v["lookahead"], v["uses_labels"]) for k, v in gates.items()}
    assert flags["recon-lookahead"] == (True, False) and flags["oracle"] == (False, True)
    assert flags["recon"] == (False, False)
    # the oracle is never worse than the fixed modes it chooses among (STATIC and UPDATE_k; SKIP is a
    # baseline) on every document's first chunk, where all of them start from the same fresh state (later
    # chunks follow the oracle's own greedy trajectory, which need not beat a fixed mode's on a random model)
    first = {(r["gate"], r["doc_id"]): r["loss"] for r in rows if r["chunk_idx"] == 0}
    for (g, doc), loss in first.items():
        if g.startswith("fixed:") and g != "fixed:SKIP":
            assert first[("oracle", doc)] <= loss + 1e-9


def test_rerun_reuses_checkpoint_and_cache(tiny_run, capsys):
    summary, run_dir, args = tiny_run
    again = run_experiment(dict(args))
    printed = capsys.readouterr().out
    assert "[cache] train: reused" in printed and "reusing" in printed
    for mode in ("fixed:SKIP", "fixed:UPDATE_1"):
        key = mode if mode in again["gates"] else mode.split(":")[1]
        assert again["gates"][key]["loss"] == pytest.approx(summary["gates"][key]["loss"], abs=1e-9)


def test_run_folder_with_other_options_is_never_overwritten(tiny_run):
    _, run_dir, args = tiny_run
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for change in (dict(seed=1), dict(lr=2e-3), dict(compare_gates="")):
        with pytest.raises(ValueError, match="holds a run with other options") as err:
            run_experiment(dict(args, **change))
        assert next(iter(change)) in str(err.value)
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before  # nothing deleted or rewritten


def test_default_run_names_differ_by_every_numeric_option():
    from ponder.runner import identity_hash, run_identity

    base = identity_hash(run_identity(default_args()))
    for change in (dict(seed=1), dict(lr=2e-3), dict(dataset="x.jsonl"), dict(max_train_docs=9),
                   dict(aux_recon_weight=0.1), dict(target_rate=0.3)):
        assert identity_hash(run_identity(default_args(**change))) != base, change
    for same in (dict(out="elsewhere"), dict(threads=1), dict(no_progress=True), dict(overwrite=True)):
        assert identity_hash(run_identity(default_args(**same))) == base, same


def test_overwrite_deletes_and_retrains(tmp_path, tiny_run):
    _, run_dir, args = tiny_run
    out = tmp_path / "res"
    shutil.copytree(run_dir, out / "tiny")
    summary = run_experiment(dict(args, out=str(out), seed=1, compare_gates="", overwrite=True))
    assert summary["train_config"]["seed"] == 1
    assert json.loads((out / "tiny" / "run.json").read_text())["options"]["seed"] == 1


def test_damaged_checkpoint_is_refused_and_damaged_cache_rebuilt(tmp_path, tiny_run, capsys):
    _, run_dir, args = tiny_run
    out = tmp_path / "res"
    shutil.copytree(run_dir, out / "tiny")
    shutil.copytree(Path(args["cache_dir"]), tmp_path / "cache")
    run_args = dict(args, out=str(out), cache_dir=str(tmp_path / "cache"))  # same identity: out/cache are not in it
    ck = out / "tiny" / "ckpt.pt"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    ck.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="ckpt.pt is damaged"):
        run_experiment(run_args)
    assert ck.read_bytes() == bytes(data)  # refused, not deleted
    # damaged cache entries: truncated; a leftover temporary file from a killed writer
    entries = sorted((tmp_path / "cache" / "ponder").glob("*.pt"))
    assert entries
    for e in entries:
        e.write_bytes(e.read_bytes()[:100])
    (tmp_path / "cache" / "ponder" / ".x.pt.999999999.tmp").write_bytes(b"half")
    capsys.readouterr()
    run_experiment(dict(run_args, overwrite=True))
    printed = capsys.readouterr().out
    assert "rebuilding it" in printed and "leftover temporary file" in printed
    assert not list((tmp_path / "cache" / "ponder").glob(".*.tmp"))


def test_bad_specs_and_files_fail_before_anything_expensive(tmp_path):
    cache = tmp_path / "cache"
    for kw, msg in ((dict(compare_gates="recon,nope"), "unknown gate spec 'nope'"),
                    (dict(mode="ADAPTIVE", gate=["recon:UPDATE_9"]), "UPDATE_9"),
                    (dict(dataset="./missing.jsonl"), "--dataset ./missing.jsonl"),
                    (dict(base="./no-such-model"), "--base ./no-such-model"),
                    (dict(lr=-1.0), "--lr -1.0"), (dict(mini_batch_size=0), "--mini-batch-size 0")):
        with pytest.raises((ValueError, FileNotFoundError), match=msg.replace(".", r"\.")):
            run_experiment(dict(kw, cache_dir=str(cache), out=str(tmp_path / "out")))
    assert not cache.exists() and not (tmp_path / "out").exists()  # nothing loaded, cached or written


def test_bad_arguments():
    with pytest.raises(ValueError, match="--gate is for --mode ADAPTIVE"):
        run_experiment(dict(mode="UPDATE_1", gate=["recon"]))
    with pytest.raises(ValueError, match="--target-rate 1.5"):
        run_experiment(dict(target_rate=1.5))
    with pytest.raises(ValueError, match="unknown experiment option 'stepz'"):
        default_args(stepz=3)


def test_cli_help():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_ponder.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--ttt-layer" in res.stdout and "ADAPTIVE" in res.stdout


def test_content_split_keeps_near_duplicates_on_the_train_side():
    from ponder.runner import content_split

    codec = "\n".join(f"    0x{i:04x}: 0x{(i * 7) % 65536:04x},  # LATIN LETTER {i}" for i in range(60))
    train = ["def helper_function_one(argument):\n    return argument * 2\n" * 3, "# cp437 codec\n" + codec]
    near = "# cp865 codec\n" + codec.replace("LETTER 59", "LETTER FIFTY-NINE")  # 59 of 60 lines shared
    exact = train[0]
    fresh = "class Unrelated:\n    def method_with_a_long_name(self):\n        return 'something else'\n"
    kept, dropped = content_split(train, [near, exact, fresh])
    assert kept == [fresh] and dropped == 2


def test_paper_protocol_gets_its_own_labelled_table(tiny_run, tmp_path):
    _, _, args = tiny_run
    summary = run_experiment(dict(args, out=str(tmp_path), protocol="paper", compare_gates="random"))
    assert summary["protocol"] == "paper" and "ttt_loss_weight" in summary
    paper = {k for k in summary["gates"] if k.startswith("paper:")}
    assert {"paper:fixed:SKIP", "paper:fixed:UPDATE_1", "paper:recon-lookahead", "paper:budgeted-oracle"} <= paper
    md = (tmp_path / "tiny" / "results.md").read_text()
    assert "READS THE SCORED TOKENS" in md
    section = md[md.index("## Paper protocol"):]
    section = section[:section.find("\n## ", 1)]  # up to the next section (e.g. the picks table)
    assert "| paper:fixed:UPDATE_1 (lookahead) |" in section and "| fixed:UPDATE_1" not in section
    # the default protocol evaluates nothing of the kind
    assert not any(k.startswith("paper:") for k in tiny_run[0]["gates"])


def test_presets_resolve_and_explicit_options_win():
    from ponder.runner import PRESETS, add_arguments, identity_hash, resolve_preset, run_identity

    for name, values in PRESETS.items():
        args = default_args(preset=name)
        assert {k: getattr(args, k) for k in values} == values
    parser = add_arguments(__import__("argparse").ArgumentParser())
    args = resolve_preset(parser.parse_args(["--preset", "full", "--lr", "3e-3", "--steps", "5"]))
    assert (args.lr, args.steps, args.chunk_size) == (3e-3, 5, PRESETS["full"]["chunk_size"])
    assert resolve_preset(parser.parse_args([])).steps == PRESETS["default"]["steps"]  # no flag: the default preset
    # the preset is a name for its values: the same values give the same run, other values another
    full = default_args(preset="full")
    spelled = default_args(**PRESETS["full"])
    assert identity_hash(run_identity(full)) == identity_hash(run_identity(spelled))
    assert identity_hash(run_identity(full)) != identity_hash(run_identity(default_args()))
    with pytest.raises(ValueError, match="--preset 'huge'"):
        default_args(preset="huge")
    with pytest.raises(ValueError, match="--eval-every 3 needs validation documents"):
        run_experiment(dict(max_val_docs=0, eval_every=3))


def test_validation_is_carved_from_training_files_only():
    from ponder.runner import _line_set, validation_pool
    from ttt_common.data import load_texts

    train_texts, test_texts = load_texts(None, split="train"), load_texts(None, split="eval")
    train, val = validation_pool(train_texts)
    assert len(val) >= 20 and len(train) + len(val) <= len(train_texts)
    assert set(val) <= set(train_texts) and not set(val) & set(train)
    assert not set(val) & set(test_texts)  # never a test-split file
    train_lines = set().union(*(_line_set(t) for t in train))
    for t in val:  # near-duplicates of training files stay out of validation
        lines = _line_set(t)
        assert not lines or len(lines & train_lines) / len(lines) <= 0.5
    assert validation_pool(list(reversed(train_texts)))[1] == [t for t in reversed(train_texts) if t in set(val)]


def test_run_selects_on_validation_and_writes_curves(tiny_run):
    summary, run_dir, _ = tiny_run
    tr = summary["training"]
    assert summary["data"]["val_docs"] >= 1 and tr["curve"]
    assert tr["best_val_loss"] == min(r["val_loss"] for r in tr["curve"])
    assert tr["selected_step"] in [r["step"] for r in tr["curve"]]
    lines = (run_dir / "curves.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == tr["curve"]
    assert (run_dir / "curves.png").exists()
    assert {"data_s", "train_s", "eval_s", "eval_cpu_s"} <= set(summary["timing"])


def test_trained_layer_is_reevaluated_with_other_gate_options_without_retraining(tiny_run, tmp_path, capsys):
    summary, run_dir, args = tiny_run
    capsys.readouterr()
    again = run_experiment(dict(args, out=str(tmp_path), run_name="re", compare_gates="random", init_from=str(run_dir)))
    printed = capsys.readouterr().out
    assert "--init-from: copied" in printed and "reusing" in printed
    assert (tmp_path / "re" / "ckpt.pt").read_bytes() == (run_dir / "ckpt.pt").read_bytes()  # not trained further
    assert again["training"]["steps"] == summary["training"]["steps"]
    assert again["training"]["selected_step"] == summary["training"]["selected_step"]
    for mode in ("fixed:UPDATE_1", "fixed:STATIC"):
        assert again["gates"][mode]["loss"] == pytest.approx(summary["gates"][mode]["loss"], abs=1e-9)
    # a checkpoint trained with other options is refused, not silently used
    with pytest.raises(ValueError, match="another configuration"):
        run_experiment(dict(args, out=str(tmp_path), run_name="re2", lr=5e-3, init_from=str(run_dir)))
