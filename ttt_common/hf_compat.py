"""The parts of the transformers generation contract that changed between the 5.x releases we support.

transformers 5.24 renamed the cache that `generate()` passes to `forward` (and reads back from the output)
from `past_key_values` to `cache`; 5.20-5.23 use `past_key_values`. A model that swallowed `**kwargs`
silently decoded without its state under 5.24. Our models therefore take both names explicitly, return
the cache under the name the installed release reads, and refuse keyword arguments they do not know.
"""

from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

# the field (and forward keyword) under which the installed transformers passes and reads the cache
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# keyword arguments generate() / pipelines may pass that carry no information for our models
IGNORED_GENERATION_KWARGS = ("cache_position", "output_attentions", "is_first_iteration")


def pick_cache(cache, past_key_values):
    """The cache passed under either name (both at once is an error)."""
    if cache is not None and past_key_values is not None:
        raise TypeError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def reject_unknown_kwargs(owner: str, kwargs: dict) -> None:
    """TypeError naming keyword arguments the model does not understand (never silently dropped)."""
    if kwargs.get("output_attentions"):
        raise ValueError(f"{owner} does not return attention weights (output_attentions=True)")
    unknown = sorted(k for k in kwargs if k not in IGNORED_GENERATION_KWARGS)
    if unknown:
        raise TypeError(f"{owner}.forward() got unexpected keyword argument(s): {', '.join(unknown)}")


def feed_unseen_tokens(model_inputs: dict, input_ids, seen_tokens: int) -> dict:
    """Trim generate()'s model inputs to the tokens a stateful cache has not consumed yet.

    Our caches (`TTTCache`, `LaCTCache`) carry state, not a key/value list, so transformers cannot tell
    how many tokens they hold: feed `input_ids[:, seen_tokens:]` (and the matching position ids)."""
    if seen_tokens > 0:
        model_inputs["input_ids"] = input_ids[:, seen_tokens:]
        if model_inputs.get("position_ids") is not None:
            model_inputs["position_ids"] = model_inputs["position_ids"][..., -(input_ids.shape[1] - seen_tokens):]
    return model_inputs


def cache_field(cache) -> dict:
    """`{CACHE_NAME: cache}`, to build an output that the installed generate() reads back."""
    return {CACHE_NAME: cache}


def enable_activation_checkpointing(model, checkpointing_kwargs: dict | None = None) -> None:
    """Checkpoint every block's activations through the installed transformers' current API.

    transformers 5.24 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` (the old
    name warns that it is deprecated); 5.20-5.23 have only the old name. Both take the kwargs of
    `torch.utils.checkpoint.checkpoint` (e.g. `{"use_reentrant": False}`).
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(checkpointing_kwargs)
