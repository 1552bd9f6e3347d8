"""LaCT language model, HF style: `LaCTBlock`, `LaCTModel`, `LaCTForCausalLM`.

Reproduces `lact_llm/lact_model/modeling_lact.py` of the official LaCT code (a1600012888/LaCT):
pre-norm blocks (RMSNorm -> `LaCTSWIGLULayer` -> residual, RMSNorm -> SwiGLU MLP -> residual),
token embedding `model.embeddings`, final `model.norm`, untied `lm_head` by default, the same
parameter names (so official checkpoints load), the same init (normal(initializer_range) for linear
and embedding weights, the fast-weight init of the reference) and the same loss (next-token cross
entropy: labels are shifted left inside `forward`, the last position ignored).

fla's fused kernels (fused norm + residual, fused SwiGLU, fused cross entropy) are replaced by plain
torch operations that compute the same values. Unlike the reference (which disables its cache and
recomputes the whole prefix at every generated token), decoding carries a `LaCTCache`: per layer the
attention's last `window_size - 1` keys/values and the fast-weight state (weights at the last used
chunk boundary plus the pending chunk), so a token costs O(window + chunk), not O(prefix). The cache
follows the installed transformers' contract (`cache=` from 5.24, `past_key_values=` before; see
`ttt_common.hf_compat`); unknown keyword arguments raise TypeError. Padded batches: the fast weights
have no padding mask (as the reference), so left padding is refused, and so is any padding together
with a cache. The model knows nothing of parallelism: wrap `LaCTBlock`s from outside (`_no_split_modules`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from lact.configuration_lact import LaCTSWIGLUConfig
from lact.layers import LaCTLayerState, LaCTSWIGLULayer, LowRankFastWeight
from lact.modules import GatedMLP, RMSNorm
from ttt_common.hf_compat import (
    CACHE_NAME,
    cache_field,
    feed_unseen_tokens,
    pick_cache,
    reject_unknown_kwargs,
)
from ttt_common.model_inputs import check_input_ids, check_inputs_embeds, has_left_padding, lm_logits_and_loss

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
                cache: LaCTLayerState | None = None, use_cache: bool = False
                ) -> tuple[torch.Tensor, LaCTLayerState | None]:
        """hidden_states [B, T, hidden], attention_mask [B, T] or None, `cache` the layer state after the
        previous tokens -> ([B, T, hidden], the layer state after these tokens if `use_cache`)."""
        residual = hidden_states
        hidden_states, _, new_cache = self.attn(self.attn_norm(hidden_states), attention_mask=attention_mask,
                                                past_key_values=cache, use_cache=use_cache)
        # the reference's fused "add then norm" (fla RMSNorm(x, residual, prenorm=True))
        hidden_states, residual = self.mlp_norm(hidden_states, residual, prenorm=True)
        return residual + self.mlp(hidden_states), new_cache


class LaCTCache:
    """Decoding state of a `LaCTModel`: `layers[i]` is block i's `LaCTLayerState` (None before the first
    call); `seen_tokens` counts the tokens consumed (the next token's position).

    Not a `transformers.Cache` (fast weights are not a key/value list); it offers what `generate()`
    needs: `get_seq_length`, `reorder_cache` (beam search), `is_compileable`.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[LaCTLayerState | None] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select / reorder the batch rows of every cached tensor in place."""
        self.layers = [None if entry is None else entry.select_batch(beam_idx) for entry in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"LaCTCache(num_layers={len(self.layers)}, seen_tokens={self.seen_tokens})"


class LaCTPreTrainedModel(PreTrainedModel):
    """Weight init and HF plumbing shared by `LaCTModel` and `LaCTForCausalLM`."""

    config_class = LaCTSWIGLUConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LaCTBlock"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a key/value DynamicCache: the model creates its own LaCTCache
        return False

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
        cache: LaCTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: LaCTCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Args:
            input_ids: [B, T] token ids (or `inputs_embeds` [B, T, hidden], exactly one of them); the
                new tokens when a cache is given.
            attention_mask: optional [B, S] 0/1 padding mask, S = cached + T. Padded keys are masked in
                attention; the fast weights (like the reference's) have no mask, so left padding
                (a 0 before a 1) is refused, and so is any padding with a cache or use_cache.
            cache: the `LaCTCache` returned by a previous call, or None; `past_key_values` is the same
                argument under the name transformers < 5.24 uses. An empty foreign cache is ignored.
            use_cache: return the updated `LaCTCache` (default False; `generate()` turns it on).

        Returns:
            `BaseModelOutputWithPast` with last_hidden_state [B, T, hidden] (after the final norm), the
            cache (field `cache` or `past_key_values`, as the installed transformers reads it) and, if
            `output_hidden_states`, the input of every block plus the final output.
        """
        reject_unknown_kwargs(type(self).__name__, kwargs)
        cache = pick_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = self._incoming_cache(cache)
        past = cache.seen_tokens if cache is not None else 0
        use_cache = bool(use_cache)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if inputs_embeds is None:
            check_input_ids(input_ids, self.embeddings.num_embeddings)
            inputs_embeds = self.embeddings(input_ids)
        else:
            check_inputs_embeds(inputs_embeds, self.config.hidden_size, self.embeddings.weight)
        b, t = inputs_embeds.shape[:2]
        if attention_mask is not None:
            attention_mask = self._new_tokens_mask(attention_mask, b, t, past, cache is not None or use_cache)

        new_cache = LaCTCache(len(self.layers)) if use_cache else None
        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            entry = cache.layers[i] if cache is not None else None
            hidden_states, new_entry = layer(hidden_states, attention_mask=attention_mask, cache=entry,
                                             use_cache=use_cache)
            if new_cache is not None:
                new_cache.layers[i] = new_entry
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if new_cache is not None:
            new_cache.seen_tokens = past + t
        if not return_dict:
            return tuple(x for x in (hidden_states, new_cache, all_hidden_states) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                       **cache_field(new_cache))


    def _incoming_cache(self, cache) -> LaCTCache | None:
        """The `LaCTCache` to continue (None: start fresh); an empty foreign cache is dropped, any other refused."""
        if cache is not None and not isinstance(cache, LaCTCache):
            if _cache_length(cache) > 0:
                raise TypeError(f"cache must be a LaCTCache returned by this model, got {type(cache).__name__}")
            cache = None  # an empty foreign cache (e.g. built by a caller for another model): start fresh
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        return cache

    @staticmethod
    def _new_tokens_mask(attention_mask: torch.Tensor, b: int, t: int, past: int, cached: bool) -> torch.Tensor:
        """The [B, T] mask of the new tokens from a checked [B, T] or [B, cached + T] mask; `cached`: a
        cache is read or written (then no padding is allowed)."""
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) not in ((b, t), (b, past + t)):
            raise ValueError(f"attention_mask must be [batch, cached + time] = {(b, past + t)} (1 = real "
                             f"token), got {tuple(attention_mask.shape)}")
        m = attention_mask.bool()
        if not bool(m.all()):
            if has_left_padding(m):
                raise ValueError(
                    "attention_mask has left padding, but LaCT's fast weights (like the reference's) have "
                    "no padding mask: the padded tokens would update them and shift the chunk boundaries. "
                    "Batch prompts of equal length (or generate one prompt at a time); right padding is "
                    "harmless in a forward without cache.")
            if cached:
                raise ValueError(
                    "attention_mask has padding, which decoding with a cache cannot honour (padded tokens "
                    "would enter the fast-weight state); batch prompts of equal length or pass "
                    "use_cache=False")
        return attention_mask[:, -t:]

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

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """Feed only the tokens the `LaCTCache` has not seen yet (the cache arrives as `cache` or, before
        transformers 5.24, `past_key_values`)."""
        cache = kwargs.get(CACHE_NAME)
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        seen = cache.seen_tokens if isinstance(cache, LaCTCache) else 0
        return feed_unseen_tokens(model_inputs, input_ids, seen)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LaCTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: LaCTCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Args: as `LaCTModel.forward`, plus
            input_ids: [B, T] (or inputs_embeds [B, T, hidden]).
            labels: [B, T] token ids aligned with the inputs (NOT pre-shifted): position t is scored
                against labels[t + 1]; -100 is ignored; the loss is the mean over scored tokens.
            logits_to_keep: 0 = logits for every position, n > 0 = for the last n.

        Returns:
            `CausalLMOutputWithPast` (loss, logits [B, T or n, vocab], the cache, hidden_states).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        # the reference's layout (labels shifted left, padded with -100); no scored target -> 0
        logits, loss = lm_logits_and_loss(self.lm_head, outputs.last_hidden_state, labels, logits_to_keep,
                                          pad_last=True)

        new_cache = getattr(outputs, CACHE_NAME)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        **cache_field(new_cache))
        return result if return_dict else result.to_tuple()
