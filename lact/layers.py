"""`LaCTSWIGLULayer`: sliding-window attention + chunked SwiGLU fast weights, with stacked MLPs.

Reproduces `LaCTSWIGLULayer` and `LowRankFastWeight` of the official LaCT code (a1600012888/LaCT,
`lact_llm/lact_model/layer_lact_swiglu.py`), in plain torch (no fla, flash-attn optional):

    q, k, v = qkv(x)                                   (optional RMSNorm of q, k)
    o_attn  = causal window attention(RoPE(q), RoPE(k), v)          window: keys t-W+1..t
    fast_q, fast_k = q * qk_scale[:, 0] + qk_offset[:, 0],  k * qk_scale[:, 1] + qk_offset[:, 1]
    per fast-weight head: SiLU (q, k and v unless no_v_silu; none if not qkv_silu), then
        q, k <- q / (|q| + 1e-5)  (L2 norm), then RoPE over the attention heads (unless ttt_nope)
    lr0, lr1, lr2 = softplus(lr_proj(x) + inv_softplus(1e-3))   per token and head, float32
    momentum  = sigmoid(momentum_proj(x))                         per token and head
    fw_x    = lact_swiglu(fast weights, fast_q, fast_k, fast_v, lrs, chunk_size, ...)
    o       = o_proj(o_attn + silu(ttt_scale_proj(x)) * RMSNorm_head(fw_x))

Fast weights. Each MLP of the stack is f_i(x) = w1 (silu(w0 x) * (w2 x)) per head, with
w0, w2 [H_fw, d_h, d_in], w1 [H_fw, d_out, d_h]; with `w0_w2_low_rank > 0` the initial w0, w2 are
`w_left @ w_right + 0.5 I`. The learned initial weights are repeated over the batch, so every
sequence starts from the same state; the chunk operation updates them sequence by sequence.

Stack (`r` MLPs; r = 1 is the official layer, same parameter names `w0`, `w1`, `w2` or
`w0.w_left`, `w0.w_right`, ... and the same numbers). For r > 1 the MLPs live in
`fast_mlps.<i>.{w0,w1,w2}` (same shapes and init as the r = 1 weights). With h_0 = x:
    plain stack     h_{i+1} = f_i(h_i)
    residual_ttt    h_{i+1} = h_i + f_i(h_i)
and the fast-weight function is F(x) = h_r.
    end-to-end (default): the inner loss of a chunk is -sum_t lr-weighted <F(k_t), v_t>; every MLP's
        update is the gradient of that loss through the whole stack (each weight with its own lr:
        lr0 for every w0, lr1 for every w1, lr2 for every w2).
    greedy_ttt: MLP i is updated on its own local loss -<f_i(h_i(k_t)), v_t> with its input
        h_i(k_t) detached from the MLPs below (no inner gradient flows between MLPs); the apply pass
        still composes the stack.
Momentum, Muon, the per-row renormalisation to the initial row norms and pre/post norm apply to
every weight of every MLP exactly as to the single MLP. The chunk mechanics (apply then update,
last partial chunk applied without update) are those of `lact.ops.lact_swiglu`.

Differences from the reference, none changing values: flash-attn is used only when importable on
CUDA (else `lact.ops.window_attention`: fused causal SDPA, or a blocked window kernel whose memory is
linear in T); fla's Triton kernels are replaced by `lact.modules`; decoding carries a state
(`LaCTLayerState`: the window's keys/values and the fast weights with the pending chunk) where the
reference model disables its cache and recomputes;
`use_fused_kernel=True` selects `kernel="auto"` of `lact.ops.lact_swiglu` (the Triton chunk-step
kernels of `lact.ops.triton_update` on CUDA when triton imports, else the torch step; same values to
round-off), False `kernel="torch"`. The reference's op runs under CUDA bfloat16 autocast;
this port computes in the model's dtype (autocast is used only for fp32_states + half activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lact import ops as lact_ops
from lact.configuration_lact import TTT_BACKPROP_MODES, resolve_greedy_residual
from lact.modules import RMSNorm, RotaryEmbedding
from lact.ops.window_attention import _nonfinite_rows, window_attention  # window_attention also re-exported

BASE_LR = 1e-3  # the reference's base inner learning rate (softplus(0 + inv_softplus(BASE_LR)) = BASE_LR)


def inv_softplus(x: float) -> float:
    """Inverse of softplus: y such that log(1 + exp(y)) = x (x > 0)."""
    return x + math.log(-math.expm1(-x))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is (the reference's `.float()` for half inputs)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cached_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    window_size: int | None,
) -> torch.Tensor:
    """Causal sliding-window attention of T new queries over the cached keys plus the new ones (decoding).

    The new tokens sit at positions P..P+T-1 after the P cached ones; query t attends to keys
    t - window_size + 1..t, as `window_attention` does on the whole sequence. Non-finite key/value rows
    poison exactly the queries that attend to them (same rule as `window_attention`). No padding mask:
    a cached decode of a padded batch is refused by the model.

    Args:
        q, k, v: [B, T, H, D] the new tokens (q, k already rotated at their absolute positions).
        past_k, past_v: [B, P, H, D] the cached keys (rotated) and values, P >= 0.
        window_size: window W in tokens, None for full causal attention.

    Returns:
        [B, T, H, D].
    """
    T, P = q.shape[1], past_k.shape[1]
    keys, values = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)  # [B, S, H, D]
    pos = torch.arange(P + T, device=q.device)
    delta = pos[P:, None] - pos[None, :]  # query position - key position, [T, S]
    allowed = delta >= 0
    if window_size is not None:
        allowed = allowed & (delta < window_size)
    bad = _nonfinite_rows(keys) | _nonfinite_rows(values)  # [B, S, H]
    zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
    keys = torch.where(bad[..., None], zero, keys)
    values = torch.where(bad[..., None], zero, values)
    poisoned = (bad.permute(0, 2, 1)[:, :, None, :] & allowed).any(-1)  # [B, H, T]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, keys, values))  # [B, H, ., D]
    mask = None if bool(allowed.all()) else allowed
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    o = torch.where(poisoned[..., None], torch.full((), float("nan"), dtype=o.dtype, device=o.device), o)
    return o.transpose(1, 2)


def _direct(fn, *args):
    return fn(*args)


def _recomputed(fn, *args):
    """fn(*args) keeping only its inputs for backward: fn runs again there (same operations on the same
    inputs, so the same values and gradients). For the layer's elementwise pieces around the fast-weight
    op (SiLU, L2 norm, RoPE, head reshapes, RMSNorm), whose saved intermediates are [B, T, hidden] each."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


