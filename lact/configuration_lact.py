"""`LaCTSWIGLUConfig`: configuration of the LaCT SwiGLU language model, HF style.

Reproduces `LaCTSWIGLUConfig` of the official LaCT code (a1600012888/LaCT,
`lact_llm/lact_model/configuration_lact_swiglu.py`): same `model_type` ("lact_swiglu"), same field
names and defaults, so the official JSON configs (`lact_llm/configs/*.json`) load unchanged.
Generic `PretrainedConfig` keys those files carry (e.g. `attention_bias`) are kept as attributes.

Added (defaults keep the official behaviour and checkpoints):
    r: number of SwiGLU fast-weight MLPs stacked in every LaCT layer (1 = the official layer).
    residual_ttt: stack with residual connections, h_{i+1} = h_i + MLP_i(h_i).
    greedy_ttt: update every MLP of the stack with its own local inner loss (see `lact.layers`).
    ttt_backprop: how the outer gradient flows through the inner updates: "autograd", "manual"
        (recompute-per-chunk `autograd.Function`; the layer also recomputes the elementwise pieces
        around it) or "auto": manual when gradients are needed (grad mode on and the input or a
        parameter requires grad) AND the sequence spans at least two update chunks
        (T > 2 * lact_chunk_size), autograd otherwise. Decoding with a cache runs autograd in every mode
        (`LaCTSWIGLULayer.resolve_backprop`).

All combinations are checked here, at construction, so a bad config fails before a model is built.
"""

from __future__ import annotations

import warnings

from transformers import PretrainedConfig

TTT_BACKPROP_MODES = ("auto", "autograd", "manual")


