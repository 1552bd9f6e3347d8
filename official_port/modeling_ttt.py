"""The official TTT language model in PyTorch, Hugging Face style.

Reproduces `Model`, `Block`, `ConvModule`, `Attention`, `SwiGLUMLP`, `RMSNorm` and `CausalLM` of
test-time-training/ttt-lm-jax (`ttt/models/model.py`) value for value (checked against the
official JAX code by the parity fixtures, see `parity/official_model.py`). Module and parameter
names mirror the flax tree (`model.h.<i>.seq_modeling_block.wq`, `model.wte`, `model.ln_f`, ...)
so that `official_port.convert_jax` is a declarative name map.

Beyond the reference:
  * any sequence length (the official layers need exactly `max_sequence_length`);
  * incremental decoding through `TTTCache` (attention K/V, pre-conv inputs and the TTT layer
    state, i.e. the inner parameters and the partial mini-batch) and `generate()`;
  * gradient checkpointing per block (`config.remat_block`, or
    `ttt_common.hf_compat.enable_activation_checkpointing(model)` on any supported transformers);
  * bf16 autocast (the TTT layers keep their inner state in fp32).

Layout: hidden states are `[B, T, D]` (batch, time, hidden) everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from official_port.configuration_ttt import TTTConfig
from official_port.layers import TTT_LAYERS, TTTState
from ttt_common.hf_compat import (
    CACHE_NAME,
    cache_field,
    feed_unseen_tokens,
    pick_cache,
    reject_unknown_kwargs,
)
from ttt_common.model_inputs import check_input_ids, check_inputs_embeds, has_left_padding, lm_logits_and_loss
from ttt_common.modules import RMSNorm, apply_rotary_interleaved, rope_cos_sin

__all__ = [
    "RMSNorm",
    "SwiGLUMLP",
    "ConvModule",
    "SelfAttention",
    "Block",
    "TTTCache",
    "TTTPreTrainedModel",
    "TTTModel",
    "TTTForCausalLM",
    "TTTModelOutputWithPast",
    "TTTCausalLMOutputWithPast",
    "apply_rotary_interleaved",
]


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------


def official_rms_norm(dim: int, eps: float) -> RMSNorm:
    """The shared `ttt_common.modules.RMSNorm` in the official float order (normalise in float32, cast
    back to the input dtype, then scale): bf16 runs keep the official rounding; float32 is unaffected."""
    return RMSNorm(dim, eps=eps, scale_in_input_dtype=True)


class SwiGLUMLP(nn.Module):
    """`w2(silu(w1 x) * w3 x)`, no biases (official `SwiGLUMLP`)."""

    def __init__(self, config: TTTConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ConvModule(nn.Module):
    """Pre-conv block: `conv1(conv_norm(x))`, a depthwise causal Conv1d with bias (official `ConvModule`).

    The causal padding is done by hand (w-1 zeros on the left, or the cached last w-1 normed
    inputs when decoding), so prefill + decode equals a full pass.
    """

    def __init__(self, config: TTTConfig):
        super().__init__()
        d, w = config.hidden_size, config.conv_width
        self.conv_width = w
        self.conv_norm = official_rms_norm(d, config.rms_norm_eps)
        self.conv1 = nn.Conv1d(d, d, kernel_size=w, groups=d, bias=True)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x `[B, T, D]`; conv_state `[B, w-1, D]` (previous normed inputs) or None (zeros).
        Returns: output `[B, T, D]` and the new conv_state `[B, w-1, D]`."""
        xn = self.conv_norm(x)
        w = self.conv_width
        if conv_state is None:
            conv_state = xn.new_zeros(xn.shape[0], w - 1, xn.shape[2])
        padded = torch.cat([conv_state.to(xn.dtype), xn], dim=1)  # [B, w-1+T, D]
        out = self.conv1(padded.transpose(1, 2)).transpose(1, 2)  # [B, T, D]
        return out, padded[:, padded.shape[1] - (w - 1):]


