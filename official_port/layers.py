"""The official TTT layers in PyTorch: `TTTLinear`, `TTTMLP`, `TTTLinearBase`, `TTTMLPBase`.

Reproduces test-time-training/ttt-lm-jax `ttt/models/ttt_layer.py` (`TTTBase` and subclasses):
Q/K/V projections (a shared `wq` followed by two causal depthwise convolutions for the non-Base
variants), interleaved-pair RoPE at positions modulo the mini-batch size, the per-head learnable
inner learning rate, the dual-form inner loop (`official_port.ops`), `post_norm`, the GELU gate
and `wo`, plus the four TTT statistics in the official order.

Beyond the reference: any sequence length, a carried `TTTState` (split processing == whole,
token-by-token decoding), `inner_steps > 1`, remat of mini-batch groups and an fp32 inner loop
under CUDA autocast. Parameter names keep the flax layout (see `flax_layer_params_to_torch`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from official_port.configuration_ttt import TTTConfig
from official_port.ops import InnerState, c_scan, dual_ttt, naive_ttt
from official_port.ops.triton_dual import resolve_kernel, triton_ttt
from ttt_common.model_inputs import check_dtype
from ttt_common.modules import apply_rotary_interleaved, rope_cos_sin

LN_EPS = 1e-6


@dataclass
class TTTState:
    """Everything a TTT layer needs to continue a sequence.

    Attributes:
        inner: `InnerState`: inner params at the last mini-batch boundary (`[B, H, ...]`) and the
            keys/values/gates of the current partial mini-batch (its length = `seen_tokens % m`).
        conv_cache: `[B, conv_width - 1, D]` the last inputs of `conv_q`/`conv_k` (both convolve
            the same `wq` projection, so one cache serves both); None for the Base variants.
        seen_tokens: tokens of the sequence processed so far (mini-batch boundaries and default
            positions follow it).
    """

    inner: InnerState
    conv_cache: Tensor | None
    seen_tokens: int

    def detach(self) -> TTTState:
        """The same state cut from the autograd graph (e.g. truncated backprop through time)."""
        cache = self.conv_cache.detach() if self.conv_cache is not None else None
        return TTTState(self.inner.detach(), cache, self.seen_tokens)


def rope_table(n: int, d: int, theta: float, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin `[n, d/2]` of positions 0..n-1 (the official numpy table: float64, then rounded to dtype)."""
    return rope_cos_sin(torch.arange(n, device=device), d, theta, dtype, correctly_rounded=True)


def rope_interleaved(xs: tuple[Tensor, ...], positions: Tensor, theta: float, num_positions: int | None = None,
                     inplace: bool = False) -> tuple[Tensor, ...]:
    """Rotate interleaved pairs `(x[2i], x[2i+1])` by `positions * theta^(-2i/d)` (official `apply_rotary_emb`)
    in each x of xs (e.g. queries and keys), with one angle table for all.

    The angle table and the rotation are the shared ones of `ttt_common.modules` (`rope_cos_sin`,
    `apply_rotary_interleaved`), the same the official model's attention uses.

    Args:
        xs: tensors `[B, T, ..., d]` of one dtype (e.g. `[B, T, H, d]` queries and keys).
        positions: `[B, T]` integers in `[0, num_positions)` (the TTT layer passes `position_ids % m`;
            the table then has only m rows).
        num_positions: table size (default `positions.max() + 1`).
        inplace: rotate each x itself where `apply_rotary_interleaved` can.
    Returns:
        one tensor per x, its shape and dtype (computed in float32, or float64 for float64 inputs).
    """
    x0 = xs[0]
    n = int(num_positions) if num_positions is not None else int(positions.max()) + 1
    table = torch.float64 if x0.dtype == torch.float64 else torch.float32
    cos, sin = rope_table(n, x0.shape[-1], theta, x0.device, table)
    cos, sin = cos[positions], sin[positions]
    return tuple(apply_rotary_interleaved(x, cos, sin, inplace=inplace) for x in xs)


