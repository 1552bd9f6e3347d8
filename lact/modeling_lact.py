"""LaCT language model, HF style: `LaCTBlock`, `LaCTModel`, `LaCTForCausalLM`.

Reproduces `lact_llm/lact_model/modeling_lact.py` of the official LaCT code (a1600012888/LaCT):
pre-norm blocks (RMSNorm -> `LaCTSWIGLULayer` -> residual, RMSNorm -> SwiGLU MLP -> residual),
token embedding `model.embeddings`, final `model.norm`, untied `lm_head` by default, the same
parameter names (so official checkpoints load), the same init (normal(initializer_range) for linear
and embedding weights, the fast-weight init of the reference) and the same loss (next-token cross
entropy: labels are shifted left inside `forward`, the last position ignored).

fla's fused kernels (fused norm + residual, fused SwiGLU, fused cross entropy) are replaced by plain
torch operations that compute the same values. No KV/state cache: `generate()` recomputes the full
prefix at every step (the reference disables its cache the same way). The model knows nothing of
parallelism: wrap `LaCTBlock`s from outside (`_no_split_modules`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from lact.configuration_lact import LaCTSWIGLUConfig
from lact.layers import LaCTSWIGLULayer, LowRankFastWeight
from lact.modules import GatedMLP, RMSNorm
from ttt_common.model_inputs import causal_lm_loss, check_input_ids, check_inputs_embeds

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init

try:
    from transformers.modeling_layers import GradientCheckpointingLayer as _BlockBase
except ImportError:  # pragma: no cover - transformers < 4.52
    _BlockBase = nn.Module


class LaCTBlock(_BlockBase):
    """One LaCT block: x + attn(norm(x)), then + mlp(norm(.)).

    Args:
        config: `LaCTSWIGLUConfig`.
        layer_idx: index of the block in the model.
    """

    def __init__(self, config: LaCTSWIGLUConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = LaCTSWIGLULayer.from_config(config, layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(
            hidden_size=config.hidden_size,
            hidden_ratio=config.hidden_ratio,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """hidden_states [B, T, hidden], attention_mask [B, T] or None -> [B, T, hidden]."""
        residual = hidden_states
        hidden_states, _, _ = self.attn(self.attn_norm(hidden_states), attention_mask=attention_mask)
        # the reference's fused "add then norm" (fla RMSNorm(x, residual, prenorm=True))
        hidden_states, residual = self.mlp_norm(hidden_states, residual, prenorm=True)
        return residual + self.mlp(hidden_states)


class LaCTPreTrainedModel(PreTrainedModel):
    """Weight init and HF plumbing shared by `LaCTModel` and `LaCTForCausalLM`."""

    config_class = LaCTSWIGLUConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LaCTBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            if module.weight is not None:
                init.ones_(module.weight)
        elif isinstance(module, LowRankFastWeight):
            std_left, std_right = module.init_stds()
            init.normal_(module.w_left, mean=0.0, std=std_left)
            init.normal_(module.w_right, mean=0.0, std=std_right)
        if isinstance(module, LaCTSWIGLULayer):
            init.ones_(module.qk_scale)
            init.zeros_(module.qk_offset)
            for owner in module.fast_weight_owners():
                # full-rank w0, w2: std 1/sqrt(d_in); w1: std 1/sqrt(d_h) (low-rank factors above)
                if not isinstance(owner.w0, LowRankFastWeight):
                    init.normal_(owner.w0, mean=0.0, std=1.0 / math.sqrt(module.fw_head_dim))
                    init.normal_(owner.w2, mean=0.0, std=1.0 / math.sqrt(module.fw_head_dim))
                init.normal_(owner.w1, mean=0.0, std=1.0 / math.sqrt(module.d_h))


class LaCTModel(LaCTPreTrainedModel):
    """Embeddings, `num_hidden_layers` `LaCTBlock`s and the final RMSNorm."""

    def __init__(self, config: LaCTSWIGLUConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LaCTBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Args:
            input_ids: [B, T] token ids (or `inputs_embeds` [B, T, hidden], exactly one of them).
            attention_mask: optional [B, T] 0/1 padding mask.
            past_key_values: unsupported (no cache); an empty cache object is accepted and ignored.

        Returns:
            `BaseModelOutputWithPast` with last_hidden_state [B, T, hidden] (after the final norm) and,
            if `output_hidden_states`, the input of every block plus the final output.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if past_key_values is not None and _cache_length(past_key_values) > 0:
            raise ValueError("LaCTModel keeps no KV/state cache: pass the full sequence with "
                             "past_key_values=None (use_cache=False)")
        if output_attentions:
            warnings.warn("LaCTModel does not return attention weights; output_attentions is ignored",
                          stacklevel=2)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if inputs_embeds is None:
            check_input_ids(input_ids, self.embeddings.num_embeddings)
            inputs_embeds = self.embeddings(input_ids)
        else:
            check_inputs_embeds(inputs_embeds, self.config.hidden_size, self.embeddings.weight)
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(inputs_embeds.shape[:2]):
            raise ValueError(f"attention_mask must be [batch, time] = {tuple(inputs_embeds.shape[:2])} (1 = real "
                             f"token), got {tuple(attention_mask.shape)}")

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(hidden_states, attention_mask=attention_mask)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if not return_dict:
            return tuple(x for x in (hidden_states, all_hidden_states) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=None,
                                       hidden_states=all_hidden_states)


def _cache_length(past_key_values) -> int:
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return len(past_key_values)


class LaCTForCausalLM(LaCTPreTrainedModel, GenerationMixin):
    """`LaCTModel` plus the LM head and the next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: LaCTSWIGLUConfig):
        super().__init__(config)
        self.model = LaCTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> LaCTModel:
        return self.model

    def set_decoder(self, decoder: LaCTModel) -> None:
        self.model = decoder

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask=None,
                                      inputs_embeds=None, **kwargs) -> dict:
        # no cache: every generation step runs the whole prefix (as the reference does)
        model_inputs = {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask,
                        "use_cache": False}
        if kwargs.get("logits_to_keep") is not None:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Args:
            input_ids: [B, T] (or inputs_embeds [B, T, hidden]).
            labels: [B, T] token ids aligned with the inputs (NOT pre-shifted): position t is scored
                against labels[t + 1]; -100 is ignored; the loss is the mean over scored tokens.
            logits_to_keep: 0 = logits for every position, n > 0 = for the last n.

        Returns:
            `CausalLMOutputWithPast` (loss, logits [B, T or n, vocab], hidden_states).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states)

        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError(f"logits_to_keep={logits_to_keep} with labels: the loss needs every "
                                 "position's logits; pass logits_to_keep=0")
            # the reference's layout (labels shifted left, padded with -100); no scored target -> 0
            loss = causal_lm_loss(logits, labels, logits.shape[-1], pad_last=True)

        if not return_dict:
            out = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=None,
                                      hidden_states=outputs.hidden_states)