@dataclass
class LaCTLayerState:
    """Decoding state of one `LaCTSWIGLULayer` after `seen` tokens.

    Attributes:
        keys, values: [B, P, H, D] the last P = min(seen, window_size - 1) attention keys (rotated) and
            values: all a later query can attend to (every one when window_size is None).
        fast: the fast-weight `lact.ops.LaCTCarry` (weights at the last used chunk boundary and the
            pending chunk's keys, values, learning rates and momenta).
    """

    keys: torch.Tensor
    values: torch.Tensor
    fast: lact_ops.LaCTCarry

    @property
    def seen(self) -> int:
        return self.fast.seen

    def select_batch(self, index: torch.LongTensor) -> LaCTLayerState:
        """The state of the batch rows `index` (in that order; beam search reorders with it)."""
        batch = self.keys.shape[0]
        index = index.to(self.keys.device)

        def rows(t: torch.Tensor) -> torch.Tensor:  # fast-weight tensors are [B * H_fw, ...], "(b h)" order
            heads = t.shape[0] // batch
            return t.reshape(batch, heads, *t.shape[1:]).index_select(0, index).reshape(-1, *t.shape[1:])

        return LaCTLayerState(self.keys.index_select(0, index), self.values.index_select(0, index),
                              self.fast.map_tensors(rows))


