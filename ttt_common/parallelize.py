"""Apply activation checkpointing, torch.compile and FSDP2 to a model from the outside.

The torchtitan recipe (`pytorch/torchtitan`, `torchtitan/models/llama3/infra/parallelize.py` with the
mechanics in `torchtitan/distributed/{fsdp,activation_checkpoint}.py`), made generic over Hugging Face
`PreTrainedModel`s: the repeated blocks are the modules whose class name is listed in the model's
`_no_split_modules`. Order, as in torchtitan: activation checkpointing, then compile (per block), then
`fully_shard` per block and finally on the root. The models themselves never import
`torch.distributed`.

Also holds the meta-device helpers the training script needs to build a model without allocating
its parameters (`meta_parameters`) and to rematerialise it after sharding (`materialize`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def find_blocks(model: nn.Module, block_names: list[str] | tuple[str, ...] | None = None) -> list[tuple[nn.Module, str, nn.Module]]:
    """The repeated blocks of `model`, outermost only, in registration order.

    Args:
        model: the model (typically a `PreTrainedModel`).
        block_names: class names of the blocks; default: `model._no_split_modules`.

    Returns:
        list of `(parent, attribute_name, block)`; `getattr(parent, attribute_name) is block`.
    """
    names = set(block_names if block_names is not None else (getattr(model, "_no_split_modules", None) or []))
    if not names:
        raise ValueError(f"{type(model).__name__} declares no `_no_split_modules` and no block_names were given: "
                         "cannot tell which modules are its repeated blocks; pass block_names=['MyBlock']")
    found: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module) -> None:
        for attr, child in parent.named_children():
            # compiled / checkpoint-wrapped blocks keep the original class on their inner module
            inner = getattr(child, "_checkpoint_wrapped_module", child)
            if type(inner).__name__ in names:
                found.append((parent, attr, child))
            else:
                visit(child)

    visit(model)
    if not found:
        raise ValueError(f"no module of class {sorted(names)} found in {type(model).__name__}; "
                         "check `_no_split_modules` or pass block_names")
    return found


def apply_activation_checkpointing(model: nn.Module, block_names: list[str] | None = None) -> int:
    """Wrap every block in a non-reentrant activation-checkpoint wrapper (full AC per block).

    The wrapper's state-dict hooks strip its `_checkpoint_wrapped_module.` prefix, so parameter
    names and checkpoints are unchanged. Returns the number of wrapped blocks.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    blocks = find_blocks(model, block_names)
    for parent, attr, block in blocks:
        # non-reentrant: supports keyword arguments (HF blocks get position embeddings, masks as kwargs)
        # and custom autograd.Functions inside (LaCT's manual backprop) recompute correctly
        setattr(parent, attr, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                 preserve_rng_state=True))
    return len(blocks)


def apply_compile(model: nn.Module, block_names: list[str] | None = None) -> int:
    """`torch.compile` each block in place (`Module.compile`, so parameter names do not change).

    Per block rather than the whole model: the blocks are identical, so one compiled graph is reused,
    and FSDP2's hooks stay outside the compiled regions. Returns the number of compiled blocks.
    """
    blocks = find_blocks(model, block_names)
    for _, _, block in blocks:
        block.compile()
    return len(blocks)


def apply_fsdp(model: nn.Module, mesh=None, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True,
               block_names: list[str] | None = None) -> int:
    """FSDP2: `fully_shard` every block, then the root (embeddings, final norm, head; tied weights ok).

    Args:
        model: the model; modified in place (its class becomes an `FSDPModule` subclass).
        mesh: a 1-D `DeviceMesh`; default: the default process group's world.
        param_dtype: dtype of the unsharded parameters used in forward/backward (e.g. bf16); None keeps
            the stored dtype (fp32 training).
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 keeps the all-reduce exact enough to
            match a single-process run).
        reshard_after_forward: free unsharded block parameters after forward (ZeRO-3); the root is never
            resharded after forward since backward needs it first.

    Returns:
        the number of sharded blocks.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = find_blocks(model, block_names)
    for _, _, block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return len(blocks)


def parallelize(model: nn.Module, *, activation_checkpointing: bool = False, compile: bool = False,
                fsdp: bool = True, mesh=None, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype = torch.float32, block_names: list[str] | None = None) -> nn.Module:
    """AC -> compile -> FSDP2, in torchtitan's order. Works on a meta-device model.

    Args:
        model: a model whose repeated blocks are named by `_no_split_modules` (or `block_names`).
        activation_checkpointing: recompute each block's activations in backward.
        compile: `torch.compile` each block.
        fsdp: shard with FSDP2 (needs an initialised process group; a 1-rank group is fine).
        mesh, param_dtype, reduce_dtype: see `apply_fsdp`.

    Returns:
        the same model object, modified in place.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model, block_names)
    if compile:
        apply_compile(model, block_names)
    if fsdp:
        apply_fsdp(model, mesh=mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype, block_names=block_names)
    return model


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Create parameters on the meta device, buffers on the CPU as usual.

    Buffers such as rotary frequencies are non-persistent (absent from state dicts), so they must be
    computed for real at construction; parameters are loaded or initialised after sharding.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """`to_empty(device)` keeping the values of all buffers (parameters are left uninitialised).

    Call after `parallelize` on a model built under `meta_parameters`, then load / broadcast weights.
    """
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers() if buf.device.type != "meta"}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in saved:
                buf.copy_(saved[name].to(buf.device))
