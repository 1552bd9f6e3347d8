"""`TTTConfig`: the configuration of the official TTT language model, HF style.

Reproduces `ModelConfig` and the size presets `CONFIGS` of test-time-training/ttt-lm-jax
(`ttt/models/model.py`). Field names and defaults follow the official code, so an official
`config_full` dict (as stored in the parity fixtures) loads unchanged with `TTTConfig(**d)`;
generic `PretrainedConfig` fields it carries are accepted and ignored.
"""

from __future__ import annotations

from transformers import PretrainedConfig

SEQ_MODELING_BLOCKS = ("self_attention", "ttt_linear", "ttt_mlp", "ttt_linear_base", "ttt_mlp_base")

_COMMON = {
    "vocab_size": 32000,
    "max_sequence_length": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}
_SIZES = {  # name: (num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)
    "125m": (12, 768, 12, 2048),
    "350m": (24, 1024, 16, 2736),
    "760m": (24, 1536, 16, 4096),
    "1b": (24, 2048, 32, 5504),
}
_TTT = {
    "seq_modeling_block": "ttt_linear",
    "ttt_base_lr": 1.0,
    "mini_batch_size": 16,
    "remat_mini_batch_group_size": 4,
    "pre_conv": True,
    "conv_width": 4,
}

# The official presets: "<size>" is the Transformer baseline, "<size>-TTT" the TTT-Linear model
# (use `seq_modeling_block="ttt_mlp"` for TTT-MLP, as the official scripts do).
CONFIGS: dict[str, dict] = {}
for _name, (_layers, _hidden, _heads, _inter) in _SIZES.items():
    _size = dict(_COMMON, num_hidden_layers=_layers, hidden_size=_hidden,
                 num_attention_heads=_heads, intermediate_size=_inter)
    CONFIGS[_name] = dict(_size, seq_modeling_block="self_attention", pre_conv=False)
    CONFIGS[f"{_name}-TTT"] = dict(_size, **_TTT)


class TTTConfig(PretrainedConfig):
    """Configuration of `TTTModel` / `TTTForCausalLM` and of the TTT layers.

    Args (official names and defaults; the ones that change values):
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: sizes.
        max_sequence_length: the official layers need exactly this length; this port accepts any
            length and uses it only for the attention RoPE table size.
        rms_norm_eps: RMSNorm epsilon (1e-6).
        initializer_range: std of the normal init (0.02).
        tie_word_embeddings: LM head tied to `wte` (True in every preset).
        seq_modeling_block: one of `SEQ_MODELING_BLOCKS`.
        rope_theta: RoPE base.
        mini_batch_size: TTT mini-batch size m (16).
        ttt_base_lr: base inner learning rate (1.0).
        pre_conv: causal depthwise conv block before the sequence-modeling block.
        conv_width: width of every causal depthwise conv (4).
        remat_mini_batch_group_size: mini-batches per gradient-checkpointed group (values unchanged).
        remat_conv, remat_block, ...: accepted for compatibility; they never change values.
    """

    model_type = "ttt"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        max_sequence_length: int = 2048,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        seq_modeling_block: str = "ttt_linear",
        rope_theta: float = 10000.0,
        mini_batch_size: int = 16,
        ttt_base_lr: float = 1.0,
        pre_conv: bool = False,
        conv_width: int = 4,
        remat_mini_batch_group_size: int = 4,
        remat_conv: str = "",
        remat_block: str = "",
        **kwargs,
    ):
        # generic/official-only fields that carry no meaning here (dropouts are 0 in every preset)
        for key in ("use_rotary_emb", "ttt_base_lr_init", "ttt_base_lr_warmup", "resid_pdrop",
                    "embd_pdrop", "attn_pdrop", "remat_attention", "remat_mlp", "scan_attention",
                    "scan_mlp", "scan_query_chunk_size", "scan_key_chunk_size", "scan_mlp_chunk_size",
                    "fcm_min_ratio", "fcm_max_ratio"):
            kwargs.pop(key, None)
        kwargs.pop("model_type", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_sequence_length = max_sequence_length
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.seq_modeling_block = seq_modeling_block
        self.rope_theta = rope_theta
        self.mini_batch_size = mini_batch_size
        self.ttt_base_lr = ttt_base_lr
        self.pre_conv = pre_conv
        self.conv_width = conv_width
        self.remat_mini_batch_group_size = remat_mini_batch_group_size
        self.remat_conv = remat_conv
        self.remat_block = remat_block
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_ttt()

    def validate_ttt(self) -> None:
        """Raise a `ValueError` naming the field when the configuration cannot work."""
        if self.seq_modeling_block not in SEQ_MODELING_BLOCKS:
            raise ValueError(f"seq_modeling_block={self.seq_modeling_block!r} is not one of {SEQ_MODELING_BLOCKS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"head_dim={self.hidden_size // self.num_attention_heads} must be even for RoPE")
        for key in ("mini_batch_size", "conv_width", "remat_mini_batch_group_size", "num_hidden_layers",
                    "vocab_size", "intermediate_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TTTConfig:
        """Build an official preset (`"125m"`, `"125m-TTT"`, ..., `"1b-TTT"`), with overrides."""
        if name not in CONFIGS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(CONFIGS)}")
        return cls(**dict(CONFIGS[name], **overrides))
