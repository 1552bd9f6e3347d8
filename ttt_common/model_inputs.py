"""Checks of what a causal LM's `forward` is given, and the next-token loss, shared by the LaCT and TTT models.

Wrong inputs fail early with an error naming the argument, the value, the rule and a fix, instead of
deep inside `nn.Embedding` (an id >= vocab: `IndexError: index out of range in self` on the CPU, a
device-side assert that kills the CUDA context on a GPU) or `F.linear` (a dtype mismatch).

Defined results (no error):
    * B = 0: empty outputs (nothing to compute).
    * a loss with no scored target (T = 1, or every label after the first position is -100): 0 with
      zero gradients, and a warning. Mean cross-entropy over no tokens is 0/0; a NaN there would poison
      a training run's weights, while 0 adds nothing to a sum of losses and moves no weight.
Refused: T = 0 (a sequence needs at least one token), non-integer ids, ids outside [0, vocab), labels
outside [0, vocab) other than -100, embeddings whose dtype differs from the weights' outside autocast.

The range checks read the ids' min and max: one small device-to-host copy per forward.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_INDEX_DTYPES = (torch.long, torch.int32)  # what nn.Embedding accepts


def check_input_ids(input_ids, vocab_size: int, name: str = "input_ids") -> None:
    """`input_ids` must be a [B, T] integer tensor (T >= 1) of ids in [0, vocab_size)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in _INDEX_DTYPES:
        hint = ("pass embeddings as inputs_embeds=" if input_ids.is_floating_point()
                else f"convert with {name}.long()")
        raise TypeError(f"{name} must hold integer token ids (torch.long or torch.int32), got dtype "
                        f"{input_ids.dtype}; {hint}")
    if input_ids.dim() != 2:
        raise ValueError(f"{name} must be [batch, time], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"{name} has length 0 (shape {tuple(input_ids.shape)}); pass at least one token")
    if input_ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}) "
                         f"(vocab_size={vocab_size}); the tokenizer and the model's config disagree: use the "
                         "model's tokenizer, or resize the embeddings (resize_token_embeddings)")


def check_inputs_embeds(inputs_embeds, hidden_size: int, weight: torch.Tensor) -> None:
    """`inputs_embeds` must be a [B, T, hidden_size] floating tensor (T >= 1) in the weights' dtype,
    unless autocast is on for its device (it casts per op)."""
    if not isinstance(inputs_embeds, torch.Tensor):
        raise TypeError(f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}")
    if not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds must be a floating-point tensor, got dtype {inputs_embeds.dtype}; "
                        "token ids go in input_ids=")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(f"inputs_embeds must be [batch, time, hidden_size={hidden_size}], got shape "
                         f"{tuple(inputs_embeds.shape)}")
    if inputs_embeds.shape[1] == 0:
        raise ValueError(f"inputs_embeds has length 0 (shape {tuple(inputs_embeds.shape)}); pass at least one token")
    check_dtype("inputs_embeds", inputs_embeds, weight)


def check_dtype(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """A floating `x` must match `weight`'s dtype unless autocast is enabled on its device."""
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the model's weights are {weight.dtype}; cast one to the "
                        f"other ({name}.to({weight.dtype}) or model.to({x.dtype})) or run under torch.autocast")


def check_labels(labels, batch: int, time: int, vocab_size: int) -> int:
    """`labels` must be a [batch, time] integer tensor of ids in [0, vocab_size) or -100.

    Returns:
        the number of scored targets (labels at positions 1..T-1 that are not -100).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of token ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids (torch.long), got dtype {labels.dtype}")
    if tuple(labels.shape) != (batch, time):
        raise ValueError(f"labels must have shape {(batch, time)} (batch, time: the inputs' shape), got "
                         f"{tuple(labels.shape)} (labels are aligned with the inputs and shifted inside)")
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    n, lo, hi = (int(v) for v in torch.stack([scored.sum(), torch.where(scored, targets, 0).min(),
                                              torch.where(scored, targets, 0).max()]).tolist()) \
        if targets.numel() else (0, 0, 0)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels hold {bad}, neither a token id in [0, {vocab_size}) nor the ignore index "
                         f"{IGNORE_INDEX}")
    return n


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   pad_last: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at t [B, T, V] score labels at t + 1 [B, T]; -100 ignored.

    Args:
        pad_last: False scores `logits[:, :-1]` against `labels[:, 1:]` (the TTT model, as the official
            code); True scores every position against the labels shifted left and padded with -100 (the
            LaCT model, as its reference). Same mean, summed in another order: each model keeps its own
            so its losses stay bit-identical to its fixtures and earlier runs.

    With no scored target (T = 1, or all labels after position 0 are -100) the loss is 0 with zero
    gradients, and a warning says so (see the module docstring).
    """
    B, T = logits.shape[:2]
    n = check_labels(labels, B, T, vocab_size)
    labels = labels.to(logits.device)
    if pad_last:
        pred = logits.float().reshape(-1, logits.shape[-1])
        target = torch.cat((labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)), dim=1).reshape(-1)
    else:
        pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        target = labels[:, 1:].reshape(-1)
    target = target.long()
    if n == 0:
        warnings.warn(f"labels of shape {tuple(labels.shape)} hold no scored next-token target (T = 1, or every "
                      f"label after the first position is {IGNORE_INDEX}): the loss is 0 with zero gradients",
                      UserWarning, stacklevel=3)
        return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)


def lm_logits_and_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None,
                       logits_to_keep: int = 0, pad_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The causal LMs' head: logits [B, T or logits_to_keep, V] of the final hidden states [B, T, D] and,
    with `labels` [B, T], `causal_lm_loss` (`pad_last` as there; None without labels).

    Raises:
        ValueError: labels together with logits_to_keep > 0 (the loss needs every position's logits).
    """
    logits = lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
    if labels is None:
        return logits, None
    if logits_to_keep:
        raise ValueError(f"logits_to_keep={logits_to_keep} with labels: the loss needs every "
                         "position's logits; pass logits_to_keep=0")
    return logits, causal_lm_loss(logits, labels, logits.shape[-1], pad_last=pad_last)


def has_left_padding(mask: torch.Tensor) -> bool:
    """Whether a [B, S] bool padding mask (True = real token) has a 0 before a 1 in some row: left
    padding, which a TTT / fast-weight layer (no padding mask) would learn from."""
    return bool((~mask[:, :-1] & mask[:, 1:]).any())