class SelfAttention(nn.Module):
    """Causal multi-head softmax attention with interleaved RoPE at absolute positions (official `Attention`).

    `wq, wk, wv, wo` have no bias. Uses `F.scaled_dot_product_attention`; the key/value cache of
    decoding is `(k, v)`, each `[B, H, S, d]`.
    """

    def __init__(self, config: TTTConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Args:
            x: `[B, T, D]`.
            position_ids: `[B, T]` absolute positions (RoPE).
            key_padding_mask: `[B, S]` bool, True = attend (S = cached + T), or None.
            state: cached `(k, v)` `[B, H, S-T, d]` or None.
        Returns: output `[B, T, D]` and the new `(k, v)` `[B, H, S, d]`.
        """
        b, t, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.wq(x).view(b, t, h, hd)
        k = self.wk(x).view(b, t, h, hd)
        v = self.wv(x).view(b, t, h, hd)
        table = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = rope_cos_sin(position_ids, hd, self.rope_theta, table, correctly_rounded=True)  # [B, T, d/2]
        q = apply_rotary_interleaved(q, cos, sin).transpose(1, 2)  # [B, H, T, d]
        k = apply_rotary_interleaved(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        past = 0
        if state is not None:
            past = state[0].shape[2]
            k = torch.cat([state[0].to(k.dtype), k], dim=2)
            v = torch.cat([state[1].to(v.dtype), v], dim=2)
        s = k.shape[2]
        if past == 0 and key_padding_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            allowed = torch.arange(s, device=x.device)[None, :] <= (past + torch.arange(t, device=x.device))[:, None]
            allowed = allowed[None, None]  # [1, 1, T, S]
            if key_padding_mask is not None:
                allowed = allowed & key_padding_mask[:, None, None, :].bool()
            # additive bias with finfo.min (as the official code) rather than -inf: a query whose keys are
            # all padding gets a uniform distribution instead of NaN.
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=x.device)
            bias = bias.masked_fill(~allowed, torch.finfo(q.dtype).min)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, t, h * hd)
        return self.wo(out), (k, v)


class Block(GradientCheckpointingLayer):
    """One residual block (official `Block`): [pre-conv], sequence modeling, SwiGLU feed-forward."""

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_attention = config.seq_modeling_block == "self_attention"
        if config.pre_conv:
            self.conv = ConvModule(config)
        self.seq_norm = official_rms_norm(config.hidden_size, config.rms_norm_eps)
        if self.is_attention:
            self.seq_modeling_block = SelfAttention(config)
        else:
            self.seq_modeling_block = TTT_LAYERS[config.seq_modeling_block](config)
        self.ffn_norm = official_rms_norm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = SwiGLUMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        past_key_values: dict | None = None,
        use_cache: bool = False,
        ttt_lr_mult: float | torch.Tensor = 1.0,
        output_ttt_stats: bool = False,
        inner_steps: int = 1,
    ) -> tuple[torch.Tensor, tuple | None, dict | None]:
        """Args:
            hidden_states: `[B, T, D]` residual stream.
            position_ids: `[B, T]` absolute positions.
            key_padding_mask: `[B, S]` (attention only) or None.
            past_key_values: this block's cache entry `{"conv": ..., "seq": ...}` or None.
            use_cache: return the updated cache entry.
            ttt_lr_mult, output_ttt_stats, inner_steps: passed to the TTT layer.
        Returns: new hidden states `[B, T, D]`, the TTT stats (or None), the new cache entry (or None).
        """
        entry = past_key_values or {}
        new_entry = {}
        if hasattr(self, "conv"):
            conv_out, new_entry["conv"] = self.conv(hidden_states, entry.get("conv"))
            hidden_states = hidden_states + conv_out
        x = self.seq_norm(hidden_states)
        stats = None
        if self.is_attention:
            seq_out, new_entry["seq"] = self.seq_modeling_block(x, position_ids, key_padding_mask, entry.get("seq"))
        else:
            seq_out, stats, new_entry["seq"] = self.seq_modeling_block(
                x, position_ids=position_ids, state=entry.get("seq"), ttt_lr_mult=ttt_lr_mult,
                output_ttt_stats=output_ttt_stats, inner_steps=inner_steps,
            )
        hidden_states = hidden_states + seq_out
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
        return hidden_states, stats, (new_entry if use_cache else None)


# ----------------------------------------------------------------------------------------------
# cache and outputs
# ----------------------------------------------------------------------------------------------


def _map_tensors(obj, fn):
    """Apply `fn` to every tensor inside nested dicts / tuples / lists / dataclasses (a TTTState)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


class TTTCache:
    """Decoding state of a `TTTModel`: per block the pre-conv inputs and the sequence-block state.

    `layers[i]` is `{"conv": [B, w-1, D] tensor, "seq": (k, v) | TTTState}` or None before the
    first call; `seen_tokens` counts the tokens consumed so far (the next token's position).
    Not a `transformers.Cache`: TTT state is not a key/value list; it offers what `generate()`
    needs (`get_seq_length`, `is_compileable`).
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[dict[str, torch.Tensor | tuple | TTTState] | None] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select / reorder the batch rows of every cached tensor in place (beam search)."""
        self.layers = [_map_tensors(entry, lambda t: t.index_select(0, beam_idx.to(t.device)))
                       for entry in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"TTTCache(num_layers={len(self.layers)}, seen_tokens={self.seen_tokens})"


@dataclass
class TTTModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `ttt_stats`: per block the TTT layer's statistics tuple (or None)."""

    ttt_stats: tuple | None = None


@dataclass
class TTTCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `ttt_stats` (see `TTTModelOutputWithPast`)."""

    ttt_stats: tuple | None = None


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


class TTTPreTrainedModel(PreTrainedModel):
    """Shared HF plumbing: config class, weight init (the official initialisers), checkpointing."""

    config_class = TTTConfig
    config: TTTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a key/value DynamicCache: the model creates its own TTTCache.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Official initialisers: Dense kernels and embeddings N(0, initializer_range), norms ones/zeros,
        the pre-conv flax `nn.Conv` default (LeCun normal kernel, zero bias); TTT layers own their init."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            # handled on the Conv1d itself: HF skips parameter-less containers such as ConvModule
            init.lecun_normal_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, tuple(TTT_LAYERS.values())):
            # A TTT layer: children were visited first (default inits above); its own reset restores
            # the official init of everything it holds, unless its weights were loaded.
            own = list(module.parameters(recurse=False))
            if not any(getattr(p, "_is_hf_initialized", False) for p in own):
                module.reset_parameters()


def _position_ids_from(attention_mask: torch.Tensor | None, past: int, b: int, t: int, device) -> torch.Tensor:
    """Official default positions: `clip(cumsum(mask) - 1, 0)`; `arange` after the cache without a mask."""
    if attention_mask is not None:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[:, pos.shape[1] - t:]
    return (torch.arange(past, past + t, device=device)[None, :]).expand(b, t)


class TTTModel(TTTPreTrainedModel):
    """The official `Model`: token embedding `wte`, blocks `h`, final RMSNorm `ln_f`."""

    def __init__(self, config: TTTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = official_rms_norm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()
        if config.remat_block:
            # The official `remat_block` policy only trades memory for compute; non-reentrant
            # checkpointing of every block gives the same values and gradients.
            self._set_gradient_checkpointing(True, partial(checkpoint, use_reentrant=False))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TTTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        ttt_lr_mult: float | torch.Tensor = 1.0,
        output_ttt_stats: bool = False,
        output_hidden_states: bool | None = None,
        inner_steps: int = 1,
        return_dict: bool | None = None,
        past_key_values: TTTCache | None = None,
        **kwargs,
    ) -> TTTModelOutputWithPast:
        """Run the blocks.

        Args:
            input_ids: `[B, T]` token ids (or `inputs_embeds` `[B, T, D]`), any T >= 1.
            attention_mask: `[B, S]` with S = cached + T; 1 = real token. Positions default to
                `cumsum(mask) - 1` as in the official code. Attention blocks mask padded keys;
                TTT blocks (like the official ones) have no padding mask, so left padding is refused.
            position_ids: `[B, T]` absolute positions (default: see `attention_mask`).
            cache: a `TTTCache` from a previous call (decoding), or None; `past_key_values` is the same
                argument under the name transformers < 5.24 uses.
            use_cache: return the updated `TTTCache` (default: `config.use_cache` in eval mode).
            ttt_lr_mult: multiplies every inner learning rate (float or tensor).
            output_ttt_stats: return the TTT statistics of every block (`ttt_stats`).
            output_hidden_states: return the residual stream before every block and the final output.
            inner_steps: gradient steps per completed mini-batch in the TTT layers (1 = official).
            return_dict: False returns the output's non-None fields as a tuple (HF convention).
        Returns: `TTTModelOutputWithPast` (`last_hidden_state` `[B, T, D]` after `ln_f`).
        """
        reject_unknown_kwargs(type(self).__name__, kwargs)
        cache = self._incoming_cache(pick_cache(cache, past_key_values))
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        b, t, _ = inputs_embeds.shape
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        past = cache.seen_tokens if cache is not None else 0
        key_padding_mask = self._key_padding_mask(attention_mask, b, t, past)
        if position_ids is None:
            position_ids = _position_ids_from(attention_mask, past, b, t, inputs_embeds.device)
        elif position_ids.shape[-1] != t:
            raise ValueError(f"position_ids must be [batch, {t}], got {tuple(position_ids.shape)}")
        position_ids = position_ids.expand(b, t)

        new_cache = TTTCache(len(self.h)) if use_cache else None
        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        all_stats = () if output_ttt_stats else None
        for i, block in enumerate(self.h):
            if output_hidden_states:
                all_hidden += (hidden_states,)
            entry = cache.layers[i] if cache is not None else None
            hidden_states, stats, new_entry = block(
                hidden_states, position_ids, key_padding_mask, past_key_values=entry, use_cache=use_cache,
                ttt_lr_mult=ttt_lr_mult, output_ttt_stats=output_ttt_stats, inner_steps=inner_steps,
            )
            if new_cache is not None:
                new_cache.layers[i] = new_entry
            if output_ttt_stats:
                all_stats += (stats,)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        if new_cache is not None:
            new_cache.seen_tokens = past + t
        out = TTTModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden, ttt_stats=all_stats, **cache_field(new_cache)
        )
        return out if return_dict is not False else out.to_tuple()

    def _incoming_cache(self, cache) -> TTTCache | None:
        """The `TTTCache` to continue (None: start fresh); an empty foreign cache is dropped, any other refused."""
        if cache is not None and not isinstance(cache, TTTCache):
            if getattr(cache, "get_seq_length", lambda: 1)() != 0:
                raise TypeError(f"cache must be a TTTCache returned by this model, got {type(cache).__name__}")
            return None  # an empty foreign cache (e.g. built by a caller for another model): start fresh
        if cache is not None and len(cache) != len(self.h):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.h)}")
        return cache

    def _embed(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """`[B, T, D]` input embeddings from exactly one of `input_ids` / `inputs_embeds`, checked."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids ([B, T] ids) and inputs_embeds ([B, T, D])")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.wte.num_embeddings)
            inputs_embeds = self.wte(input_ids)
        else:
            check_inputs_embeds(inputs_embeds, self.config.hidden_size, self.wte.weight)
        if inputs_embeds.shape[1] == 0:
            raise ValueError("the input has length 0; pass at least one token")
        return inputs_embeds

    def _key_padding_mask(self, attention_mask: torch.Tensor | None, b: int, t: int, past: int) -> torch.Tensor | None:
        """`[B, S]` bool mask of the attention blocks' keys (None when nothing is padded).

        TTT blocks have no padding mask (like the official ones): left padding, which they would learn
        from, is refused; right padding is harmless by causality and needs no mask.
        """
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < t:
            raise ValueError(f"attention_mask must be [batch, cached + time] = [{b}, {past + t}], "
                             f"got {tuple(attention_mask.shape)}")
        m = attention_mask.bool()
        if bool(m.all()):
            return None
        if self.h[0].is_attention:
            return m
        # a 0 before a 1 in a row = left padding, which a TTT layer would learn from
        if has_left_padding(m):
            raise ValueError(
                "attention_mask has left padding, but TTT layers (like the official ones) have no "
                "padding mask: the padded tokens would update the inner model. Right-pad instead "
                "(causality makes right padding harmless) or batch sequences of equal length.")
        return None


