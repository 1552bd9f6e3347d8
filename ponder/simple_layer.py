"""PonderTTT's own TTT layer in PyTorch: a faithful port plus a causal variant for experiments.

Reproduces `TTTLayer` of deveworld/ponderTTT at commit 350afb5 (`src/ponderttt/models/ttt_layer.py`,
helpers in `fast_weights.py`), value for value (checked against `parity/fixtures/ponder/`):

* qkv projection (one bias-free Dense D -> 3D), SwiGLU fast weights `f(W; u) = (silu(u w0) * (u w2)) w1`
  over the full width, each head's output reduced to ONE scalar by a dot product with q, and an
  output projection from the H per-head scalars back to D.
* feed-forward mode (`enable_internal_updates=False`, what the 350afb5 model used): keys scaled by
  1/sqrt(D), hidden scaled by 1/sqrt(F), no update.
* update mode (`True`): for chunk c in order, the MSE of `f(W; k_c)` against `v_c` (mean over batch,
  chunk and width), one gradient step `W <- W - 0.001 grad`, and the chunk's output from the
  UPDATED W. One W shared by all batch rows.

The update mode leaks: every token of a chunk is produced by a W that has read the whole chunk, and
batch rows see each other. `forward_causal` is the variant the experiments use: one W per sequence,
mini-batch b is produced with the W updated on mini-batches < b only, then W takes k gradient steps
on mini-batch b (k = `inner_steps`, the UPDATE_k rule). State is explicit so chunks of a document
can be processed one at a time.

Layouts: x [B, T, D]; fast weights in the flax layout `w0, w2: [D, F]`, `w1: [F, D]` (per-sequence
copies in a state: `[B, D, F]` / `[B, F, D]`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SimpleTTTConfig:
    """Configuration of `PonderSimpleTTTLayer` (field names of PonderTTT's `TTTConfig`).

    Args:
        hidden_dim: D, input and output width.
        num_heads: H; `num_heads * head_dim` must equal `hidden_dim`.
        head_dim: d.
        ttt_hidden_dim: F, hidden width of the SwiGLU fast weights.
        chunk_size: C, tokens per inner update (the faithful update mode needs T % C == 0; the
            causal variant uses it as its mini-batch size and accepts any T).
        max_seq_length, dropout_rate: kept for compatibility; dropout is applied only in training
            mode when `dropout_rate > 0` and `deterministic=False`.
        inner_lr: inner learning rate (hard-coded 1e-3 in the original layer).
        fast_init_std: std of the fast-weight init (0.02 in the original).
    """

    hidden_dim: int = 768
    num_heads: int = 12
    head_dim: int = 64
    ttt_hidden_dim: int = 2048
    chunk_size: int = 512
    max_seq_length: int = 8192
    dropout_rate: float = 0.1
    inner_lr: float = 1e-3
    fast_init_std: float = 0.02

    def __post_init__(self):
        for name in ("hidden_dim", "num_heads", "head_dim", "ttt_hidden_dim", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SimpleTTTConfig.{name}={value!r} must be a positive int")
        if self.num_heads * self.head_dim != self.hidden_dim:
            raise ValueError(f"SimpleTTTConfig: num_heads * head_dim = {self.num_heads} * {self.head_dim} = "
                             f"{self.num_heads * self.head_dim} must equal hidden_dim={self.hidden_dim} "
                             "(q is split into heads of head_dim channels)")


@dataclass
class SimpleTTTState:
    """Per-sequence fast weights of the causal variant: w0, w2 [B, D, F], w1 [B, F, D]."""

    w0: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    seen_tokens: int = 0

    def detach(self) -> SimpleTTTState:
        return SimpleTTTState(self.w0.detach(), self.w1.detach(), self.w2.detach(), self.seen_tokens)


def swiglu_fast_weights(u: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """`f(W; u) = (silu(u w0) * (u w2)) w1`; u [B, C, D], W shared ([D, F]) or per row ([B, D, F])."""
    return (F.silu(u @ w0) * (u @ w2)) @ w1


def swiglu_mse_grads(u: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """Per-row MSE of `f(W; u)` against `v` and its analytic gradient wrt W.

    Written out by hand (not `torch.autograd.grad`) so that it also runs under `torch.no_grad`; it is
    built from differentiable ops, so outer gradients flow through it (second-order terms included).

    Args:
        u, v: [B, C, D] inputs and targets of the reconstruction.
        w0, w2: [D, F] or [B, D, F]; w1: [F, D] or [B, F, D].

    Returns:
        loss [B] (mean over C and D of each row) and the gradients (g0, g1, g2) of each row's loss,
        each [B, ...] like a per-row W.
    """
    a = u @ w0                      # [B, C, F]
    b = u @ w2                      # [B, C, F]
    sig = torch.sigmoid(a)
    g = a * sig                     # silu(a)
    h = g * b
    y = h @ w1                      # [B, C, D]
    diff = y - v
    n = diff.shape[-2] * diff.shape[-1]
    loss = diff.pow(2).sum(dim=(-2, -1)) / n
    dy = diff * (2.0 / n)
    g1 = h.transpose(-1, -2) @ dy                      # [B, F, D]
    dh = dy @ w1.transpose(-1, -2)                     # [B, C, F]
    da = dh * b * (sig * (1 + a * (1 - sig)))          # d silu(a) / da = sig (1 + a (1 - sig))
    db = dh * g
    g0 = u.transpose(-1, -2) @ da                      # [B, D, F]
    g2 = u.transpose(-1, -2) @ db
    return loss, (g0, g1, g2)


def _lecun_normal_(weight: torch.Tensor, fan_in: int) -> None:
    # flax Dense's default kernel init: truncated normal (+-2 std) with variance 1/fan_in after truncation
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class PonderSimpleTTTLayer(nn.Module):
    """PonderTTT's `TTTLayer` (350afb5): see the module docstring.

    Parameters: `qkv_proj` (Linear D -> 3D, no bias), `fast_w0` [D, F], `fast_w1` [F, D], `fast_w2` [D, F],
    `output_proj` (Linear H -> D, no bias). Torch Linear weights are the transposed flax kernels.
    """

    def __init__(self, config: SimpleTTTConfig):
        super().__init__()
        self.config = config
        D, H, Fh = config.hidden_dim, config.num_heads, config.ttt_hidden_dim
        self.qkv_proj = nn.Linear(D, 3 * D, bias=False)
        self.fast_w0 = nn.Parameter(torch.empty(D, Fh))
        self.fast_w1 = nn.Parameter(torch.empty(Fh, D))
        self.fast_w2 = nn.Parameter(torch.empty(D, Fh))
        self.output_proj = nn.Linear(H, D, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg = self.config
        _lecun_normal_(self.qkv_proj.weight, cfg.hidden_dim)
        _lecun_normal_(self.output_proj.weight, cfg.num_heads)
        for w in (self.fast_w0, self.fast_w1, self.fast_w2):
            nn.init.normal_(w, std=cfg.fast_init_std)

    # -- shared pieces ------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.config.hidden_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a [B, T, D={self.config.hidden_dim}] tensor, got {shape}")

    def _reduce_heads(self, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T, _ = q.shape
        H, d = self.config.num_heads, self.config.head_dim
        o = (q.view(B, T, H, d) * y.view(B, T, H, d)).sum(-1)  # [B, T, H]: one scalar per head
        out = self.output_proj(o)
        return self.dropout(out) if self.training else out

    # -- faithful port ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, enable_internal_updates: bool = False) -> tuple[torch.Tensor, dict]:
        """The original layer, value for value.

        Args:
            x: [B, T, D]. In update mode T must be a multiple of `chunk_size`.
            enable_internal_updates: False = feed-forward mode, True = the chunked update mode
                (non-causal within a chunk; batch rows share W).

        Returns:
            out [B, T, D] and stats {"ttt_loss": scalar tensor (mean pre-update chunk MSE; 0 in
            feed-forward mode), "num_chunks": int}.
        """
        self._check_input(x)
        cfg = self.config
        B, T, D = x.shape
        q, k, v = self.qkv_proj(x).split(D, dim=-1)
        if not enable_internal_updates:
            u = k / math.sqrt(D)
            y = (F.silu(u @ self.fast_w0) * (u @ self.fast_w2)) / math.sqrt(cfg.ttt_hidden_dim) @ self.fast_w1
            return self._reduce_heads(q, y), {"ttt_loss": x.new_zeros(()), "num_chunks": 0}
        C = cfg.chunk_size
        if T % C != 0:
            raise ValueError(f"update mode: sequence length T={T} must be a multiple of chunk_size={C} "
                             f"(the original layer's shapes do not line up otherwise); pad to "
                             f"{-(-T // C) * C} tokens or use forward_causal, which accepts any T")
        w0, w1, w2 = self.fast_w0, self.fast_w1, self.fast_w2
        outs, losses = [], []
        for s in range(0, T, C):
            k_c, v_c = k[:, s:s + C], v[:, s:s + C]
            loss_b, (g0, g1, g2) = swiglu_mse_grads(k_c, v_c, w0, w1, w2)
            # one W for all rows: the loss is the mean over rows, so its gradient is the mean of theirs
            w0 = w0 - cfg.inner_lr * g0.mean(0)
            w1 = w1 - cfg.inner_lr * g1.mean(0)
            w2 = w2 - cfg.inner_lr * g2.mean(0)
            outs.append(swiglu_fast_weights(k_c, w0, w1, w2))  # produced by the already-updated W
            losses.append(loss_b.mean())
        y = torch.cat(outs, dim=1)
        stats = {"ttt_loss": torch.stack(losses).mean(), "num_chunks": T // C}
        return self._reduce_heads(q, y), stats

    # -- causal variant -----------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> SimpleTTTState:
        """Fresh per-sequence fast weights (views of the slow weights, so outer gradients reach them)."""
        return SimpleTTTState(self.fast_w0.expand(batch_size, -1, -1), self.fast_w1.expand(batch_size, -1, -1),
                              self.fast_w2.expand(batch_size, -1, -1), 0)

    def forward_causal(self, x: torch.Tensor, state: SimpleTTTState | None = None, inner_steps: int = 1,
                       ) -> tuple[torch.Tensor, dict, SimpleTTTState]:
        """Causal chunked update: mini-batch b is produced by W updated on mini-batches < b only.

        Args:
            x: [B, T, D], any T. Mini-batches are `chunk_size` tokens; a trailing partial mini-batch
                is produced and then learned from like a full one, so processing a sequence in
                pieces equals processing it whole when the cuts fall on multiples of `chunk_size`.
            state: carried per-sequence fast weights (None: fresh from the slow weights).
            inner_steps: k >= 0 gradient steps per mini-batch (0: no update, pure feed-forward
                through the carried W).

        Returns:
            out [B, T, D]; stats {"recon_loss": [B, n_mb] self-supervised MSE of each mini-batch at
            the state before its update}; the new state.
        """
        self._check_input(x)
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps={inner_steps!r} must be an int >= 0")
        cfg = self.config
        B, T, D = x.shape
        if state is None:
            state = self.init_state(B)
        elif state.w0.shape[0] != B:
            raise ValueError(f"state holds {state.w0.shape[0]} sequences but x has batch size {B}")
        q, k, v = self.qkv_proj(x).split(D, dim=-1)
        w0, w1, w2 = state.w0, state.w1, state.w2
        outs, recon = [], []
        C = cfg.chunk_size
        for s in range(0, T, C):
            k_c, v_c = k[:, s:s + C], v[:, s:s + C]
            outs.append(swiglu_fast_weights(k_c, w0, w1, w2))  # W has seen only earlier mini-batches
            for step in range(max(inner_steps, 1)):
                loss_b, (g0, g1, g2) = swiglu_mse_grads(k_c, v_c, w0, w1, w2)
                if step == 0:
                    recon.append(loss_b)
                if inner_steps == 0:
                    break
                w0, w1, w2 = w0 - cfg.inner_lr * g0, w1 - cfg.inner_lr * g1, w2 - cfg.inner_lr * g2
        y = torch.cat(outs, dim=1)
        stats = {"recon_loss": torch.stack(recon, dim=1)}
        return self._reduce_heads(q, y), stats, SimpleTTTState(w0, w1, w2, state.seen_tokens + T)

    # -- flax parameter loading ---------------------------------------------------------------------
    @torch.no_grad()
    def load_flax_params(self, params: dict) -> None:
        """Copy parameters given in the flax layout (`qkv_proj/kernel` [D, 3D], `fast_w0` [D, F], ...)."""
        expected = {"qkv_proj/kernel": (self.qkv_proj.weight, True), "output_proj/kernel": (self.output_proj.weight, True),
                    "fast_w0": (self.fast_w0, False), "fast_w1": (self.fast_w1, False), "fast_w2": (self.fast_w2, False)}
        missing = sorted(set(expected) - set(params))
        if missing:
            raise KeyError(f"load_flax_params: missing {missing}; got {sorted(params)}")
        for key, (dst, transpose) in expected.items():
            src = torch.as_tensor(params[key], dtype=dst.dtype)
            src = src.T if transpose else src
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"load_flax_params: {key} has shape {tuple(params[key].shape)}, expected "
                                 f"{tuple(dst.T.shape) if transpose else tuple(dst.shape)}")
            dst.copy_(src)