class _CausalConvPair(torch.autograd.Function):
    """Two depthwise causal convolutions of one input, in the `[B, T, D]` layout.

    `out_c[b, t, :] = bias[c] + sum_k kern[k, c] * a_ext[b, t + k]` for c in (q, k): w shifted
    multiply-adds (F.conv1d wants `[B, D, T]` and would cost two transposing copies each way).
    Two outputs rather than one `[B, T, 2, D]`: at 125m width and B 4 that tensor is 50 MB, over
    glibc's 32 MB mmap ceiling, so every call would map (and fault in) fresh pages for it.
    The backward is written out because autograd's through broadcasting multiply-adds makes a
    temporary per term; `official_port.layers` tests it against F.conv1d and float64 gradcheck."""

    @staticmethod
    def forward(ctx, a_ext: Tensor, kern: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        w = kern.shape[0]
        T = a_ext.shape[1] - w + 1
        outs = []
        for c in range(2):
            out = torch.addcmul(bias[c], a_ext[:, 0:T], kern[0, c])  # [B, T, D]
            for k in range(1, w):
                out.addcmul_(a_ext[:, k:k + T], kern[k, c])
            outs.append(out)
        ctx.save_for_backward(a_ext, kern)
        return outs[0], outs[1]

    @staticmethod
    def backward(ctx, gq: Tensor, gk: Tensor):
        a_ext, kern = ctx.saved_tensors
        w = kern.shape[0]
        T = a_ext.shape[1] - w + 1
        gq, gk = gq.contiguous(), gk.contiguous()  # [B, T, D] each
        g_a = g_kern = None
        if ctx.needs_input_grad[0]:
            g_a = a_ext.new_zeros(a_ext.shape)
            for k in range(w):
                g_a[:, k:k + T].addcmul_(gq, kern[k, 0]).addcmul_(gk, kern[k, 1])
        if ctx.needs_input_grad[1]:
            g_kern = torch.stack([torch.stack([(gc * a_ext[:, k:k + T]).sum((0, 1)) for gc in (gq, gk)])
                                  for k in range(w)])
        g_bias = torch.stack([gq.sum((0, 1)), gk.sum((0, 1))]) if ctx.needs_input_grad[2] else None
        return g_a, g_kern, g_bias


def causal_conv_pair(a_ext: Tensor, kern: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """`[B, w-1+T, D]` (left-extended input), `[w, 2, D]` kernels, `[2, D]` biases -> two `[B, T, D]`."""
    return _CausalConvPair.apply(a_ext, kern, bias)


class TTTBase(nn.Module):
    """Common part of the four official TTT layers (do not instantiate directly).

    Args:
        config: `TTTConfig`; uses hidden_size, num_attention_heads, mini_batch_size, rope_theta,
            ttt_base_lr, conv_width, initializer_range, remat_mini_batch_group_size.

    Attributes:
        remat: when True (and gradients are needed), groups of `remat_mini_batch_group_size`
            mini-batches run under `torch.utils.checkpoint` (the official code always remats;
            here it is opt-in because recomputation costs time; values are identical).
        use_naive: run the per-token primal twin instead of the dual form (tests, benchmarks).
        kernel: "torch" (the dual form), "triton" (`ops.triton_dual`: forward and backward kernels
            of the TTT-Linear and TTT-MLP scans), "c" (`ops.c_scan`, for float32 CPU calls without
            autograd, built on first use: the TTT-Linear and TTT-MLP scans and the gated output
            epilogue, post_norm and gelu(wg x) in one pass) or "auto" (triton on CUDA when importable,
            c on CPU when a C compiler is found). Calls the kernels do not cover (autograd for c,
            stats, inner_steps > 1, remat, unsupported sizes) run the torch dual form.
    """

    inner_kind = "linear"
    _c_warned = False  # one warning per process when kernel="auto" cannot build the C scan
    has_conv = False  # TTTLinear/TTTMLP: wq -> conv_q / conv_k; Base: wq, wk
    has_gate = False

    def __init__(self, config: TTTConfig, kernel: str = "auto"):
        super().__init__()
        resolve_kernel(kernel, torch.device("cpu"))  # checks the value early
        self.config = config
        self.kernel = kernel
        D, H = config.hidden_size, config.num_attention_heads
        self.width, self.num_heads, self.head_dim = D, H, config.head_dim
        self.mini_batch_size = int(config.mini_batch_size)
        d = self.head_dim
        hidden = d if self.inner_kind == "linear" else 4 * d
        self.wq = nn.Linear(D, D, bias=False)
        if self.has_conv:
            w = int(config.conv_width)
            self.conv_q = nn.Conv1d(D, D, w, groups=D, bias=True)
            self.conv_k = nn.Conv1d(D, D, w, groups=D, bias=True)
        else:
            self.wk = nn.Linear(D, D, bias=False)
        self.wv = nn.Linear(D, D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)
        if self.has_gate:
            self.wg = nn.Linear(D, D, bias=False)
        self.learnable_ttt_lr_weight = nn.Parameter(torch.empty(H, D))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.empty(H))
        self.learnable_token_idx = nn.Parameter(torch.empty(self.mini_batch_size))
        self.ttt_norm_weight = nn.Parameter(torch.empty(H, d))
        self.ttt_norm_bias = nn.Parameter(torch.empty(H, d))
        self.post_norm = nn.LayerNorm(D, eps=LN_EPS)
        self.W1 = nn.Parameter(torch.empty(H, d, hidden))
        self.b1 = nn.Parameter(torch.empty(H, 1, hidden))
        if self.inner_kind == "mlp":
            self.W2 = nn.Parameter(torch.empty(H, hidden, d))
            self.b2 = nn.Parameter(torch.empty(H, 1, d))
        self.remat = False
        self.use_naive = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: normal(initializer_range) for dense kernels, the lr gate kernel and the
        initial inner weights; flax's default conv init (lecun-normal kernel, zero bias); LayerNorm
        scales 1 and biases 0; zeros for `learnable_token_idx`, the lr gate bias and inner biases."""
        std = self.config.initializer_range
        for name in ("wq", "wk", "wv", "wo", "wg"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=std)
        if self.has_conv:
            # flax lecun_normal: truncated normal (+-2 std) with variance 1/fan_in, fan_in = width
            # (one input channel per group); 0.87962566 is the std of a unit normal truncated there.
            fan_in = self.conv_q.weight.shape[-1]
            for conv in (self.conv_q, self.conv_k):
                nn.init.trunc_normal_(conv.weight, std=1.0, a=-2.0, b=2.0)
                with torch.no_grad():
                    conv.weight.mul_(math.sqrt(1.0 / fan_in) / 0.87962566103423978)
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.learnable_ttt_lr_weight, std=std)
        nn.init.zeros_(self.learnable_ttt_lr_bias)
        nn.init.zeros_(self.learnable_token_idx)
        nn.init.ones_(self.ttt_norm_weight)
        nn.init.zeros_(self.ttt_norm_bias)
        self.post_norm.reset_parameters()
        nn.init.normal_(self.W1, std=std)
        nn.init.zeros_(self.b1)
        if self.inner_kind == "mlp":
            nn.init.normal_(self.W2, std=std)
            nn.init.zeros_(self.b2)

    # ------------------------------------------------------------------ pieces
    def inner_params(self) -> tuple[Tensor, ...]:
        """The learned initial inner parameters, each `[H, ...]`."""
        if self.inner_kind == "linear":
            return (self.W1, self.b1)
        return (self.W1, self.b1, self.W2, self.b2)

    def initial_state(self, batch_size: int) -> TTTState:
        """The state at the start of a sequence: learned inner params, empty caches."""
        cache = None
        if self.has_conv:
            cache = self.wq.weight.new_zeros(batch_size, self.conv_q.weight.shape[-1] - 1, self.width)
        return TTTState(InnerState.initial(self.inner_params(), batch_size), cache, 0)

    def token_eta(self) -> Tensor:
        """`[m]`: `max(0, 1/(i+1) + learnable_token_idx[i])`."""
        idx = torch.arange(1, self.mini_batch_size + 1, device=self.learnable_token_idx.device,
                           dtype=self.learnable_token_idx.dtype)
        return torch.clamp(1.0 / idx + self.learnable_token_idx, min=0.0)

    def ttt_gate(self, x: Tensor, ttt_lr_mult: float) -> Tensor:
        """`[B, H, T]`: `ttt_lr_mult * ttt_base_lr * sigmoid(x . w_h + b_h) / head_dim`."""
        # one [B*T, D] x [D, H] GEMM (an einsum to [B, H, T] runs as a slow transposed bmm)
        logits = F.linear(x, self.learnable_ttt_lr_weight.to(x.dtype), self.learnable_ttt_lr_bias.to(x.dtype))
        return torch.sigmoid(logits).mul(ttt_lr_mult * self.config.ttt_base_lr / self.head_dim).transpose(1, 2)

    def qkv(self, x: Tensor, conv_cache: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Projections `[B, T, D]` (queries and keys before RoPE, values; before the head split) and
        the new conv cache."""
        if not self.has_conv:
            return self.wq(x), self.wk(x), self.wv(x), None
        a = self.wq(x)
        w = self.conv_q.weight.shape[-1]
        if conv_cache is None:
            conv_cache = a.new_zeros(a.shape[0], w - 1, self.width)
        a_ext = torch.cat([conv_cache.to(a.dtype), a], dim=1)  # causal: w-1 earlier inputs on the left
        new_cache = a_ext[:, a_ext.shape[1] - conv_cache.shape[1]:]
        # both depthwise causal convs at once, in the [B, T, D] layout (see `causal_conv_pair`)
        return *causal_conv_pair(a_ext, *self._conv_params(a.dtype)), self.wv(x), new_cache

    def _conv_params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`conv_q`/`conv_k` as one `[w, 2, D]` kernel and `[2, D]` bias (queries first). Contiguous: a
        strided `[2, D]` factor would make every multiply-add pass gather (~1.5x slower)."""
        kern = torch.stack([self.conv_q.weight[:, 0], self.conv_k.weight[:, 0]]).permute(2, 0, 1).to(dtype)
        return kern.contiguous(), torch.stack([self.conv_q.bias, self.conv_k.bias]).to(dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: Tensor,
        position_ids: Tensor | None = None,
        state: TTTState | None = None,
        ttt_lr_mult: float = 1.0,
        output_ttt_stats: bool = False,
        inner_steps: int = 1,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None, TTTState]:
        """Run the layer on `T >= 1` new tokens of each sequence.

        Args:
            hidden_states: `[B, T, D]`.
            position_ids: `[B, T]` integer positions (only `position_ids % m` matters: RoPE);
                default `arange(seen_tokens, seen_tokens + T)`.
            state: `TTTState` from a previous call, or None to start a sequence.
            ttt_lr_mult: multiplies every inner learning rate.
            output_ttt_stats: also return the official statistics.
            inner_steps: k >= 1 gradient steps per completed mini-batch (1 = official).

        Returns:
            out: `[B, T, D]`.
            stats: None or `(ssl_tgt_last_in_mini_batch_from_mean_mse, ttt_loss_mse_init,
                ttt_loss_mse_step_0, ttt_loss_mse_step_1)`: the first `[n_start]` (one per
                mini-batch starting in this call), the others `[n_done]` (one per mini-batch
                completed in this call), averaged over batch rows and heads.
            state: the `TTTState` after these tokens.
        """
        state, position_ids = self._check_forward_args(hidden_states, position_ids, state, inner_steps)
        B, T, D = hidden_states.shape
        m, H, d = self.mini_batch_size, self.num_heads, self.head_dim
        seen = int(state.seen_tokens)

        res = spare = None  # spare: a [B, T, D] buffer of this call that is no longer needed
        if self._use_c(hidden_states, output_ttt_stats, inner_steps):
            res = self._c_projections_and_scan(hidden_states, position_ids, state, ttt_lr_mult)
        if res is not None:
            Z, inner, new_cache, spare, stats = *res, None
        else:  # the torch path (also when the C scan met a non-finite value: the dual form isolates it)
            XQ, XK, XV, new_cache = self.qkv(hidden_states, state.conv_cache)
            stat0 = _ssl_target_stat(XV, XK, seen, m) if output_ttt_stats else None

            pos = position_ids.long() % m
            # in place without autograd: XQ and XK are this call's own projections
            XQ, XK = (t.transpose(1, 2) for t in rope_interleaved(
                (XQ.reshape(B, T, H, d), XK.reshape(B, T, H, d)), pos, self.config.rope_theta, m,
                inplace=not torch.is_grad_enabled()))
            XV = XV.reshape(B, T, H, d).transpose(1, 2)

            Z, inner, stats = self._inner_loop(hidden_states, XQ, XK, XV, state, ttt_lr_mult, output_ttt_stats,
                                               inner_steps)
        # back to the activation dtype: under FSDP bf16 parameters post_norm's weight is bf16
        Z = Z.transpose(1, 2).reshape(B, T, D).to(hidden_states.dtype)
        if self._use_c_epilogue(hidden_states):  # post_norm, gelu(wg x) and their product in one pass
            gated = c_scan.c_post_norm_gate(Z, _linear_into(self.wg, hidden_states, spare), self.post_norm.weight,
                                            self.post_norm.bias, self.post_norm.eps)
            # after the C scan Z is this call's own buffer, free once the epilogue has read it
            out = _linear_into(self.wo, gated, Z if res is not None else None)
        else:
            out = self.wo(self._post_norm_and_gate(hidden_states, Z))
        if output_ttt_stats:
            stats = (stat0, *(s.mean(dim=(0, 1)) for s in stats))
        return out, stats, TTTState(inner, new_cache, seen + T)

    def _post_norm_and_gate(self, hidden_states: Tensor, Z: Tensor) -> Tensor:
        """`post_norm(Z)`, times `gelu_tanh(wg(hidden_states))` when the layer is gated (torch)."""
        Z = self.post_norm(Z)
        if self.has_gate:
            g = self.wg(hidden_states)
            if torch.is_grad_enabled() or g.dtype != Z.dtype:
                Z = F.gelu(g, approximate="tanh") * Z
            else:  # the same products in the gate's own buffer (two large temporaries less)
                Z = torch.ops.aten.gelu_(g, approximate="tanh").mul_(Z)
        return Z

    def _check_forward_args(self, hidden_states: Tensor, position_ids: Tensor | None, state: TTTState | None,
                            inner_steps: int) -> tuple[TTTState, Tensor]:
        """`forward`'s argument checks; returns the state (a fresh one for None) and the `[B, T]` positions."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.width:
            raise ValueError(f"hidden_states must be [B, T, hidden_size={self.width}], got "
                             f"{tuple(hidden_states.shape)}")
        B, T, D = hidden_states.shape
        if T < 1:
            raise ValueError("hidden_states has T=0 tokens; pass at least one token")
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got dtype {hidden_states.dtype}")
        check_dtype("hidden_states", hidden_states, self.wq.weight)
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps={inner_steps!r} must be an int >= 1 (1 = the official update)")
        if state is None:
            state = self.initial_state(B)
        elif state.inner.params[0].shape[0] != B:
            raise ValueError(f"state is for batch size {state.inner.params[0].shape[0]}, "
                             f"hidden_states has batch size {B}; pass the state of these sequences")
        seen = int(state.seen_tokens)
        if position_ids is None:
            position_ids = torch.arange(seen, seen + T, device=hidden_states.device).expand(B, T)
        elif position_ids.shape != (B, T):
            raise ValueError(f"position_ids must be [B, T] = {(B, T)}, got {tuple(position_ids.shape)}")
        return state, position_ids

    def _inner_loop(self, hidden_states: Tensor, XQ: Tensor, XK: Tensor, XV: Tensor, state: TTTState,
                    ttt_lr_mult: float, output_ttt_stats: bool, inner_steps: int):
        """The TTT op on `[B, H, T, d]` queries / keys / values from `state.inner`: (Z `[B, H, T, d]`, the
        inner state after these tokens, the op's statistics or None), dispatched to the naive, Triton or
        dual form."""
        # The inner loop always runs in float32 (or float64): under bf16 autocast the carried
        # state and its updates would lose the small per-token steps.
        compute = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        with torch.autocast(hidden_states.device.type, enabled=False):
            gate = self.ttt_gate(hidden_states.to(compute), ttt_lr_mult)
            op_args = [t.to(compute) for t in (XQ, XK, XV, gate, self.token_eta(), self.ttt_norm_weight,
                                               self.ttt_norm_bias)]
            kwargs = dict(inner_steps=inner_steps, output_stats=output_ttt_stats,
                          init_params=tuple(p.to(compute) for p in self.inner_params()))
            if self.use_naive:
                return naive_ttt(self.inner_kind, *op_args, state.inner.to(compute), **kwargs)
            if self._use_triton(XQ, output_ttt_stats, inner_steps):
                Z, inner = triton_ttt(self.inner_kind, *op_args, state.inner.to(compute))
                return Z, inner, None
            group = int(self.config.remat_mini_batch_group_size) if self.remat else 0
            if self._use_c_gelu(hidden_states):
                kwargs["c_gelu"] = True
            return dual_ttt(self.inner_kind, *op_args, state.inner.to(compute), remat_group_size=group, **kwargs)

    def _use_c(self, hidden_states: Tensor, output_ttt_stats: bool, inner_steps: int) -> bool:
        """The one dispatch point to the C scans (see `kernel`): float32, no autograd."""
        d, m, kind = self.head_dim, self.mini_batch_size, self.inner_kind
        return (not output_ttt_stats and inner_steps == 1 and c_scan.supports(d, m, kind)
                and self._c_ready(hidden_states, "scan", lambda: c_scan.load_library(d, m, kind)))

    def _use_c_epilogue(self, hidden_states: Tensor) -> bool:
        """The one dispatch point to the C output epilogue (`c_scan.c_post_norm_gate`): as the C scan's,
        for both inner kinds."""
        return (self.has_gate and c_scan.post_norm_gate_supported(self.width)
                and self.post_norm.weight.dtype == torch.float32
                and self._c_ready(hidden_states, "output epilogue", c_scan.load_post_norm_gate))

    def _use_c_gelu(self, hidden_states: Tensor) -> bool:
        """The one dispatch point to the C GELU of TTT-MLP's dual form (`dual_ttt_mlp(c_gelu=True)`): as the
        C scan's."""
        return (self.inner_kind == "mlp" and c_scan.gelu_supported(4 * self.head_dim)
                and self._c_ready(hidden_states, "GELU", c_scan.load_post_norm_gate))

    def _c_ready(self, hidden_states: Tensor, what: str, load) -> bool:
        """What the C paths share: `kernel` resolves to 'c', float32 without autocast or autograd, and
        `load()` builds the library (under 'auto' a failure warns once and the torch path runs)."""
        if self.use_naive or resolve_kernel(self.kernel, hidden_states.device) != "c":
            return False
        if (hidden_states.dtype != torch.float32 or self.wq.weight.dtype != torch.float32
                or torch.is_autocast_enabled(hidden_states.device.type)
                or (torch.is_grad_enabled() and (hidden_states.requires_grad
                                                 or any(p.requires_grad for p in self.parameters())))):
            return False
        try:
            load()  # built once per process (and per size, for the scan)
        except c_scan.CKernelUnavailable as e:
            if self.kernel == "c":
                raise
            if not TTTBase._c_warned:
                warnings.warn(f"kernel='auto': the C {what} is unavailable ({e}); using the torch path",
                              stacklevel=4)
                TTTBase._c_warned = True
            return False
        return True

    def _c_projections_and_scan(self, x: Tensor, position_ids: Tensor, state: TTTState, ttt_lr_mult: float):
        """The C path from the projections: (Z `[B, H, T, d]`, inner state, new conv cache, spare), or None
        when the scan met a non-finite gate or gradient. The convs and RoPE run inside the scan, row by row.
        Fewer fresh buffers, fewer page faults: the scan writes Z over the values it has read, and `wq`'s
        output is returned as `spare` (None when `wq` is not a plain `nn.Linear`) for the gate projection."""
        B, T, D = x.shape
        m, d = self.mini_batch_size, self.head_dim
        a = self.wq(x)
        spare = a if _plain_linear(self.wq) else None
        if self.has_conv:
            w = self.conv_q.weight.shape[-1]
            cache = state.conv_cache if state.conv_cache is not None else a.new_zeros(B, w - 1, D)
            new_cache = a[:, T - (w - 1):] if T >= w - 1 else torch.cat([cache, a], dim=1)[:, T:]
            if spare is not None:
                new_cache = new_cache.clone()  # not a view of the spare buffer
            k_src, (kern, bias) = a, self._conv_params(a.dtype)
        else:  # a width-1 unit "conv": the projections pass through
            cache = new_cache = None
            k_src, kern, bias = self.wk(x), a.new_ones(1, 2, D), a.new_zeros(2, D)
        cos, sin = rope_table(m, d, self.config.rope_theta, x.device, torch.float32)  # as `rope_interleaved`
        values = self.wv(x).view(B, T, self.num_heads, d)
        with torch.autocast(x.device.type, enabled=False):
            gate = self.ttt_gate(x, ttt_lr_mult)
        linear = self.inner_kind == "linear"
        res = (c_scan.c_ttt_linear_from_projections if linear else c_scan.c_ttt_mlp_from_projections)(
            a, k_src, cache, kern, bias, cos, sin, position_ids.long() % m, values.transpose(1, 2), gate,
            self.token_eta(), self.ttt_norm_weight, self.ttt_norm_bias, state.inner,
            out=values if _plain_linear(self.wv) else None)
        return None if res is None else (*res, new_cache, spare)

    def _use_triton(self, XQ: Tensor, output_ttt_stats: bool, inner_steps: int) -> bool:
        """The one dispatch point to the Triton scan (see `kernel`)."""
        if resolve_kernel(self.kernel, XQ.device) != "triton":
            return False
        d, m = self.head_dim, self.mini_batch_size
        return (not output_ttt_stats and inner_steps == 1 and not self.remat
                and d & (d - 1) == 0 and m & (m - 1) == 0)


def _plain_linear(module: nn.Module) -> bool:
    """Whether calling module is `F.linear(x, module.weight)` and nothing else: an `nn.Linear` without bias
    or hooks. Its output is then a fresh tensor of the caller's, and its product may go into a buffer."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, torch.nn.modules.module._global_forward_hooks,
             torch.nn.modules.module._global_forward_pre_hooks)
    return type(module) is nn.Linear and module.bias is None and not any(hooks)


def _linear_into(linear: nn.Module, x: Tensor, buffer: Tensor | None) -> Tensor:
    """`linear(x)`, its product written into buffer (a spare `[..., out_features]` tensor of the caller) when
    there is one and linear is plain (`_plain_linear`): no fresh buffer to fault in."""
    if (buffer is None or not _plain_linear(linear) or buffer.shape != (*x.shape[:-1], linear.out_features)
            or not buffer.is_contiguous()):
        return linear(x)
    torch.mm(x.reshape(-1, x.shape[-1]), linear.weight.t(), out=buffer.view(-1, linear.out_features))
    return buffer


def _ssl_target_stat(XV: Tensor, XK: Tensor, seen: int, m: int) -> Tensor:
    """The official `ssl_tgt_last_in_mini_batch_from_mean_mse` of `[B, T, D]` values / keys (before RoPE),
    `[n_start]`: rows at the *start* of each mini-batch starting in this call (despite the name),
    minus the mean of V - K over the call's positions."""
    T = XV.shape[1]
    dlt = (XV - XK).to(torch.float64 if XV.dtype == torch.float64 else torch.float32)
    first = (-seen) % m  # no mini-batch may start in this call (first >= T)
    starts = torch.arange(first, max(first, T), m, device=dlt.device)
    return ((dlt[:, starts] - dlt.mean(dim=1, keepdim=True)) ** 2).mean(dim=(0, 2))


class TTTLinearBase(TTTBase):
    """TTT-Linear without the conv/gate: `XQ, XK, XV = x Wq, x Wk, x Wv`; inner model `x W + b`."""

    inner_kind = "linear"


class TTTMLPBase(TTTBase):
    """TTT-MLP without the conv/gate: inner model `gelu(x W1 + b1) W2 + b2` (width 4d)."""

    inner_kind = "mlp"


class TTTLinear(TTTBase):
    """TTT-Linear: `wq` -> causal depthwise `conv_q`/`conv_k`, and the output gate `gelu(x Wg)`."""

    inner_kind = "linear"
    has_conv = True
    has_gate = True


class TTTMLP(TTTBase):
    """TTT-MLP: `wq` -> causal depthwise `conv_q`/`conv_k`, and the output gate `gelu(x Wg)`."""

    inner_kind = "mlp"
    has_conv = True
    has_gate = True


TTT_LAYERS: dict[str, type[TTTBase]] = {
    "ttt_linear": TTTLinear,
    "ttt_mlp": TTTMLP,
    "ttt_linear_base": TTTLinearBase,
    "ttt_mlp_base": TTTMLPBase,
}


# flax layer-param name -> (torch name, how to convert). Names follow `param_paths` joined with "/"
# (the four official names that contain a slash are single flax keys; joining is still unique).
_DENSE = ("wq", "wk", "wv", "wo", "wg")


def _layer_param_rule(name: str):
    if name.endswith("/kernel") and name.split("/")[0] in _DENSE:
        return f"{name.split('/')[0]}.weight", lambda a: a.T  # flax [in, out] -> torch [out, in]
    table = {
        "conv_q/kernel": ("conv_q.weight", lambda a: np.transpose(a, (2, 1, 0))),  # [w,1,D] -> [D,1,w]
        "conv_k/kernel": ("conv_k.weight", lambda a: np.transpose(a, (2, 1, 0))),
        "conv_q/bias": ("conv_q.bias", None),
        "conv_k/bias": ("conv_k.bias", None),
        "learnable_ttt_lr/kernel": ("learnable_ttt_lr_weight", lambda a: a[..., 0]),  # [H, D, 1]
        "learnable_ttt_lr/bias": ("learnable_ttt_lr_bias", lambda a: a[..., 0]),  # [H, 1]
        "learnable_token_idx": ("learnable_token_idx", None),
        "ttt_norm/scale": ("ttt_norm_weight", None),
        "ttt_norm/bias": ("ttt_norm_bias", None),
        "post_norm/scale": ("post_norm.weight", None),
        "post_norm/bias": ("post_norm.bias", None),
        "ttt_dense_0": ("W1", None),
        "ttt_bias_0": ("b1", None),
        "ttt_dense_1": ("W2", None),
        "ttt_bias_1": ("b2", None),
    }
    return table.get(name, (None, None))


def flax_layer_params_to_torch(params: dict[str, np.ndarray], cls_name: str) -> dict[str, Tensor]:
    """Map a flat dict of official flax TTT-layer params to this port's `state_dict` names.

    Args:
        params: `{"wq/kernel": array, "ttt_norm/scale": array, ...}`: paths relative to the layer
            scope joined with "/" (the fixture format without its `param/` prefix; a checkpoint
            loader strips its own prefix first). Arrays in flax layout (section 3.2 of the parity
            README); any float dtype.
        cls_name: the layer class, `"TTTLinear"`, `"TTTMLP"`, `"TTTLinearBase"`, `"TTTMLPBase"`
            (a dotted path such as `"ttt.models.ttt_layer.TTTMLP"` or a `TTT_LAYERS` key also works).

    Returns:
        `{torch_name: float32 tensor}` ready for `layer.load_state_dict(..., strict=True)`.

    Raises:
        ValueError naming every unexpected key and every key the class needs but is missing.
    """
    short = cls_name.rsplit(".", 1)[-1]
    by_name = {cls.__name__: cls for cls in TTT_LAYERS.values()}
    cls = TTT_LAYERS.get(short) or by_name.get(short)
    if cls is None:
        raise ValueError(f"cls_name={cls_name!r} is not a TTT layer; choose one of {sorted(by_name)}")
    out, unexpected = {}, []
    for name, arr in params.items():
        torch_name, conv = _layer_param_rule(name)
        if torch_name is None:
            unexpected.append(name)
            continue
        a = np.asarray(arr, dtype=np.float32)
        out[torch_name] = torch.from_numpy(np.ascontiguousarray(conv(a) if conv is not None else a))
    expected = _expected_names(cls)
    missing = sorted(expected - set(out))
    unexpected += sorted(set(out) - expected)
    if missing or unexpected:
        raise ValueError(f"flax params do not match {cls.__name__}: missing {missing}, unexpected {unexpected}")
    return out


def _expected_names(cls: type[TTTBase]) -> set[str]:
    names = {"wq.weight", "wv.weight", "wo.weight", "learnable_ttt_lr_weight", "learnable_ttt_lr_bias",
             "learnable_token_idx", "ttt_norm_weight", "ttt_norm_bias", "post_norm.weight", "post_norm.bias",
             "W1", "b1"}
    if cls.has_conv:
        names |= {"conv_q.weight", "conv_q.bias", "conv_k.weight", "conv_k.bias"}
    else:
        names.add("wk.weight")
    if cls.has_gate:
        names.add("wg.weight")
    if cls.inner_kind == "mlp":
        names |= {"W2", "b2"}
    return names


def torch_layer_name_to_flax(cls_name: str) -> dict[str, str]:
    """Inverse name map (torch name -> flax path) for a class, e.g. to map gradients back."""
    short = cls_name.rsplit(".", 1)[-1]
    cls = {c.__name__: c for c in TTT_LAYERS.values()}.get(short) or TTT_LAYERS.get(short)
    if cls is None:
        raise ValueError(f"cls_name={cls_name!r} is not a TTT layer")
    flax_names = ["wq/kernel", "wk/kernel", "wv/kernel", "wo/kernel", "wg/kernel", "conv_q/kernel",
                  "conv_k/kernel", "conv_q/bias", "conv_k/bias", "learnable_ttt_lr/kernel",
                  "learnable_ttt_lr/bias", "learnable_token_idx", "ttt_norm/scale", "ttt_norm/bias",
                  "post_norm/scale", "post_norm/bias", "ttt_dense_0", "ttt_bias_0", "ttt_dense_1", "ttt_bias_1"]
    expected = _expected_names(cls)
    return {_layer_param_rule(f)[0]: f for f in flax_names if _layer_param_rule(f)[0] in expected}
