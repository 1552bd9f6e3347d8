"""The offline corpora and tokenizer: deterministic by-file split, datasets paths, clear errors."""

import json

import pytest

from ttt_common.data import load_texts, stdlib_files
from ttt_common.tokenizer import load_tokenizer


def test_stdlib_split_is_disjoint_deterministic_and_covers_all():
    train, eval_ = stdlib_files("train"), stdlib_files("eval")
    assert not set(train) & set(eval_)
    assert sorted(train + eval_) == stdlib_files(None)
    assert 0.05 < len(eval_) / (len(train) + len(eval_)) < 0.15
    assert stdlib_files("eval") == eval_


def test_load_texts_stdlib_max_docs():
    docs = load_texts(split="eval", max_docs=3)
    assert len(docs) == 3 and all(isinstance(d, str) and d.strip() for d in docs)


def test_load_texts_local_jsonl_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"content": f"doc {i}"}) for i in range(10)))
    train = load_texts(str(path), text_field="content", split="train")
    eval_ = load_texts(str(path), text_field="content", split="eval")
    assert train == [f"doc {i}" for i in range(9)] and eval_ == ["doc 9"]
    with pytest.raises(ValueError, match="text-field 'text'"):
        load_texts(str(path), text_field="text")
    with pytest.raises(FileNotFoundError, match="neither a local path"):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="split"):
        load_texts(split="test")


def test_offline_gpt2_tokenizer_matches_known_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("TTT_CACHE_DIR", str(tmp_path))
    tok = load_tokenizer()
    assert len(tok) == 50257
    # GPT-2 ids published with the model ("Hello world" is [15496, 995]; 50256 is <|endoftext|>)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
