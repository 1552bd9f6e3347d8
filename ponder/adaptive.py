"""The adaptive TTT path on top of a frozen LM: pre-norm -> TTT layer -> residual add -> tied LM head.

Reproduces the composition of the PonderTTT paper version (deveworld/ponderTTT, later history:
"When to Ponder"): the frozen backbone's last hidden state h goes through an RMS pre-norm and one
TTT layer whose output is added back to h, and the result is scored by an LM head tied to the
backbone's frozen input embeddings. SKIP bypasses all of it and uses the backbone's own logits.

Layer kinds (`--ttt-layer`):
* `official-linear` (default) / `official-mlp`: the official TTT-Linear / TTT-MLP of
  `official_port.layers` (dual form; `inner_steps=k` is the UPDATE_k rule, exactly the official
  computation for k = 1), state = the official layer's carried inner state.
* `ponder-simple`: PonderTTT's own layer (`ponder.simple_layer`) in its causal variant (one W per
  sequence; mini-batch b produced by W updated on mini-batches < b).

One addition to the paper's composition: a learnable residual gain (one value per channel)
initialised to 0, so the untrained model reproduces SKIP exactly and training starts from the
backbone's quality rather than from a random perturbation of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ponder.simple_layer import PonderSimpleTTTLayer, SimpleTTTConfig

LAYER_KINDS = ("official-linear", "official-mlp", "ponder-simple")


@dataclass
class AdaptiveConfig:
    """Configuration of `AdaptiveLM`.

    Args:
        hidden_size: D of the backbone.
        layer: one of `LAYER_KINDS`.
        num_heads: TTT heads (0: D // 64, at least 1, adjusted down to a divisor of D).
        mini_batch_size: TTT mini-batch size (official m = 16; the simple layer's chunk_size).
        ttt_base_lr: official layers' base inner learning rate (official default 1.0).
        simple_inner_lr: inner learning rate of `ponder-simple` (the original hard-codes 1e-3).
        simple_hidden_mult: F = mult * D for `ponder-simple`.
        norm_eps: RMS pre-norm epsilon.
    """

    hidden_size: int
    layer: str = "official-linear"
    num_heads: int = 0
    mini_batch_size: int = 16
    ttt_base_lr: float = 1.0
    simple_inner_lr: float = 1e-3
    simple_hidden_mult: int = 2
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.layer not in LAYER_KINDS:
            raise ValueError(f"--ttt-layer {self.layer!r} is not one of {LAYER_KINDS}")
        if self.hidden_size < 1 or self.mini_batch_size < 1:
            raise ValueError(f"AdaptiveConfig: hidden_size={self.hidden_size} and mini_batch_size="
                             f"{self.mini_batch_size} must be >= 1")
        if self.num_heads <= 0:
            heads = max(1, self.hidden_size // 64)
            while self.hidden_size % heads:
                heads -= 1
            self.num_heads = heads
        if self.hidden_size % self.num_heads:
            raise ValueError(f"AdaptiveConfig: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}; pick a divisor")

    def to_dict(self) -> dict:
        return asdict(self)


class _SimpleAdapter(nn.Module):
    """Uniform interface over the causal PonderTTT layer."""

    def __init__(self, cfg: AdaptiveConfig):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.layer = PonderSimpleTTTLayer(SimpleTTTConfig(
            hidden_dim=D, num_heads=H, head_dim=D // H, ttt_hidden_dim=cfg.simple_hidden_mult * D,
            chunk_size=cfg.mini_batch_size, dropout_rate=0.0, inner_lr=cfg.simple_inner_lr))

    def forward(self, x, state, inner_steps):
        out, stats, new_state = self.layer.forward_causal(x, state=state, inner_steps=inner_steps)
        return out, stats["recon_loss"].mean(-1), new_state

    def rewind(self, before, after, batch_size: int):
        from ponder.simple_layer import SimpleTTTState

        seen = before.seen_tokens if before is not None else 0
        return SimpleTTTState(after.w0, after.w1, after.w2, seen)


class _OfficialAdapter(nn.Module):
    """Uniform interface over `official_port.layers.TTT_LAYERS[...]`."""

    def __init__(self, cfg: AdaptiveConfig):
        super().__init__()
        from official_port.configuration_ttt import TTTConfig
        from official_port.layers import TTT_LAYERS

        name = {"official-linear": "ttt_linear", "official-mlp": "ttt_mlp"}[cfg.layer]
        self.config = TTTConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                                intermediate_size=4 * cfg.hidden_size, num_hidden_layers=1,
                                mini_batch_size=cfg.mini_batch_size, ttt_base_lr=cfg.ttt_base_lr,
                                seq_modeling_block=name, vocab_size=8)
        self.layer = TTT_LAYERS[name](self.config)

    def forward(self, x, state, inner_steps):
        # STATIC (inner_steps=0): every inner learning rate x 0, so each update subtracts exactly 0
        out, stats, new_state = self.layer(x, state=state, output_ttt_stats=True, inner_steps=max(1, inner_steps),
                                           ttt_lr_mult=1.0 if inner_steps else 0.0)
        return out, official_recon_loss(stats, x.shape[0]), new_state

    def rewind(self, before, after, batch_size: int):
        import dataclasses

        from official_port.layers import TTTState

        before = before if before is not None else self.layer.initial_state(batch_size)
        inner = dataclasses.replace(before.inner, params=after.inner.params)
        return TTTState(inner, before.conv_cache, before.seen_tokens)


def official_recon_loss(stats, batch_size: int) -> torch.Tensor:
    """Reconstruction loss [B] from the official stats: index 2, `ttt_loss_mse_step_0` (each
    completed mini-batch's loss at the state before its update; `official_port` averages it over
    batch rows and heads), averaged over the mini-batches completed in the call. NaN when the call
    completed none (fewer than `mini_batch_size` new tokens)."""
    s = torch.as_tensor(stats[2]).detach().float()
    value = s.mean() if s.numel() else s.new_tensor(float("nan"))
    return value.expand(batch_size)


class AdaptiveLM(nn.Module):
    """pre-norm -> TTT layer -> residual add -> frozen tied head (see module docstring).

    Args:
        config: `AdaptiveConfig`.
        embedding: the backbone's frozen input embeddings [V, D] (kept as a non-persistent buffer:
            it belongs to the backbone and is not saved in this model's checkpoints).
    """

    def __init__(self, config: AdaptiveConfig, embedding: torch.Tensor):
        super().__init__()
        if embedding.dim() != 2 or embedding.shape[1] != config.hidden_size:
            raise ValueError(f"embedding must be [V, D={config.hidden_size}], got {tuple(embedding.shape)}")
        self.config = config
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.ttt = _SimpleAdapter(config) if config.layer == "ponder-simple" else _OfficialAdapter(config)
        self.residual_gain = nn.Parameter(torch.zeros(config.hidden_size))
        self.register_buffer("head_weight", embedding.detach(), persistent=False)

    def adapt(self, hidden: torch.Tensor, state=None, inner_steps: int = 1):
        """Run the adaptive layer on one window of backbone hidden states.

        Args:
            hidden: [B, T, D] backbone last hidden states.
            state: carried TTT state (None: fresh from the slow weights).
            inner_steps: k of UPDATE_k (>= 1), or 0 for STATIC: the layer with its inner updates
                off (every token read by the carried fast weights; the returned state's fast weights
                are the carried ones).

        Returns:
            adapted hidden [B, T, D], per-sequence reconstruction loss [B] (each mini-batch's
            self-supervised loss at the state before its update, averaged), new state.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden must be [B, T, D={self.config.hidden_size}], got {tuple(hidden.shape)}")
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps={inner_steps!r} must be an int >= 0 (0: STATIC; SKIP does not call "
                             "the layer)")
        out, recon, new_state = self.ttt(self.norm(hidden), state, inner_steps)
        return hidden + self.residual_gain * out, recon, new_state

    def paper_reforward(self, hidden: torch.Tensor, state=None, inner_steps: int = 1):
        """The paper's UPDATE_k (NOT causal): k inner steps on the chunk, then the SAME chunk is
        re-forwarded through the updated fast weights (no further updates) and that output is scored,
        so every token is predicted by weights that were fitted on it and on the tokens after it.

        Returns:
            re-forwarded adapted hidden [B, T, D], reconstruction loss [B] of the update pass, and the
            state after the update (carried to the next chunk).
        """
        _, recon, after = self.adapt(hidden, state, inner_steps)
        rewound = self.ttt.rewind(state, after, hidden.shape[0])  # updated weights, positions as before
        out, _, _ = self.adapt(hidden, rewound, 0)
        return out, recon, after

    def logits(self, adapted: torch.Tensor) -> torch.Tensor:
        """Tied LM head: [..., D] -> [..., V]."""
        return adapted @ self.head_weight.T

    def lm_loss(self, adapted: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy within the window: logits at t score token t + 1.

        Args:
            adapted: [B, T, D]; input_ids: [B, T].
        """
        logits = self.logits(adapted[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def detach_state(state):
    """Detach a carried TTT state (any of the layer kinds) from the autograd graph."""
    if state is None:
        return None
    if hasattr(state, "detach"):
        return state.detach()
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(v) for v in state)
    return state