class LowRankFastWeight(nn.Module):
    """Low-rank initial fast weight W = w_left @ w_right (+ 0.5 I), one per head.

    Args:
        num_heads: fast-weight heads H_fw.
        out_features, in_features: W is [H_fw, out_features, in_features].
        rank: inner rank of the factors w_left [H_fw, out, rank], w_right [H_fw, rank, in].
        init_gain: std gain of the factors.
        add_identity: add 0.5 * eye(out, in) (the reference always does for w0, w2).
    """

    def __init__(
        self,
        num_heads: int,
        out_features: int,
        in_features: int,
        rank: int = 32,
        init_gain: float = 0.5,
        add_identity: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.out_features = out_features
        self.in_features = in_features
        self.rank = rank
        self.init_gain = init_gain
        self.add_identity = add_identity
        self.w_left = nn.Parameter(torch.empty(num_heads, out_features, rank))
        self.w_right = nn.Parameter(torch.empty(num_heads, rank, in_features))
        self.reset_parameters()

    def init_stds(self) -> tuple[float, float]:
        """(std of w_left, std of w_right) of the reference init."""
        return self.init_gain / math.sqrt(self.rank), self.init_gain / math.sqrt(self.in_features)

    def reset_parameters(self) -> None:
        std_left, std_right = self.init_stds()
        nn.init.normal_(self.w_left, std=std_left)
        nn.init.normal_(self.w_right, std=std_right)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, out={self.out_features}, in={self.in_features}, rank={self.rank}, "
                f"add_identity={self.add_identity}")

    def forward(self) -> torch.Tensor:
        """Returns W [H_fw, out_features, in_features]."""
        W = self.w_left @ self.w_right
        if self.add_identity:
            eye = torch.eye(self.out_features, self.in_features, device=W.device, dtype=W.dtype)
            W = W + 0.5 * eye.unsqueeze(0)
        return W


def _make_fast_weights(
    owner: nn.Module, num_heads: int, d_in: int, d_h: int, d_out: int, low_rank: int, init_gain: float
) -> None:
    """Register w0, w2 ([H, d_h, d_in], low-rank modules when low_rank > 0) and w1 [H, d_out, d_h]."""
    if low_rank > 0:
        owner.w0 = LowRankFastWeight(num_heads, d_h, d_in, low_rank, init_gain=init_gain, add_identity=True)
        owner.w2 = LowRankFastWeight(num_heads, d_h, d_in, low_rank, init_gain=init_gain, add_identity=True)
    else:
        owner.w0 = nn.Parameter(torch.randn(num_heads, d_h, d_in) / math.sqrt(d_in))
        owner.w2 = nn.Parameter(torch.randn(num_heads, d_h, d_in) / math.sqrt(d_in))
    owner.w1 = nn.Parameter(torch.randn(num_heads, d_out, d_h) / math.sqrt(d_h))


class SwiGLUFastWeights(nn.Module):
    """Initial fast weights of one MLP of a stack (r > 1): `w0`, `w1`, `w2` as in the r = 1 layer."""

    def __init__(self, num_heads: int, d_in: int, d_h: int, d_out: int, low_rank: int, init_gain: float):
        super().__init__()
        _make_fast_weights(self, num_heads, d_in, d_h, d_out, low_rank, init_gain)


