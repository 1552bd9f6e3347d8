"""Turn a training checkpoint (DCP folder, any number of shards) into a Hugging Face model folder.

    python -m ttt_common.export results/train/checkpoints/step-00000100 hf_model/
    python -m ttt_common.export results/train/checkpoints hf_model/      # the folder's latest step

The output holds `config.json` and `model.safetensors` (written by `save_pretrained`), so
`AutoModelForCausalLM.from_pretrained(OUT)` (with the model's package imported, which registers it) or
`LaCTForCausalLM.from_pretrained(OUT)` loads it. Like torchtitan's and flame's converters, the model is
rebuilt from what the checkpoint records about itself: the trainer stores the model family and its
config in `meta.json`'s fingerprint, the DCP shards are gathered into one state dict on the CPU
(`dcp_to_torch_save`, no process group needed), and the weights are loaded with `strict=True`, so a
missing or extra tensor is an error rather than a silently re-initialised layer. The checkpoint is
verified first (sizes and CRC32 of every file), as on resume.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from ttt_common.checkpoint import META, Checkpointer, CheckpointError
from ttt_common.cli import UsageError, run_cli


def _resolve_step_dir(path: Path) -> Path:
    """A `step-N` folder, or a checkpoint folder (its latest complete step)."""
    if (path / META).is_file():
        return path
    if path.is_dir():
        step = Checkpointer(path).latest_step()
        if step is not None:
            return Checkpointer(path).step_dir(step)
    raise UsageError(f"CKPT_DIR {path}: neither a checkpoint folder 'step-N' (holding {META}) nor a folder of them")


def load_checkpoint_model(ckpt: str | Path):
    """The model a checkpoint holds, as a plain (unsharded) fp32 module on the CPU in eval mode.

    Args:
        ckpt: a `step-N` folder written by `ttt_common.checkpoint.Checkpointer`, or its parent folder.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ttt_common.trainer import _CARRIED_CONFIG_KEYS, MODELS

    step_dir = _resolve_step_dir(Path(ckpt))
    checkpointer = Checkpointer(step_dir.parent)
    step = int(step_dir.name.split("-")[1])
    meta = checkpointer.verify(step)
    config = dict(meta.get("fingerprint", {}).get("config", {}))
    family = config.pop("model", None)
    if family not in MODELS:
        raise CheckpointError(f"{step_dir}/{META} names no model family the trainer knows ({family!r}; expected one "
                              f"of {sorted(MODELS)}); was it written by ttt_common.trainer?")
    module_name, model_name, config_name = MODELS[family]
    module = importlib.import_module(module_name)
    model_cls, config_cls = getattr(module, model_name), getattr(module, config_name)
    config.pop("model_type", None)
    for key in _CARRIED_CONFIG_KEYS.get(family, ()):
        config.pop(key, None)
    model_config = config_cls(**config)
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(step_dir), str(flat))
        state = torch.load(flat, weights_only=False)["model"]
    model = model_cls(model_config)
    # keys of tied weights are absent from the checkpoint only if the module shares the tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{step_dir}: weights do not fit {model_name}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.float().eval(), family


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write `out/config.json` + `out/model.safetensors` from a training checkpoint. Returns `out`."""
    model, _ = load_checkpoint_model(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ttt_common.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", help="a checkpoint folder step-N (or the checkpoints folder: its latest step)")
    p.add_argument("out", help="output folder for config.json + model.safetensors")
    args = p.parse_args(argv)
    out = export(args.ckpt_dir, args.out)
    print(json.dumps({"exported": str(out), "files": sorted(f.name for f in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m ttt_common.export"))
