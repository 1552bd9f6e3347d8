"""The trainer (ttt_common/trainer.py, run as scripts/train.py) end to end on the CPU with a tiny LaCT (r=2 stacked fast-weight MLPs, manual backprop).

* 2 gloo ranks under torchrun (FSDP2) == 1 process (1-rank FSDP2, and no FSDP) on the same global
  batch, loss and grad norm;
* kill -9 (or SIGTERM, which saves at exit) mid-training, then --resume: the JSONL equals the
  uninterrupted run's, bit for bit;
* a crash mid-save (a `.tmp` folder) is ignored; truncated / foreign checkpoints and bad configs or
  data are refused with exit code 2 and a message naming the problem;
* a non-finite step is skipped (weights and optimizer state equal those of the run that stopped
  before it) and counted; the manual-backprop autograd.Function really runs under FSDP2 + AC.

Runs in this process where possible (imports are the expensive part of a run on a loaded 2-core
machine); the torchrun run and the run that gets killed are subprocesses. Reference and compared
runs use one intra-op thread each, so equal code gives equal bits.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_common.metrics import read_jsonl
from ttt_common.packing import PackedLoader
from ttt_common.train_utils import lr_at

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "scripts" / "train.py"
LACT_CFG = ROOT / "configs" / "train_debug_lact.json"
# tiny LaCT (hidden 64, 2 layers, r=2, manual backprop, chunk 16), 64-token sequences of 20 stdlib files
BASE = ["--model", "lact", "--config", str(LACT_CFG), "--seq-len", "64", "--max-docs", "20", "--lr", "3e-3",
        "--warmup-steps", "2", "--min-lr-ratio", "0.1", "--no-progress", "--log-every", "100"]


@pytest.fixture(scope="module")
def train_mod():
    from ttt_common import trainer

    return trainer




def _main(train_mod, args: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_mod.main(args)


def _records(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


# ------------------------------------------------------------------------------------------ pure parts
def test_lr_schedule_warmup_cosine_floor():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    got = [lr_at(s, **kw) for s in range(14)]
    assert got[:4] == [0.25, 0.5, 0.75, 1.0]
    # cosine from 1 at step 4 to 0.1 at step 12, midpoint at step 8
    assert got[8] == pytest.approx(0.1 + 0.9 * 0.5)
    assert got[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert got[12] == got[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(got[3:], got[4:]))


def test_loader_ranks_partition_the_one_process_batch_and_resume():
    data = np.arange(40 * 3, dtype=np.int32).reshape(40, 3)
    one = PackedLoader(data, batch_size=4, rank=0, world_size=1, seed=7)
    ranks = [PackedLoader(data, batch_size=2, rank=r, world_size=2, seed=7) for r in range(2)]
    for _ in range(23):  # crosses two epoch boundaries (40 // 4 = 10 global batches per epoch)
        full = one.next_batch()
        assert torch.equal(full, torch.cat([ld.next_batch() for ld in ranks]))
    assert one.epoch == 2
    state = one.state_dict()
    expected = [one.next_batch() for _ in range(5)]
    again = PackedLoader(data, batch_size=4, seed=7)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch()) for a in expected)
    with pytest.raises(ValueError, match="seq_len=3 but the current data have seq_len=5"):
        PackedLoader(np.zeros((40, 5), np.int32), batch_size=4).load_state_dict(state)


# ------------------------------------------------------------------------------------------ runs
@pytest.mark.slow  # ~15 s on two idle cores (torchrun start-up), up to ~55 s on a loaded machine
def test_two_rank_fsdp_matches_one_process(train_mod, env, tmp_path):
    """Global batch 2 x accum 2: torchrun 2 ranks x batch 1 vs one process x batch 2."""
    common = BASE + ["--steps", "3", "--grad-accum", "2"]
    proc = subprocess.run(_torchrun(2) + [str(TRAIN), *common, "--batch-size", "1", "--out", str(tmp_path / "two")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    assert _main(train_mod, common + ["--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    # and the same process without FSDP at all (plain module): the wrapper must not change the numbers
    assert _main(train_mod, common + ["--batch-size", "2", "--no-fsdp", "--out", str(tmp_path / "plain")]) == 0
    two, one, plain = (_records(tmp_path / n) for n in ("two", "one", "plain"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [r["step"] for r in plain] == [1, 2, 3]
    for a, b in [*zip(two, one), *zip(plain, one)]:
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(b["grad_norm"]), (a, b)
        assert a["lr"] == b["lr"] and a["tokens_seen"] == b["tokens_seen"] == a["step"] * 4 * 64
    assert one[-1]["loss"] < one[0]["loss"]  # it trains
    assert (tmp_path / "one" / "loss.png").stat().st_size > 1000


RESUME_ARGS = BASE + ["--steps", "8", "--batch-size", "2", "--checkpoint-interval", "2"]


@pytest.fixture(scope="module")
def reference_run(train_mod, tmp_path_factory):
    """The uninterrupted 8-step run the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TTT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ttt_cache"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert _main(train_mod, RESUME_ARGS + ["--out", str(out)]) == 0
        finally:
            torch.set_num_threads(threads)
    return _records(out)