class TTTForCausalLM(TTTPreTrainedModel, GenerationMixin):
    """The official `CausalLM`: `TTTModel` + LM head (tied to `model.wte` when `tie_word_embeddings`)."""

    _tied_weights_keys = {"lm_head.weight": "model.wte.weight"}

    def __init__(self, config: TTTConfig):
        super().__init__(config)
        self.model = TTTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """Feed only the tokens the `TTTCache` has not seen yet (the cache arrives as `cache` or, before
        transformers 5.24, `past_key_values`)."""
        cache = kwargs.get(CACHE_NAME)
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        seen = cache.seen_tokens if isinstance(cache, TTTCache) else 0
        return feed_unseen_tokens(model_inputs, input_ids, seen)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TTTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        ttt_lr_mult: float | torch.Tensor = 1.0,
        output_ttt_stats: bool = False,
        output_hidden_states: bool | None = None,
        inner_steps: int = 1,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: TTTCache | None = None,
        **kwargs,
    ) -> TTTCausalLMOutputWithPast:
        """Logits and (with `labels`) the mean next-token cross-entropy.

        Args: as `TTTModel.forward`, plus
            labels: `[B, T]` targets aligned with `input_ids` (shifted inside, as HF does: position t
                predicts labels[t+1]); -100 = ignored. The loss is the mean over the kept targets
                (official: mean over b and t = 0..T-2).
            logits_to_keep: compute logits for the last this-many positions only (0 = all).
        Returns: `TTTCausalLMOutputWithPast` with `logits` `[B, T, V]` (float32 math for the loss).
        """
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=pick_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
            ttt_lr_mult=ttt_lr_mult, output_ttt_stats=output_ttt_stats,
            output_hidden_states=output_hidden_states, inner_steps=inner_steps, return_dict=True, **kwargs,
        )
        # official: mean over b and t = 0..T-2; no scored target -> 0 (ttt_common.model_inputs)
        logits, loss = lm_logits_and_loss(self.lm_head, out.last_hidden_state, labels, logits_to_keep)
        result = TTTCausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **cache_field(getattr(out, CACHE_NAME)),
            ttt_stats=out.ttt_stats,
        )
        return result if return_dict is not False else result.to_tuple()
