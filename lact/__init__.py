"""LaCT (Large-Chunk Test-Time Training) in PyTorch: the official SwiGLU fast-weight layer and model
of a1600012888/LaCT (`lact_llm/lact_model/`), extended with stacks of r fast-weight MLPs and a
memory-efficient manual-backprop chunk operation (`lact.ops`).

Importing `lact` registers the config and models with transformers' Auto classes
(`AutoConfig` "lact_swiglu", `AutoModel`, `AutoModelForCausalLM`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lact.configuration_lact import LaCTSWIGLUConfig
from lact.layers import LaCTSWIGLULayer, LowRankFastWeight
from lact.modeling_lact import LaCTBlock, LaCTForCausalLM, LaCTModel, LaCTPreTrainedModel

__all__ = [
    "LaCTBlock",
    "LaCTForCausalLM",
    "LaCTModel",
    "LaCTPreTrainedModel",
    "LaCTSWIGLUConfig",
    "LaCTSWIGLULayer",
    "LowRankFastWeight",
]

AutoConfig.register(LaCTSWIGLUConfig.model_type, LaCTSWIGLUConfig, exist_ok=True)
AutoModel.register(LaCTSWIGLUConfig, LaCTModel, exist_ok=True)
AutoModelForCausalLM.register(LaCTSWIGLUConfig, LaCTForCausalLM, exist_ok=True)