def _start_and_interrupt(out: Path, env: dict, sig: int) -> subprocess.Popen:
    """Run RESUME_ARGS in a subprocess; send `sig` once a checkpoint exists and step >= 3 is logged."""
    proc = subprocess.Popen([sys.executable, str(TRAIN), *RESUME_ARGS, "--out", str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            recs = _records(out) if (out / "metrics.jsonl").exists() else []
            if (out / "checkpoints" / "latest").exists() and recs and recs[-1]["step"] >= 3:
                break
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc


@pytest.mark.slow  # ~15 s on two idle cores, up to ~55 s on a loaded machine
def test_kill9_then_resume_reproduces_uninterrupted_losses(train_mod, env, tmp_path, reference_run):
    out = tmp_path / "killed"
    proc = _start_and_interrupt(out, env, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr_text[-2000:]}"
    assert _records(out)[-1]["step"] < 8

    assert _main(train_mod, RESUME_ARGS + ["--out", str(out), "--resume"]) == 0
    resumed = _records(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))  # steps after the checkpoint were re-run, not duplicated
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference_run]  # exact
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference_run]


@pytest.mark.slow  # ~10 s each on two idle cores, up to ~40 s on a loaded machine
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_saves_a_checkpoint_exits_75_then_resume_continues(train_mod, env, tmp_path, reference_run, sig):
    from ttt_common.cli import EXIT_PREEMPTED

    out = tmp_path / "terminated"
    proc = _start_and_interrupt(out, env, sig)
    assert proc.returncode == EXIT_PREEMPTED == 75, proc.stderr_text[-2000:]
    stopped = _records(out)[-1]["step"]
    assert stopped < 8 and f"stopped by signal at step {stopped}" in proc.stdout_text
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:08d}"  # saved at exit
    assert _main(train_mod, RESUME_ARGS + ["--out", str(out), "--resume"]) == 0
    assert [r["loss"] for r in _records(out)] == [r["loss"] for r in reference_run]


