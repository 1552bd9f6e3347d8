"""Text corpora that work offline: the embedded standard-library code corpus, or any `datasets` source.

The default corpus is the Python standard library of the running interpreter: ~1,800 real `.py`
files present on every machine, split into train / eval deterministically BY FILE (a hash of the
relative path), so no eval file is ever seen in training.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from pathlib import Path

# files that are data in disguise (huge tables, generated code): they would dominate a small corpus
_SKIP_PARTS = ("site-packages", "__pycache__", "lib2to3/tests/data", "test/encoded_modules", "idlelib/idle_test")


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _in_eval(relative: str, eval_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big")
    return (h / 2**64) < eval_fraction


def stdlib_files(split: str | None = None, eval_fraction: float = 0.1) -> list[Path]:
    """The standard library's `.py` files, sorted by relative path.

    Args:
        split: "train", "eval" or None (all files).
        eval_fraction: fraction of files (by hash of the relative path) that form the eval split.
    """
    if split not in (None, "train", "eval"):
        raise ValueError(f"split={split!r} must be 'train', 'eval' or None")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in rel for part in _SKIP_PARTS):
            continue
        if split is not None and _in_eval(rel, eval_fraction) != (split == "eval"):
            continue
        files.append(path)
    if not files:
        raise FileNotFoundError(f"no standard-library .py files found under {root}")
    return files


def local_data_files(spec: str) -> list[str] | None:
    """Files named by a local path, directory or glob, or None when `spec` is no local path."""
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec, recursive=True)) or None
    path = Path(spec)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = [str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in _BUILDERS]
        return files or None
    return None


_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".py": "text", ".arrow": "arrow",
             ".parquet": "parquet", ".csv": "csv"}


def load_texts(dataset: str | None = None, text_field: str = "text", split: str = "train",
               max_docs: int | None = None, eval_fraction: float = 0.1) -> list[str]:
    """Load documents as strings.

    Args:
        dataset: None for the standard-library code corpus; else a local file / directory / glob
            (json, jsonl, txt, py, arrow, parquet, csv) or a Hugging Face dataset id (e.g.
            "bigcode/the-stack-smol"), loaded through `datasets`.
        text_field: the column holding the text (ignored for the standard library and plain text files).
        split: "train" or "eval". For the standard library: the by-file split. For datasets with a
            single split, eval is the last `eval_fraction` of its rows (deterministic).
        max_docs: keep at most this many documents (the first ones, deterministic).

    Returns:
        list of non-empty document strings.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs={max_docs} must be >= 1")
    if dataset is None or dataset == "stdlib":
        texts = []
        for path in stdlib_files(split, eval_fraction):
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                texts.append(text)
            if max_docs is not None and len(texts) >= max_docs:
                break
        return texts

    import datasets  # imported lazily: it is slow to import

    local = local_data_files(dataset)
    if local is not None:
        suffixes = {Path(f).suffix for f in local}
        builders = {_BUILDERS.get(s) for s in suffixes}
        if None in builders or len(builders) != 1:
            raise ValueError(f"--dataset {dataset}: cannot mix or read file types {sorted(suffixes)}; "
                             f"use one of {sorted(_BUILDERS)}")
        builder = builders.pop()
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=local, split="train", **kwargs)
        if builder == "text":
            text_field = "text"
    elif Path(dataset).exists():
        raise FileNotFoundError(f"--dataset {dataset}: no readable data files there (expected {sorted(_BUILDERS)})")
    else:
        try:
            ds_all = datasets.load_dataset(dataset)
        except Exception as err:  # network errors, unknown ids: say what was tried
            raise FileNotFoundError(f"--dataset {dataset!r} is neither a local path nor a loadable Hugging Face "
                                    f"dataset ({type(err).__name__}: {err})") from err
        names = list(ds_all.keys())
        if split == "eval" and any(n in names for n in ("validation", "test")):
            return _column(ds_all["validation" if "validation" in names else "test"], text_field, dataset, max_docs)
        ds = ds_all["train" if "train" in names else names[0]]
    n = len(ds)
    n_eval = max(1, int(round(n * eval_fraction))) if n > 1 else 0
    ds = ds.select(range(n - n_eval, n)) if split == "eval" else ds.select(range(0, n - n_eval))
    return _column(ds, text_field, dataset, max_docs)


def _column(ds, text_field: str, dataset: str, max_docs: int | None) -> list[str]:
    if text_field not in ds.column_names:
        raise ValueError(f"--text-field {text_field!r} is not a column of {dataset}; columns: {ds.column_names}")
    texts = []
    for text in ds[text_field]:
        if isinstance(text, str) and text.strip():
            texts.append(text)
            if max_docs is not None and len(texts) >= max_docs:
                break
    if not texts:
        raise ValueError(f"{dataset}: column {text_field!r} holds no non-empty text")
    return texts
