"""Prepared (pre-tokenised, memory-mapped) corpora: `ttt_common.prepare_data` + `ttt_common.shards`.

* local files of the extensions the user names are all read (others reported, never silently skipped);
* the shards hold exactly the in-memory packing of the same documents (`tokenize_and_pack`), across
  shard boundaries;
* a corpus four times the anonymous-memory budget streams through the loader without being loaded
  (np.memmap, RssAnon growth bounded);
* 2 ranks see disjoint sequences whose union is the one-process epoch;
* kill -9 mid-run on a prepared corpus, then --resume: bit-identical losses and eval losses; another
  corpus on resume is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from ttt_common.metrics import read_jsonl
from ttt_common.packing import PackedLoader, tokenize_and_pack
from ttt_common.shards import ShardWriter, TokenShards

ROOT = Path(__file__).resolve().parents[2]




def _prepare(argv: list[str]) -> int:
    from ttt_common.prepare_data import main

    return main(argv)


def test_named_extensions_are_read_and_shards_equal_the_in_memory_packing(env, tmp_path, capsys):
    from ttt_common.tokenizer import load_tokenizer

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = {"a.rs": "fn main() {\n    println!(\"hi\");\n}\n" * 9, "sub/b.c": "int main(void) { return 0; }\n" * 11,
            "c.md": "# Title\n\nSome *markdown* text.\n" * 7, "skip.txt": "not named\n"}
    for name, text in docs.items():
        (src / name).write_text(text)
    assert _prepare(["--dataset", str(src), "--ext", ".rs,c,.md", "--shard-tokens", "37", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "1 files under" in out and "'.txt': 1" in out and "reading 3 files" in out
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert len(index["shards"]) > 3 and index["dtype"] == "uint16"  # 37-token shards: rows cross boundaries

    tok = load_tokenizer(None)
    texts = [docs[k] for k in sorted(["a.rs", "c.md", "sub/b.c"])]  # sorted by path, as read
    packed = tokenize_and_pack(texts, tok, 16)
    shards = TokenShards(tmp_path / "p", 16)
    assert shards.shape == packed.shape
    assert np.array_equal(shards[np.arange(len(shards))], packed)
    assert np.array_equal(shards[3:5], packed[3:5]) and np.array_equal(shards[-1], packed[-1])

    from ttt_common.cli import UsageError

    with pytest.raises(UsageError, match="is a folder: name the file extensions"):
        _prepare(["--dataset", str(src), "--out", str(tmp_path / "q")])
    with pytest.raises(UsageError, match=r"no files with extensions \['.go'\]"):
        _prepare(["--dataset", str(src), "--ext", "go", "--out", str(tmp_path / "q")])


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status RssAnon (not Linux)")


def test_corpus_larger_than_the_memory_budget_streams_through_memmap(tmp_path):
    """96 MiB of tokens against a 24 MiB budget of anonymous (process-owned) memory: a reader that loaded
    the corpus would exceed it; memory-mapped pages belong to the page cache, not to the process."""
    budget_kib = 24 * 1024
    writer = ShardWriter(tmp_path / "big", vocab_size=50257, shard_tokens=12 << 20, meta={"tokenizer": "t"})
    rng = np.random.default_rng(0)
    for _ in range(8):
        writer.write(rng.integers(0, 50257, size=6 << 20, dtype=np.uint16))
    writer.close()
    corpus_bytes = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.bin"))
    assert corpus_bytes == 96 << 20 and corpus_bytes >= 4 * budget_kib * 1024

    before = _rss_anon_kib()
    shards = TokenShards(tmp_path / "big", seq_len=4096)
    assert all(isinstance(m, np.memmap) for m in shards.shards) and len(shards.shards) == 4
    loader = PackedLoader(shards, batch_size=8, seed=1)
    total = 0
    checksum = 0
    for _ in range(len(shards) // 8):  # one whole epoch: every sequence is read once
        batch = loader.next_batch()
        total += batch.numel()
        checksum += int(batch[:, 0].sum())
    growth = _rss_anon_kib() - before
    assert total == (len(shards) // 8) * 8 * 4096 > 0.99 * (48 << 20)
    assert growth < budget_kib, f"anonymous memory grew by {growth} KiB while streaming"
    assert checksum > 0


def test_two_ranks_see_disjoint_sequences_covering_the_one_process_epoch(tmp_path):
    writer = ShardWriter(tmp_path / "c", vocab_size=1 << 20, shard_tokens=1000, meta={})
    writer.write(np.arange(10_000))  # every token distinct, uint32 shards
    writer.close()
    shards = TokenShards(tmp_path / "c", seq_len=50)  # 200 sequences, 5 shards
    one = PackedLoader(shards, batch_size=4, seed=3)
    ranks = [PackedLoader(shards, batch_size=2, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = [set(), set()]
    for _ in range(len(shards) // 4):
        parts = [ld.next_batch() for ld in ranks]
        for r, part in enumerate(parts):
            seen[r].update(int(x) for x in part[:, 0])
        assert np.array_equal(one.next_batch().numpy(), np.concatenate([p.numpy() for p in parts]))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {i * 50 for i in range(200)}


RUN = ["--model", "lact", "--config", str(ROOT / "configs" / "train_debug_lact.json"), "--seq-len", "64",
       "--batch-size", "2", "--steps", "8", "--lr", "3e-3", "--warmup-steps", "2", "--checkpoint-interval", "2",
       "--eval-every", "4", "--eval-batches", "2", "--no-progress", "--log-every", "100"]


@pytest.mark.slow  # ~20 s on two idle cores, up to ~60 s loaded
def test_kill9_then_resume_on_a_prepared_corpus_is_bit_exact_and_other_data_refused(env, tmp_path, capsys):
    from ttt_common import trainer

    train, held = tmp_path / "train", tmp_path / "eval"
    assert _prepare(["--dataset", "stdlib", "--max-docs", "12", "--shard-tokens", "5000", "--out", str(train)]) == 0
    assert _prepare(["--dataset", "stdlib", "--split", "eval", "--max-docs", "3", "--out", str(held)]) == 0
    argv = RUN + ["--dataset", str(train), "--eval-data", str(held)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert trainer.main(argv + ["--out", str(tmp_path / "ref")]) == 0
    ref = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in ref if "eval_loss" in r] == [4, 8]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *argv, "--out", str(out)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            recs = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
            if (out / "checkpoints" / "latest").exists() and recs and recs[-1]["step"] >= 3:
                break
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]

    other = tmp_path / "other"
    assert _prepare(["--dataset", "stdlib", "--max-docs", "13", "--out", str(other)]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert trainer.main(RUN + ["--dataset", str(other), "--eval-data", str(held), "--out", str(out),
                                   "--resume"]) == 2
        assert "the training data differ from the checkpoint's" in capsys.readouterr().err
        assert trainer.main(argv + ["--out", str(out), "--resume"]) == 0
    got = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r.get("eval_loss") for r in got] == [r.get("eval_loss") for r in ref]


def test_prepare_data_cli_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.rs").write_text("fn main() {}\n")
    proc = subprocess.run([sys.executable, "-m", "ttt_common.prepare_data", "--dataset", str(tmp_path / "src"),
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "name the file extensions to read with --ext" in proc.stderr
    assert not (tmp_path / "o").exists()