@dataclass
class LaCTLayerOptions:
    """Every option of `LaCTSWIGLULayer`, with the reference layer's defaults: the one list of them.

    The names are the reference constructor's (and `LaCTSWIGLUConfig`'s), so the same keyword
    arguments build either layer. The defaults are the reference layer's, which differ from the
    config's; a layer built from a config (`LaCTSWIGLULayer.from_config`) takes every value from it.

    Sizes (required): hidden_size; num_attn_heads (attention heads, head dim hidden / heads);
    num_lact_heads (fast-weight heads H_fw, width d = hidden / H_fw); inter_multi (fast-weight inner
    width d_h = int(d * inter_multi)); window_size (attention window W, None = full causal);
    lact_chunk_size (tokens per fast-weight update).
    Attention: qkv_bias, attn_qk_norm (RMSNorm of q, k), rope_theta, max_position_embeddings.
    Fast-weight inputs: qkv_silu, no_v_silu, ttt_nope (no RoPE on the fast q, k), lr_dim (only 1),
        lr_parameterization (only "mamba"), use_momentum.
    Fast-weight update: use_muon, ttt_prenorm, ttt_loss_type (only "dot_product"), w0_w2_low_rank
        (> 0: low-rank initial w0, w2), fw_init_gain, fp32_states, learnable_ttt_scale.
    use_fused_kernel: see the module docstring.
    Added here: r (stacked MLPs, 1 = reference), residual_ttt, greedy_ttt (stack variants, see the
        module docstring), ttt_backprop (see `LaCTSWIGLULayer.resolve_backprop`), attn_norm_eps (eps of
        q_norm/k_norm and ttt_norm; fla's RMSNorm default, as the reference; not a config field).
    """

    hidden_size: int
    num_attn_heads: int
    num_lact_heads: int
    inter_multi: float
    window_size: int | None
    lact_chunk_size: int
    qkv_bias: bool = False
    attn_qk_norm: bool = True
    qkv_silu: bool = True
    no_v_silu: bool = False
    lr_dim: int = 1
    use_muon: bool = False
    lr_parameterization: str = "mamba"
    learnable_ttt_scale: bool = False
    ttt_prenorm: bool = False
    ttt_nope: bool = False
    rope_theta: float = 500000.0
    max_position_embeddings: int = 2048
    w0_w2_low_rank: int = -1
    use_momentum: bool = False
    ttt_loss_type: str = "dot_product"
    fw_init_gain: float = 0.5
    use_fused_kernel: bool = False
    fp32_states: bool = False
    r: int = 1
    residual_ttt: bool = False
    greedy_ttt: bool = False
    ttt_backprop: str = "auto"
    attn_norm_eps: float = 1e-5

    # options a `LaCTSWIGLUConfig` does not carry: `from_config` leaves them at their defaults
    NOT_IN_CONFIG = ("attn_norm_eps",)

    @classmethod
    def kwargs_from_config(cls, config) -> dict:
        """{option: value} read from a `LaCTSWIGLUConfig` (every field but `NOT_IN_CONFIG`)."""
        return {f.name: getattr(config, f.name) for f in fields(cls) if f.name not in cls.NOT_IN_CONFIG}

    def __post_init__(self):
        if self.hidden_size % self.num_attn_heads or self.hidden_size % self.num_lact_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attn_heads={self.num_attn_heads} and "
                f"num_lact_heads={self.num_lact_heads}"
            )
        if self.lr_dim != 1:
            raise ValueError(f"lr_dim={self.lr_dim} is not supported (one learning rate per token, head, weight)")
        if self.lr_parameterization.lower() != "mamba":
            raise ValueError(f"lr_parameterization={self.lr_parameterization!r} is not implemented; use 'mamba'")
        if self.ttt_loss_type != "dot_product":
            raise ValueError(f"ttt_loss_type={self.ttt_loss_type!r} is not supported; use 'dot_product'")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be an int >= 1 (number of stacked fast-weight MLPs)")
        if self.ttt_backprop not in TTT_BACKPROP_MODES:
            raise ValueError(f"ttt_backprop={self.ttt_backprop!r} must be one of {TTT_BACKPROP_MODES}")
        # stacklevel 4: __post_init__ <- the dataclass __init__ <- LaCTSWIGLULayer.__init__ <- its caller
        self.residual_ttt = resolve_greedy_residual(self.greedy_ttt, self.residual_ttt, stacklevel=4)