class LaCTSWIGLUConfig(PretrainedConfig):
    """Configuration of `LaCTModel` / `LaCTForCausalLM` (LaCT SwiGLU fast weights + window attention).

    Official fields (names and defaults as in the reference):
        hidden_size (2048), num_hidden_layers (24), num_attn_heads (32): sliding-window attention
            heads; num_lact_heads (4): fast-weight heads, each of width hidden_size / num_lact_heads.
        inter_multi (1): fast-weight MLP inner width = int(head width * inter_multi).
        qkv_bias (False), attn_qk_norm (False): bias of the shared qkv projection; RMSNorm of q, k.
        lact_chunk_size (2048): tokens per fast-weight update (apply-then-update chunks).
        use_muon (False): Newton-Schulz orthogonalise each fast-weight update.
        lr_dim (1): per-token learning rates per head and weight (only 1 is supported by the op).
        qkv_silu (True), no_v_silu (False): SiLU on fast q, k (and v unless no_v_silu).
        lr_parameterization ("mamba"): lr = softplus(lr_proj(x) + inv_softplus(1e-3)).
        learnable_ttt_scale (True): per-head output scale silu(ttt_scale_proj(x)).
        use_momentum (True): per-token momentum sigmoid(momentum_proj(x)), averaged per chunk.
        ttt_loss_type ("dot_product"): the only inner loss of the reference.
        ttt_prenorm (False): pre-norm (renormalised copy of accumulating weights) vs post-norm updates.
        ttt_nope (False): no RoPE on the fast q, k.
        w0_w2_low_rank (-1): > 0 parameterises the initial w0, w2 as left @ right + 0.5 I of this rank.
        window_size (2048): attention window (None = full causal attention).
        rope_theta (1e4), max_position_embeddings (2048).
        hidden_ratio (4), intermediate_size (None), hidden_act ("swish"): the SwiGLU channel MLP.
        initializer_range (0.006), elementwise_affine (True), norm_eps (1e-6), use_cache (True),
        pad/bos/eos_token_id (None/1/2), tie_word_embeddings (False), vocab_size (32000).
        fuse_norm, last_layer_fuse_norm, fuse_swiglu, fuse_cross_entropy (True): kernel-fusion
            switches of the reference; accepted and stored, they change no value in this port.
        fw_init_gain (0.5): init gain of the low-rank factors.
        use_fused_kernel (False): True = `kernel="auto"` of `lact.ops.lact_swiglu`: on CUDA with
            triton importable, each chunk step's forward runs the Triton kernels of
            `lact.ops.triton_update` (the SwiGLU apply for every MLP; gradient + momentum + update
            with the post-norm renormalisation fused for r = 1; Muon, pre-norm main weights and
            r > 1 updates in torch; gradients by the torch step's VJP); elsewhere (every CPU run,
            under autocast) the torch step. False = `kernel="torch"`. Same values to round-off.
        fp32_states (False): keep the fast weights (and their updates) in float32.

    Added fields:
        r (1): stacked MLPs per layer, int >= 1.
        residual_ttt (False): residual stack; turned off with a warning when greedy_ttt is set.
        greedy_ttt (False): per-MLP local inner objectives instead of end-to-end.
        ttt_backprop ("auto"): one of "auto", "autograd", "manual" (see the module docstring for "auto").

    Raises:
        ValueError/TypeError at construction for impossible values, naming the key and the value.
    """

    model_type = "lact_swiglu"
    keys_to_ignore_at_inference = ["past_key_values"]

    # long on purpose: one keyword and one assignment per key of the reference's config (HF style)
    def __init__(
        self,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_attn_heads: int = 32,
        num_lact_heads: int = 4,
        inter_multi: float = 1,
        qkv_bias: bool = False,
        attn_qk_norm: bool = False,
        lact_chunk_size: int = 2048,
        use_muon: bool = False,
        lr_dim: int = 1,
        qkv_silu: bool = True,
        no_v_silu: bool = False,
        lr_parameterization: str = "mamba",
        learnable_ttt_scale: bool = True,
        use_momentum: bool = True,
        ttt_loss_type: str = "dot_product",
        ttt_prenorm: bool = False,
        ttt_nope: bool = False,
        w0_w2_low_rank: int = -1,
        window_size: int | None = 2048,
        rope_theta: float | None = 10000.0,
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        initializer_range: float = 0.006,
        elementwise_affine: bool | None = True,
        norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        fuse_norm: bool = True,
        last_layer_fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        vocab_size: int = 32000,
        fw_init_gain: float = 0.5,
        use_fused_kernel: bool = False,
        fp32_states: bool = False,
        r: int = 1,
        residual_ttt: bool = False,
        greedy_ttt: bool = False,
        ttt_backprop: str = "auto",
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attn_heads = num_attn_heads
        self.num_lact_heads = num_lact_heads
        self.inter_multi = inter_multi
        self.qkv_bias = qkv_bias
        self.attn_qk_norm = attn_qk_norm
        self.lact_chunk_size = lact_chunk_size
        self.use_muon = use_muon
        self.lr_dim = lr_dim
        self.qkv_silu = qkv_silu
        self.no_v_silu = no_v_silu
        self.window_size = window_size
        self.lr_parameterization = lr_parameterization
        self.learnable_ttt_scale = learnable_ttt_scale
        self.ttt_prenorm = ttt_prenorm
        self.ttt_nope = ttt_nope
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.elementwise_affine = elementwise_affine
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        self.fuse_norm = fuse_norm
        self.last_layer_fuse_norm = last_layer_fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.vocab_size = vocab_size
        self.use_momentum = use_momentum
        self.ttt_loss_type = ttt_loss_type
        self.w0_w2_low_rank = w0_w2_low_rank
        self.fw_init_gain = fw_init_gain
        self.use_fused_kernel = use_fused_kernel
        self.fp32_states = fp32_states
        self.r = r
        self.residual_ttt = residual_ttt
        self.greedy_ttt = greedy_ttt
        self.ttt_backprop = ttt_backprop
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def fw_head_dim(self) -> int:
        """Width of one fast-weight head (d_in = d_out of every fast-weight MLP)."""
        return self.hidden_size // self.num_lact_heads

    @property
    def fw_hidden_dim(self) -> int:
        """Inner width d_h of every fast-weight MLP."""
        return int(self.fw_head_dim * self.inter_multi)

    # -- validation ------------------------------------------------------------------------------
    def _validate(self) -> None:
        def _int(key: str, minimum: int) -> None:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{key}={value!r} must be an int >= {minimum}")
            if value < minimum:
                raise ValueError(f"{key}={value} must be >= {minimum}")

        for key, minimum in (
            ("hidden_size", 1), ("num_hidden_layers", 0), ("num_attn_heads", 1), ("num_lact_heads", 1),
            ("lact_chunk_size", 1), ("vocab_size", 1), ("r", 1), ("lr_dim", 1),
        ):
            _int(key, minimum)
        if self.hidden_size % self.num_attn_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attn_heads={self.num_attn_heads}; "
                f"choose num_attn_heads among the divisors of {self.hidden_size}"
            )
        if self.hidden_size % self.num_lact_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_lact_heads={self.num_lact_heads}; "
                f"choose num_lact_heads among the divisors of {self.hidden_size}"
            )
        head_dim = self.hidden_size // self.num_attn_heads
        if head_dim % 2 != 0:
            raise ValueError(
                f"attention head dim hidden_size/num_attn_heads={head_dim} must be even for RoPE; "
                "change num_attn_heads"
            )
        if self.fw_hidden_dim < 1:
            raise ValueError(
                f"inter_multi={self.inter_multi} gives a fast-weight inner width "
                f"int({self.fw_head_dim} * {self.inter_multi}) = {self.fw_hidden_dim}; it must be >= 1"
            )
        if self.lr_dim != 1:
            raise ValueError(
                f"lr_dim={self.lr_dim} is not supported: the chunk operation takes one learning rate per "
                "token, head and weight (lr_dim=1, the value of every official config)"
            )
        if self.lr_parameterization.lower() != "mamba":
            raise ValueError(
                f"lr_parameterization={self.lr_parameterization!r} is not implemented (the reference only "
                "has 'mamba': softplus(x + inv_softplus(1e-3)))"
            )
        if self.ttt_loss_type != "dot_product":
            raise ValueError(f"ttt_loss_type={self.ttt_loss_type!r} is not supported; use 'dot_product'")
        if self.hidden_act != "swish":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use 'swish'")
        low_rank = self.w0_w2_low_rank
        if isinstance(low_rank, bool) or not isinstance(low_rank, int):
            raise TypeError(f"w0_w2_low_rank={low_rank!r} must be an int (-1 = full-rank fast weights)")
        max_rank = min(self.fw_hidden_dim, self.fw_head_dim)
        if low_rank > max_rank:
            raise ValueError(
                f"w0_w2_low_rank={low_rank} exceeds min(d_h, d_in)={max_rank} of the fast weights "
                f"(d_in = hidden_size/num_lact_heads = {self.fw_head_dim}, d_h = {self.fw_hidden_dim}); "
                "use a smaller rank or -1 for full rank"
            )
        if self.window_size is not None:
            _int("window_size", 1)
        if self.ttt_backprop not in TTT_BACKPROP_MODES:
            raise ValueError(f"ttt_backprop={self.ttt_backprop!r} must be one of {TTT_BACKPROP_MODES}")
        for key in ("residual_ttt", "greedy_ttt", "use_muon", "use_momentum", "ttt_prenorm", "ttt_nope",
                    "qkv_silu", "no_v_silu", "learnable_ttt_scale", "fp32_states", "use_fused_kernel"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key}={getattr(self, key)!r} must be a bool")
        self.residual_ttt = resolve_greedy_residual(self.greedy_ttt, self.residual_ttt, stacklevel=3)


def resolve_greedy_residual(greedy_ttt: bool, residual_ttt: bool, stacklevel: int = 2) -> bool:
    """The `residual_ttt` to use with `greedy_ttt`: the one rule shared by the config and the layer.

    A greedy MLP regresses v with its own output, which a residual stack (h + MLP(h)) does not
    produce, so the pair has no meaning. The config and `LaCTSWIGLULayer` both call this: the pair
    warns (UserWarning) and residual is turned off, so a config file that sets both still loads. The
    chunk op `lact.ops.lact_swiglu`, which takes explicit flags and never sees a config, raises a
    ValueError for the pair instead of changing what it was asked to compute.

    Args:
        greedy_ttt, residual_ttt: the requested flags.
        stacklevel: as `warnings.warn`'s, counted from the caller of this function.

    Returns:
        `residual_ttt`, or False when both flags are set.
    """
    if greedy_ttt and residual_ttt:
        warnings.warn(
            "greedy_ttt=True is incompatible with residual_ttt=True (each greedy MLP is trained on its "
            "own local objective, which a residual stack does not define); setting residual_ttt=False",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
        return False
    return residual_ttt
