"""Faithful PyTorch port of the official TTT layers and language model.

Reproduces test-time-training/ttt-lm-jax (`ttt/models/ttt_layer.py`, `ttt/models/model.py`) and
reads its checkpoints (`ttt/infra/checkpoint.py`). Importing this package registers `TTTConfig`
(`model_type="ttt"`), `TTTModel` and `TTTForCausalLM` with the transformers Auto classes.

    from official_port import TTTConfig, TTTForCausalLM
    model = TTTForCausalLM(TTTConfig.from_preset("125m-TTT"))
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from official_port.configuration_ttt import CONFIGS, SEQ_MODELING_BLOCKS, TTTConfig
from official_port.layers import (
    TTT_LAYERS,
    TTTMLP,
    TTTBase,
    TTTLinear,
    TTTLinearBase,
    TTTMLPBase,
    TTTState,
    flax_layer_params_to_torch,
)
from official_port.modeling_ttt import (
    Block,
    SelfAttention,
    TTTCache,
    TTTCausalLMOutputWithPast,
    TTTForCausalLM,
    TTTModel,
    TTTModelOutputWithPast,
    TTTPreTrainedModel,
)

# The converter is exposed lazily so `python -m official_port.convert_jax` does not find its own
# module already imported by the package (runpy warns about that).
_CONVERTER_NAMES = ("MODEL_KEY_MAP", "flax_params_to_state_dict", "load_flax_params", "load_official_checkpoint",
                    "read_streaming_checkpoint", "resolve_config")


def __getattr__(name: str):
    if name in _CONVERTER_NAMES:
        from official_port import convert_jax

        return getattr(convert_jax, name)
    raise AttributeError(f"module 'official_port' has no attribute {name!r}")


AutoConfig.register(TTTConfig.model_type, TTTConfig, exist_ok=True)
AutoModel.register(TTTConfig, TTTModel, exist_ok=True)
AutoModelForCausalLM.register(TTTConfig, TTTForCausalLM, exist_ok=True)

__all__ = [
    "CONFIGS",
    "SEQ_MODELING_BLOCKS",
    "TTTConfig",
    "TTTModel",
    "TTTForCausalLM",
    "TTTPreTrainedModel",
    "TTTCache",
    "TTTModelOutputWithPast",
    "TTTCausalLMOutputWithPast",
    "Block",
    "SelfAttention",
    "TTT_LAYERS",
    "TTTBase",
    "TTTLinear",
    "TTTMLP",
    "TTTLinearBase",
    "TTTMLPBase",
    "TTTState",
    "flax_layer_params_to_torch",
    "MODEL_KEY_MAP",
    "flax_params_to_state_dict",
    "read_streaming_checkpoint",
    "load_flax_params",
    "load_official_checkpoint",
    "resolve_config",
]