class LaCTSWIGLULayer(nn.Module):
    """LaCT layer: window attention plus chunked SwiGLU fast-weight MLP(s), output-mixed.

    Args:
        hidden_size, num_attn_heads, num_lact_heads, inter_multi, window_size, lact_chunk_size: the sizes.
        layer_idx: index of the layer in the model (kept for the caller; changes nothing here).
        **options: any other field of `LaCTLayerOptions` (the reference layer's keyword arguments and
            defaults, plus r, residual_ttt, greedy_ttt, ttt_backprop, attn_norm_eps). Every option is
            also an attribute of the layer (`layer.r`, `layer.window_size`, ...).

    forward(hidden_states [B, T, hidden], attention_mask [B, T] or None, past_key_values=LaCTLayerState or None,
            use_cache=False) -> (o [B, T, hidden], None, the new LaCTLayerState if use_cache else None)
    """

    def __init__(self, hidden_size: int, num_attn_heads: int, num_lact_heads: int, inter_multi: float,
                 window_size: int | None, lact_chunk_size: int, layer_idx: int | None = None, **options):
        super().__init__()
        opts = LaCTLayerOptions(hidden_size, num_attn_heads, num_lact_heads, inter_multi, window_size,
                                lact_chunk_size, **options)
        for f in fields(opts):
            setattr(self, f.name, getattr(opts, f.name))
        self.layer_idx = layer_idx
        self._build_attention(opts)
        self._build_fast_weights(opts)
        # use_fused_kernel (the official config's flag) selects the Triton chunk step where it can run
        # (CUDA + triton importable), the torch step elsewhere: same values either way
        self.ttt_kernel = "auto" if opts.use_fused_kernel else "torch"

    def _build_attention(self, opts: LaCTLayerOptions) -> None:
        """qkv (shared by attention and fast weights), q/k norms, RoPE, o_proj."""
        self.num_heads = opts.num_attn_heads
        self.head_dim = opts.hidden_size // opts.num_attn_heads
        self.qkv = nn.Linear(opts.hidden_size, 3 * opts.hidden_size, bias=opts.qkv_bias)
        if opts.attn_qk_norm:
            self.q_norm = RMSNorm(opts.hidden_size, eps=opts.attn_norm_eps)
            self.k_norm = RMSNorm(opts.hidden_size, eps=opts.attn_norm_eps)
        self.o_proj = nn.Linear(opts.hidden_size, opts.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, base=opts.rope_theta)

    def _build_fast_weights(self, opts: LaCTLayerOptions) -> None:
        """The r initial fast-weight MLPs and the per-token projections (lrs, momentum, output scale)."""
        H = self.num_fw_heads = opts.num_lact_heads
        self.fw_head_dim = self.d_in = self.d_out = opts.hidden_size // H
        self.d_h = int(self.d_in * opts.inter_multi)
        fw_shape = (H, self.d_in, self.d_h, self.d_out, opts.w0_w2_low_rank, opts.fw_init_gain)
        if opts.r == 1:
            # the reference's names: `w0`, `w1`, `w2` directly on the layer
            _make_fast_weights(self, *fw_shape)
        else:
            self.fast_mlps = nn.ModuleList(SwiGLUFastWeights(*fw_shape) for _ in range(opts.r))

        # per-token learning rates: 3 per fast-weight head (for w0, w1, w2); the reference's name
        # `lr_dim` for the projection width
        self.lr_dim = opts.lr_dim * 3 * H
        self.lr_proj = nn.Linear(opts.hidden_size, self.lr_dim)
        self.base_lr_inv = inv_softplus(BASE_LR)
        self.qk_scale = nn.Parameter(torch.ones(opts.hidden_size, 2))
        self.qk_offset = nn.Parameter(torch.zeros(opts.hidden_size, 2))
        if opts.learnable_ttt_scale:
            self.ttt_scale_proj = nn.Linear(opts.hidden_size, H)
        self.ttt_norm = RMSNorm(self.fw_head_dim, elementwise_affine=True, eps=opts.attn_norm_eps)
        if opts.use_momentum:
            self.momentum_proj = nn.Sequential(nn.Linear(opts.hidden_size, H), nn.Sigmoid())

    @classmethod
    def from_config(cls, config, layer_idx: int | None = None) -> LaCTSWIGLULayer:
        """Build the layer from a `LaCTSWIGLUConfig` (what `LaCTBlock` does)."""
        return cls(layer_idx=layer_idx, **LaCTLayerOptions.kwargs_from_config(config))

    # -- helpers -------------------------------------------------------------------------------
    def fast_weight_owners(self) -> list[nn.Module]:
        """The modules holding each MLP's `w0`, `w1`, `w2` ([self] for r = 1)."""
        return [self] if self.r == 1 else list(self.fast_mlps)

    def initial_fast_weights(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Materialise the initial fast weights, repeated over the batch.

        Returns:
            r tuples (w0 [B*H_fw, d_h, d_in], w1 [B*H_fw, d_out, d_h], w2 [B*H_fw, d_h, d_in]), row
            b*H_fw + h holding head h (the "(b h)" order of the fast q, k, v).
        """
        weights = []
        for owner in self.fast_weight_owners():
            w0 = owner.w0() if isinstance(owner.w0, LowRankFastWeight) else owner.w0
            w2 = owner.w2() if isinstance(owner.w2, LowRankFastWeight) else owner.w2
            w = [w.repeat(batch_size, 1, 1) for w in (w0, owner.w1, w2)]
            if self.fp32_states or w[0].dtype in (torch.float16, torch.bfloat16):
                # the reference keeps the states (and their updates) in float32 (float64 stays); with
                # half-precision parameters (FSDP2 bf16 mixed precision) the per-token learning
                # rates are float32 anyway, so the states must be too (matmuls run under autocast)
                w = [_upcast(x) for x in w]
            weights.append(tuple(w))
        return weights

    def resolve_backprop(self, *tensors: torch.Tensor) -> str:
        """The backprop mode of a call without a cache, for `tensors` (hidden_states first).

        "autograd" and "manual" are returned as set. "auto" -> "manual" iff (1) an outer gradient will be
        needed: grad mode is on and a tensor or a parameter requires grad, and (2) the sequence spans at
        least two update chunks, T > 2 * lact_chunk_size (with fewer, autograd's graph is as small);
        else "autograd". "manual" also makes `forward` recompute the fast-weight inputs and output
        (`_fast_inputs`, `_fast_output`) in backward. Calls with a cache (use_cache or past_key_values)
        run the stateful op under autograd whatever the mode.
        """
        if self.ttt_backprop != "auto":
            return self.ttt_backprop
        needs_grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.parameters())
        )
        seq_len = tensors[0].shape[1] if tensors else 0
        helps = lact_ops.manual_backprop_helps(seq_len, self.lact_chunk_size)
        return "manual" if needs_grad and helps else "autograd"

    def _rescale_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel scale and offset of q, k ([B, T, hidden]) for the fast-weight path."""
        return (q * self.qk_scale[:, 0] + self.qk_offset[:, 0],
                k * self.qk_scale[:, 1] + self.qk_offset[:, 1])

    def _to_fw_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H_fw * d] -> [B * H_fw, T, d]."""
        B, T, _ = x.shape
        d = x.shape[-1] // self.num_fw_heads  # explicit, not -1: B = 0 leaves -1 undetermined
        return x.reshape(B, T, self.num_fw_heads, d).transpose(1, 2).reshape(B * self.num_fw_heads, T, d)

    def _from_fw_heads(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """[B * H_fw, T, d] -> [B, T, H_fw * d]."""
        _, T, d = x.shape
        return x.reshape(batch_size, self.num_fw_heads, T, d).transpose(1, 2).reshape(batch_size, T, self.num_fw_heads * d)

    def _fast_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fast-weight q, k, v [B * H_fw, T, d] from the attention's q, k, v [B, T, hidden] (before RoPE):
        per-channel rescale of q, k, SiLU, L2 norm per fast-weight head, RoPE at positions offset.. ."""
        B, T, _ = q.shape
        fast_q, fast_k = self._rescale_qk(q, k)
        fast_v = v
        if self.qkv_silu:
            fast_q, fast_k = F.silu(fast_q), F.silu(fast_k)
            if not self.no_v_silu:
                fast_v = F.silu(fast_v)
        # L2 norm per fast-weight head: [B, T, H_fw, d]
        fast_q = lact_ops.l2_norm(fast_q.reshape(B, T, self.num_fw_heads, self.fw_head_dim))
        fast_k = lact_ops.l2_norm(fast_k.reshape(B, T, self.num_fw_heads, self.fw_head_dim))
        if not self.ttt_nope:
            # the reference rotates the fast q, k with the attention's RoPE, over the attention heads
            fast_q, fast_k = self.rotary(fast_q.reshape(B, T, self.num_heads, self.head_dim),
                                         fast_k.reshape(B, T, self.num_heads, self.head_dim), seqlen_offset=offset)
        return (self._to_fw_heads(fast_q.reshape(B, T, self.hidden_size)),
                self._to_fw_heads(fast_k.reshape(B, T, self.hidden_size)),
                self._to_fw_heads(fast_v))

    def _fast_output(self, fw_x: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The fast-weight branch's share of the output, [B, T, hidden]: RMSNorm per head of the op's
        output fw_x [B * H_fw, T, d], times silu(ttt_scale_proj(x)) per head when learnable_ttt_scale."""
        ttt_x = self.ttt_norm(fw_x)
        if self.learnable_ttt_scale:
            scale = F.silu(self.ttt_scale_proj(hidden_states))  # [B, T, H_fw]
            ttt_x = ttt_x * self._to_fw_heads(scale)
        return self._from_fw_heads(ttt_x, hidden_states.shape[0])

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        output_attentions: bool = False,
        use_cache: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None, LaCTLayerState | None]:
        """Args:
            hidden_states: [B, T, hidden] (the new tokens when `past_key_values` is given).
            attention_mask: optional [B, T] 0/1 padding mask (attention only; the fast-weight path
                ignores it, as the reference does). Must hold no padding with `past_key_values`.
            past_key_values: the `LaCTLayerState` after the previous tokens of these sequences, or None.
            use_cache: return the `LaCTLayerState` after these tokens.

        Returns:
            (o [B, T, hidden], None, the new `LaCTLayerState` or None).
        """
        past = past_key_values
        attention_mask = self._check_forward_inputs(hidden_states, attention_mask, past)
        offset = 0 if past is None else past.seen
        B, T, _ = hidden_states.shape

        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        if self.attn_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # the manual backprop also recomputes the fast-weight path's elementwise pieces in backward
        recompute = (past is None and not use_cache and torch.is_grad_enabled()
                     and self.resolve_backprop(hidden_states) == "manual")
        run = _recomputed if recompute else _direct

        # attention branch: [B, T, H, D]
        qh = q.reshape(B, T, self.num_heads, self.head_dim)
        kh = k.reshape(B, T, self.num_heads, self.head_dim)
        vh = v.reshape(B, T, self.num_heads, self.head_dim)
        qh, kh = self.rotary(qh, kh, seqlen_offset=offset)
        if past is None:
            o = window_attention(qh, kh, vh, self.window_size, attention_mask)
        else:
            o = cached_window_attention(qh, kh, vh, past.keys, past.values, self.window_size)
        o = o.reshape(B, T, self.hidden_size)

        # fast-weight branch
        fast_q, fast_k, fast_v = run(self._fast_inputs, q, k, v, offset)
        fw_x, carry = self._fast_weight_op(hidden_states, fast_q, fast_k, fast_v, past, use_cache)
        new_state = self._next_cache(kh, vh, past, carry) if use_cache else None

        o = self.o_proj(o + run(self._fast_output, fw_x, hidden_states).to(o.dtype))
        return o, None, new_state

    def _check_forward_inputs(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                              past) -> torch.Tensor | None:
        """`forward`'s argument checks; returns the attention mask to use (None while decoding)."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states has shape {tuple(hidden_states.shape)}; expected [B, T, {self.hidden_size}]"
            )
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got dtype {hidden_states.dtype}")
        if hidden_states.dtype != self.qkv.weight.dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the layer's weights are "
                            f"{self.qkv.weight.dtype}; cast one to the other or run under torch.autocast")
        if hidden_states.shape[1] == 0:
            raise ValueError(f"hidden_states has T=0 tokens (shape {tuple(hidden_states.shape)}); pass at least one")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected a [B, T] = "
                f"{tuple(hidden_states.shape[:2])} 0/1 padding mask"
            )
        if past is None:
            return attention_mask
        if not isinstance(past, LaCTLayerState):
            raise TypeError(f"past_key_values must be a LaCTLayerState returned by this layer, got "
                            f"{type(past).__name__}")
        if past.keys.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"past_key_values holds {past.keys.shape[0]} sequences, hidden_states "
                             f"{hidden_states.shape[0]}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask has padding while decoding with a cache: padded tokens would "
                             "enter the fast weights; decode sequences of equal length without padding")
        return None

    def _fast_weight_op(self, hidden_states: torch.Tensor, fast_q: torch.Tensor, fast_k: torch.Tensor,
                        fast_v: torch.Tensor, past: LaCTLayerState | None, use_cache: bool):
        """The fast-weight op on fast q, k, v [B * H_fw, T, d]: (its output fw_x [B * H_fw, T, d], the
        carried fast-weight state after these tokens, or None without a cache)."""
        B = hidden_states.shape[0]
        # learning rates and momentum in (at least) float32, as the reference's `.float()`; float64
        # models keep float64 so that the whole op can run in double precision
        lr = F.softplus(_upcast(self.lr_proj(hidden_states)) + self.base_lr_inv)  # [B, T, 3 * H_fw]
        lr0, lr1, lr2 = self._to_fw_heads(lr).chunk(3, dim=-1)  # each [B*H_fw, T, 1]
        momentum = None
        if self.use_momentum:
            momentum = self._to_fw_heads(_upcast(self.momentum_proj(hidden_states)))  # [B*H_fw, T, 1]

        fast_weights = self.initial_fast_weights(B) if past is None else None
        state_dtype = fast_weights[0][0].dtype if past is None else past.fast.state[0][0].dtype
        mixed = state_dtype != fast_q.dtype
        fw_kwargs = dict(chunk_size=self.lact_chunk_size, momentum=momentum, use_muon=self.use_muon,
                         prenorm=self.ttt_prenorm, residual=self.residual_ttt, greedy=self.greedy_ttt,
                         kernel=self.ttt_kernel)
        # fp32 states with half-precision activations: like the reference (whose op runs under
        # autocast), the matmuls run in the activation dtype while the states accumulate in float32
        with torch.autocast(fast_q.device.type, dtype=fast_q.dtype, enabled=mixed):
            if past is None and not use_cache:
                fw_x = lact_ops.lact_swiglu(fast_weights, fast_q, fast_k, fast_v, lr0, lr1, lr2,
                                            backprop=self.resolve_backprop(hidden_states), **fw_kwargs)
                return fw_x, None
            # carried state (decoding, or a sequence fed in pieces): same chunk arithmetic
            return lact_ops.lact_swiglu_with_state(
                fast_weights, fast_q, fast_k, fast_v, lr0, lr1, lr2,
                initial_state=None if past is None else past.fast, **fw_kwargs)

    def _next_cache(self, kh: torch.Tensor, vh: torch.Tensor, past: LaCTLayerState | None,
                    carry) -> LaCTLayerState:
        """The layer state after these tokens: the attention window's last keys / values [B, <=W-1, H, D]
        (all of them without a window) and the fast-weight carry."""
        keys = kh if past is None else torch.cat((past.keys, kh), dim=1)
        values = vh if past is None else torch.cat((past.values, vh), dim=1)
        keep = keys.shape[1] if self.window_size is None else self.window_size - 1
        start = max(keys.shape[1] - keep, 0)
        return LaCTLayerState(keys[:, start:], values[:, start:], carry)