def test_mid_save_crash_is_ignored_and_bad_checkpoints_refused(train_mod, env, tmp_path, capsys):
    out = tmp_path / "run"
    args = BASE + ["--batch-size", "1", "--checkpoint-interval", "1", "--out", str(out)]
    assert _main(train_mod, args + ["--steps", "2"]) == 0
    ck = out / "checkpoints"
    # crash while saving step 3: its tmp folder holds a truncated shard and no meta.json
    shutil.copytree(ck / "step-00000002", ck / "step-00000003.tmp")
    (ck / "step-00000003.tmp" / "meta.json").unlink()
    shard = next((ck / "step-00000003.tmp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert _main(train_mod, args + ["--steps", "3", "--resume"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    assert not (ck / "step-00000003.tmp").exists() and (ck / "latest").read_text().strip() == "step-00000003"
    assert [r["step"] for r in _records(out)] == [1, 2, 3]

    # a checkpoint of another model size
    assert _main(train_mod, args + ["--steps", "4", "--resume", "--set", "hidden_size=128"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another model" in err and "hidden_size: checkpoint 64 vs current 128" in err

    # a truncated shard in the latest checkpoint
    shard = next((ck / "step-00000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    assert _main(train_mod, args + ["--steps", "4", "--resume"]) == 2
    assert f"corrupted: file {shard.name}" in capsys.readouterr().err

    # an existing checkpoint without --resume is not silently overwritten
    assert _main(train_mod, args + ["--steps", "4"]) == 2
    assert "already holds a checkpoint (step 3); pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--config", "does/not/exist.json"], "--config does/not/exist.json: no such file"),
    (["--set", "num_attn_heads=3"], "hidden_size=64 must be divisible by num_attn_heads=3"),
    (["--set", "model_type=\"llama\""], "model_type='llama' but --model lact expects 'lact_swiglu'"),
    (["--set", "vocab_size=1000"], "vocab_size=1000 does not cover the tokenizer's 50257 tokens"),
    (["--dataset", "missing_dir/data.jsonl"], "--dataset missing_dir/data.jsonl: no such file"),
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--set", "hidden_sise=128"], "unknown LaCTSWIGLUConfig key 'hidden_sise'; did you mean 'hidden_size'?"),
    (["--threads", "0"], "--threads=0 must be >= 1"),
    (["--max-docs", "1", "--seq-len", "1000000"], "fewer than one sequence of seq_len=1000000"),
], ids=["missing-config", "invalid-config", "wrong-model-type", "vocab-too-small", "missing-data", "bad-steps",
        "unknown-set-key", "bad-threads", "too-little-data"])
def test_bad_inputs_exit_2_with_a_clear_message(train_mod, env, tmp_path, capsys, extra, message):
    argv = BASE + ["--steps", "1", "--out", str(tmp_path / "x")] + extra
    assert _main(train_mod, argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_key_in_a_json_config_is_refused(train_mod, env, tmp_path, capsys):
    cfg = json.loads(LACT_CFG.read_text())
    cfg["num_attn_head"] = 4  # typo of num_attn_heads: once silently ignored
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(cfg))
    argv = BASE + ["--steps", "1", "--out", str(tmp_path / "x")]
    assert _main(train_mod, [*argv, "--config", str(path)]) == 2
    assert "unknown LaCTSWIGLUConfig key 'num_attn_head'; did you mean 'num_attn_heads'?" in capsys.readouterr().err


def test_resume_on_other_data_of_the_same_size_is_refused(train_mod, env, tmp_path, capsys):
    """Two corpora with the same token count (one digit differs per document): count and length match,
    the content hash does not."""
    docs = [f"def f{i}(x):\n    return x + {i % 10}\n" * 30 for i in range(6)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    b.write_text("".join(json.dumps({"text": d.replace("x + 3", "x + 4")}) + "\n" for d in docs))
    argv = BASE + ["--batch-size", "1", "--out", str(tmp_path / "run")]
    assert _main(train_mod, argv + ["--steps", "1", "--dataset", str(a)]) == 0
    assert _main(train_mod, argv + ["--steps", "2", "--dataset", str(b), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the training data differ from the checkpoint's" in err and "sha256" in err and "source" in err
    assert _main(train_mod, argv + ["--steps", "2", "--dataset", str(a), "--resume"]) == 0


def test_time_based_checkpoints(train_mod, env, tmp_path):
    """--checkpoint-minutes (default 30) saves once that much time passed since the last save."""
    out = tmp_path / "timed"
    argv = BASE + ["--batch-size", "1", "--steps", "3", "--checkpoint-minutes", "1e-9", "--keep-checkpoints", "5",
                   "--out", str(out)]
    assert _main(train_mod, argv) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [f"step-0000000{i}" for i in (1, 2, 3)]
    assert train_mod.build_parser().parse_args(["--config", "x"]).checkpoint_minutes == 30.0


def test_job_file_sets_options_cli_overrides_and_typos_are_refused(train_mod, env, tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('[model]\nmodel = "lact"\nconfig = "train_debug_lact"\n[data]\nseq_len = 64\nmax_docs = 20\n'
                   '[optimisation]\nbatch_size = 1\nsteps = 5\nlr = 3e-3\n[checkpoint]\nno_progress = true\n'
                   f'out = "{(tmp_path / "run").as_posix()}"\n')
    args = train_mod.parse_args(["--job", str(job), "--steps", "2"])
    assert (args.config, args.seq_len, args.batch_size, args.lr, args.steps) == ("train_debug_lact", 64, 1, 3e-3, 2)
    assert _main(train_mod, ["--job", str(job), "--steps", "2"]) == 0
    assert [r["step"] for r in _records(tmp_path / "run")] == [1, 2]
    # the bundled 8-GPU recipe parses and names its model config
    recipe = train_mod.parse_args(["--job", "tttdr_2-layer-mlp_8gpu"])
    assert (recipe.seq_len, recipe.grad_accum, recipe.steps, recipe.precision) == (32768, 4, 40960, "bf16")
    assert train_mod.load_model_config(recipe)[1].r == 2
    job.write_text(job.read_text().replace("seq_len", "seq_lne"))
    assert _main(train_mod, ["--job", str(job)]) == 2
    assert "unknown option 'seq_lne'; did you mean 'seq_len'?" in capsys.readouterr().err


def test_official_preset_names_build_the_official_sizes(train_mod):
    args = train_mod.build_parser().parse_args(["--model", "ttt", "--config", "125m-TTT"])
    _, config = train_mod.load_model_config(args)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
    assert config.seq_modeling_block == "ttt_linear"


def test_wrong_text_field_of_local_jsonl(train_mod, env, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"content": f"def f{i}(x):\n    return x + {i}\n" * 20}) + "\n" for i in range(8)))
    argv = BASE + ["--steps", "1", "--batch-size", "1", "--dataset", str(data), "--out", str(tmp_path / "x")]
    assert _main(train_mod, argv) == 2
    assert "--text-field 'text' is not a column" in capsys.readouterr().err
    assert _main(train_mod, argv + ["--text-field", "content"]) == 0


def test_nonfinite_step_is_skipped_and_counted(train_mod, env, tmp_path):
    """Constant lr: skipping step 2 must leave exactly the weights and Adam state of the 1-step run."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    args = BASE + ["--batch-size", "1", "--warmup-steps", "0", "--min-lr-ratio", "1.0"]
    assert _main(train_mod, args + ["--steps", "2", "--inject-nonfinite", "2", "--out", str(tmp_path / "x")]) == 0
    assert _main(train_mod, args + ["--steps", "1", "--out", str(tmp_path / "y")]) == 0
    recs = _records(tmp_path / "x")
    assert [r["skipped"] for r in recs] == [False, True] and recs[-1]["skipped_steps"] == 1
    assert math.isnan(recs[-1]["loss"])
    states = {}
    for name, step in (("x", 2), ("y", 1)):
        dcp_to_torch_save(tmp_path / name / "checkpoints" / f"step-{step:08d}", tmp_path / f"{name}.pt")
        states[name] = torch.load(tmp_path / f"{name}.pt", weights_only=False)
    model_x, model_y = states["x"]["model"], states["y"]["model"]
    assert model_x.keys() == model_y.keys() and len(model_x) > 10
    for key in model_x:
        assert torch.equal(model_x[key], model_y[key]), key
    optim_x, optim_y = states["x"]["optim"]["state"], states["y"]["optim"]["state"]
    for key in optim_x:
        for name, value in optim_x[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim_y[key][name])), (key, name)


def test_nonfinite_steps_in_a_row_stop_the_run(train_mod, env, tmp_path, capsys):
    """Skipping is for a rare bad step: N non-finite steps in a row stop the run with exit 1 and a message."""
    args = BASE + ["--batch-size", "1", "--steps", "4", "--inject-nonfinite", "2,3", "--max-nonfinite-in-a-row", "2",
                   "--out", str(tmp_path / "x")]
    assert _main(train_mod, args) == 1
    err = capsys.readouterr().err
    assert "step 3" in err and "non-finite for 2 steps in a row" in err and "Traceback" not in err
    assert [r["skipped"] for r in _records(tmp_path / "x")] == [False, True]  # step 3 raised before logging


def test_manual_backprop_runs_under_fsdp_and_activation_checkpointing(train_mod, env, tmp_path, monkeypatch):
    from lact.ops.manual_backprop import LaCTSwiGLUFunction

    calls = {"n": 0}
    original = LaCTSwiGLUFunction.backward

    def counting(ctx, *grads):
        calls["n"] += 1
        return original(ctx, *grads)

    monkeypatch.setattr(LaCTSwiGLUFunction, "backward", staticmethod(counting))
    argv = BASE + ["--steps", "1", "--batch-size", "1", "--activation-checkpointing", "--out", str(tmp_path / "ac")]
    assert _main(train_mod, argv) == 0
    assert calls["n"] == 2  # one per LaCT layer
    assert math.isfinite(_records(tmp_path / "ac")[0]["loss"])


def test_bf16_mixed_precision_path_on_a_llama_baseline(train_mod, env, tmp_path):
    """FSDP2 MixedPrecisionPolicy(bf16 params, fp32 reduce) vs fp32: same first loss to bf16 accuracy.

    The generic path is checked on transformers' Llama (`--model llama`); the TTT models' own bf16
    support is their packages' business.
    """
    cfg = tmp_path / "llama.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                               "vocab_size": 50257, "max_position_embeddings": 128, "bos_token_id": 50256,
                               "eos_token_id": 50256}))
    args = ["--model", "llama", "--config", str(cfg), "--seq-len", "64", "--max-docs", "20", "--steps", "2",
            "--batch-size", "2", "--no-progress"]
    assert _main(train_mod, args + ["--bf16", "--out", str(tmp_path / "bf16")]) == 0
    assert _main(train_mod, args + ["--fp32", "--out", str(tmp_path / "fp32")]) == 0
    bf16, fp32 = _records(tmp_path / "bf16"), _records(tmp_path / "fp32")
    assert abs(bf16[0]["loss"] - fp32[0]["loss"]) < 2e-2 * fp32[0]["loss"]
    assert bf16[0]["loss"] != fp32[0]["loss"]  # bf16 compute really happened
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in bf16)


def test_activation_checkpointing_keeps_names_outputs_and_gradients():
    """The AC wrapper is invisible to checkpoints (same state-dict keys) and to the math (same grads)."""
    import copy

    from torch import nn

    from ttt_common.parallelize import apply_activation_checkpointing, find_blocks

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x, scale=1.0):
            return x + torch.tanh(self.fc(x)) * scale

    class Net(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(3))
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x, scale=0.5)  # keyword arguments must pass through the wrapper
            return self.head(x)

    torch.manual_seed(0)
    net = Net().double()
    ref = copy.deepcopy(net)
    assert apply_activation_checkpointing(net) == 3
    assert list(net.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 6, dtype=torch.float64)
    out, out_ref = net(x), ref(x)
    assert torch.equal(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-12, atol=0, msg=name)
    assert len(find_blocks(net)) == 3  # still found once wrapped (compile / FSDP come after AC)
    with pytest.raises(ValueError, match="declares no `_no_split_modules`"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_packed_cache_is_capped_lru_and_cleanable(tmp_path, monkeypatch):
    from ttt_common.packing import main as packing_main
    from ttt_common.packing import prune_cache

    folder = tmp_path / "packed"
    folder.mkdir()
    for i in range(4):
        f = folder / f"packed-{i}.npy"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))  # packed-0 used longest ago
    stale = folder / ".packed-9.npy.123.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    fresh = folder / ".packed-8.npy.456.tmp"  # a writer at work right now: left alone
    fresh.write_bytes(b"x")
    removed = prune_cache(folder, max_bytes=2500, keep=folder / "packed-0.npy")
    assert sorted(p.name for p in removed) == [".packed-9.npy.123.tmp", "packed-1.npy", "packed-2.npy"]
    assert sorted(p.name for p in folder.iterdir()) == [".packed-8.npy.456.tmp", "packed-0.npy", "packed-3.npy"]
    monkeypatch.setenv("TTT_CACHE_DIR", str(tmp_path))
    assert packing_main(["clean"]) == 0
    assert not list(folder.glob("packed-*.npy"))
