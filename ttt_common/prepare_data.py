"""Tokenise a corpus once into memory-mapped token shards (`ttt_common/shards.py`) for streamed training.

    # a Hugging Face dataset: id, config name, split (streamed: never downloaded whole into memory)
    python -m ttt_common.prepare_data --dataset HuggingFaceFW/fineweb-edu --name sample-10BT \
        --split train --tokenizer fla-hub/transformer-1.3B-100B --out data/fineweb
    # local files of any text extension you name (a folder is searched recursively)
    python -m ttt_common.prepare_data --dataset ~/src/rust-project --ext .rs,.md --out data/rust
    # the Python standard library (the default offline corpus), eval split
    python -m ttt_common.prepare_data --dataset stdlib --split eval --out data/stdlib-eval

then `scripts/train.py --dataset data/fineweb --eval-data data/stdlib-eval ...`. Files under a folder
whose extension is not named are counted and reported, never skipped silently. jsonl/json/parquet/csv/
arrow files go through `datasets` and read `--text-field`; every other named extension is read as one
UTF-8 document per file (undecodable bytes replaced).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from ttt_common.cli import UsageError, run_cli
from ttt_common.shards import ShardWriter

_TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _extensions(spec: str) -> set[str]:
    exts = {("." + e.strip().lstrip(".")).lower() for e in spec.split(",") if e.strip()}
    if not exts:
        raise UsageError(f"--ext {spec!r} names no extension (e.g. --ext .rs,.c,.md)")
    return exts


def local_documents(root: Path, exts: set[str], text_field: str, report=print) -> Iterator[str]:
    """Documents of the files under `root` (or `root` itself) whose extension is in `exts`, sorted by path."""
    if root.is_file():
        files, skipped = [root], collections.Counter()
    else:
        files, skipped = [], collections.Counter()
        for p in sorted(root.rglob("*")):
            if not p.is_file():
                continue
            if p.suffix.lower() in exts:
                files.append(p)
            else:
                skipped[p.suffix or "(none)"] += 1
    if skipped:
        report(f"note: {sum(skipped.values())} files under {root} have extensions not named by --ext and are not "
               f"used: {dict(skipped.most_common(8))}")
    if not files:
        raise UsageError(f"--dataset {root}: no files with extensions {sorted(exts)} (found {dict(skipped)}); "
                         "name the extensions to read with --ext")
    report(f"reading {len(files)} files")
    for f in files:
        builder = _TABLE_BUILDERS.get(f.suffix.lower())
        if builder is None:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
            continue
        import datasets

        ds = datasets.load_dataset(builder, data_files=[str(f)], split="train")
        if text_field not in ds.column_names:
            raise UsageError(f"--text-field {text_field!r} is not a column of {f}; columns: {ds.column_names}")
        for t in ds[text_field]:
            if isinstance(t, str) and t.strip():
                yield t


def hub_documents(dataset: str, name: str | None, split: str, text_field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset, name, split=split, streaming=True)
    except Exception as err:  # network errors, unknown ids or configs: say what was tried
        raise UsageError(f"--dataset {dataset!r} (--name {name!r}, --split {split!r}) could not be opened "
                         f"({type(err).__name__}: {err})") from err
    for row in ds:
        if text_field not in row:
            raise UsageError(f"--text-field {text_field!r} is not a column of {dataset}; columns: {sorted(row)}")
        t = row[text_field]
        if isinstance(t, str) and t.strip():
            yield t


def documents(args) -> tuple[Iterator[str], dict]:
    """The documents named by the arguments and a description of the source (stored in index.json)."""
    if args.dataset == "stdlib":
        from ttt_common.data import load_texts

        if args.split not in ("train", "eval"):
            raise UsageError(f"--split {args.split!r}: the stdlib corpus has 'train' and 'eval'")
        return iter(load_texts(None, split=args.split)), {"kind": "stdlib", "split": args.split}
    path = Path(args.dataset).expanduser()
    if path.exists():
        if args.ext is None and path.is_dir():
            raise UsageError(f"--dataset {path} is a folder: name the file extensions to read with --ext "
                             "(e.g. --ext .py,.rs,.md or --ext .jsonl)")
        exts = _extensions(args.ext) if args.ext else {path.suffix.lower()}
        return local_documents(path, exts, args.text_field), {"kind": "local", "path": path.name,
                                                              "ext": sorted(exts)}
    if args.dataset.startswith((".", "/", "~")):
        raise UsageError(f"--dataset {args.dataset}: no such file or directory")
    return (hub_documents(args.dataset, args.name, args.split, args.text_field),
            {"kind": "hub", "id": args.dataset, "name": args.name, "split": args.split})


def prepare(args) -> Path:
    from ttt_common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError(f"--tokenizer {args.tokenizer}: no eos_token_id to separate documents")
    docs, source = documents(args)
    meta = {"tokenizer": f"{getattr(tokenizer, 'name_or_path', '') or 'gpt2'}|{len(tokenizer)}", "eos_token_id": eos,
            "source": source}
    writer = ShardWriter(args.out, vocab_size=len(tokenizer), shard_tokens=args.shard_tokens, meta=meta)
    batch: list[str] = []
    n_docs = 0

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            writer.write(ids + [eos])
        batch.clear()

    for doc in docs:
        batch.append(doc)
        n_docs += 1
        if len(batch) >= 256:
            flush()
        if args.max_docs is not None and n_docs >= args.max_docs:
            break
    if batch:
        flush()
    out = writer.close()
    index = json.loads((out / "index.json").read_text())
    print(json.dumps({"out": str(out), "documents": n_docs, "tokens": index["num_tokens"],
                      "shards": len(index["shards"]), "fingerprint": index["fingerprint"][:16]}))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ttt_common.prepare_data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True,
                   help="'stdlib', a local file or folder, or a Hugging Face dataset id")
    p.add_argument("--name", default=None, help="dataset config name (Hugging Face datasets)")
    p.add_argument("--split", default="train", help="split (default train)")
    p.add_argument("--ext", default=None, help="comma-separated file extensions to read from a folder, e.g. .rs,.c,.md")
    p.add_argument("--text-field", default="text", help="column holding the text (tables and hub datasets)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id; default: GPT-2 BPE, offline")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file (default 2^28)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        raise UsageError(f"--max-docs={args.max_docs} must be >= 1")
    if args.shard_tokens < 1:
        raise UsageError(f"--shard-tokens={args.shard_tokens} must be >= 1")
    prepare(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m ttt_common.prepare_data"))
