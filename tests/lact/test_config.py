"""`LaCTSWIGLUConfig`: official configs load unchanged, defaults match the reference, bad values fail early."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from lact import LaCTForCausalLM, LaCTSWIGLUConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# The reference's __init__ defaults (a1600012888/LaCT, configuration_lact_swiglu.py), listed by hand.
REFERENCE_DEFAULTS = {
    "hidden_size": 2048, "num_hidden_layers": 24, "num_attn_heads": 32, "num_lact_heads": 4,
    "inter_multi": 1, "qkv_bias": False, "attn_qk_norm": False, "lact_chunk_size": 2048,
    "use_muon": False, "lr_dim": 1, "qkv_silu": True, "no_v_silu": False,
    "lr_parameterization": "mamba", "learnable_ttt_scale": True, "use_momentum": True,
    "ttt_loss_type": "dot_product", "ttt_prenorm": False, "ttt_nope": False, "w0_w2_low_rank": -1,
    "window_size": 2048, "rope_theta": 10000.0, "max_position_embeddings": 2048, "hidden_ratio": 4,
    "intermediate_size": None, "hidden_act": "swish", "initializer_range": 0.006,
    "elementwise_affine": True, "norm_eps": 1e-6, "use_cache": True, "pad_token_id": None,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "fuse_norm": True,
    "last_layer_fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True, "vocab_size": 32000,
    "fw_init_gain": 0.5, "use_fused_kernel": False, "fp32_states": False,
}
NEW_DEFAULTS = {"r": 1, "residual_ttt": False, "greedy_ttt": False, "ttt_backprop": "auto"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> dict:
    base = dict(hidden_size=32, num_hidden_layers=1, num_attn_heads=4, num_lact_heads=2, vocab_size=64)
    base.update(kw)
    return base


def test_defaults_match_reference_and_keep_original_behaviour():
    cfg = LaCTSWIGLUConfig()
    assert cfg.model_type == "lact_swiglu"
    for key, value in {**REFERENCE_DEFAULTS, **NEW_DEFAULTS}.items():
        assert getattr(cfg, key) == value, key


OUR_CONFIGS = [
    "760M_lact_swiglu_nh4_fwlow_rank_momentum.json",
    "816M_lact_swiglu_nh4_fwlow_rank_momentum_r2_e2e.json",
    "lact_debug.json",
    "lact_debug_r2.json",
]


@pytest.mark.parametrize("name", OUR_CONFIGS)
def test_every_shipped_config_loads_unchanged(name):
    raw = json.loads((CONFIGS / name).read_text())
    cfg = LaCTSWIGLUConfig.from_json_file(str(CONFIGS / name))
    for key, value in raw.items():
        assert getattr(cfg, key) == value, key
    again = LaCTSWIGLUConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_official_variants_load_and_816m_counts_its_parameters():
    """The official 760M file and its muon / fused-kernel variants (their extra keys are facts of
    the reference JSONs); the user's 816M r=2 config has the parameter count its notes report."""
    base = json.loads((CONFIGS / "760M_lact_swiglu_nh4_fwlow_rank_momentum.json").read_text())
    for extra in ({}, {"use_muon": True}, {"no_v_silu": True, "use_fused_kernel": True, "fp32_states": True},
                  {"hidden_size": 3072, "num_attn_heads": 24}):
        cfg = LaCTSWIGLUConfig(**{**base, **extra})
        for key, value in {**base, **extra}.items():
            assert getattr(cfg, key) == value
    counts = {}
    for name in ("760M_lact_swiglu_nh4_fwlow_rank_momentum.json",
                 "816M_lact_swiglu_nh4_fwlow_rank_momentum_r2_e2e.json"):
        cfg = LaCTSWIGLUConfig.from_json_file(str(CONFIGS / name))
        with torch.device("meta"):
            model = LaCTForCausalLM(cfg)
        counts[name[:4]] = sum(p.numel() for p in model.parameters())
    # 816,499,680: the total printed in the user's 816M FSDP test log (seeds/002)
    assert counts["816M"] == 816_499_680
    # r=2 adds one low-rank MLP per layer: 24 * 4 heads * (2 * 2 * 384 * 32 + 384 * 384)
    assert counts["816M"] - counts["760M"] == 24 * 4 * (2 * 2 * 384 * 32 + 384 * 384)


def test_auto_config_round_trip(tmp_path):
    cfg = LaCTSWIGLUConfig(**tiny(r=3, residual_ttt=True, ttt_backprop="manual"))
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LaCTSWIGLUConfig)
    assert (loaded.r, loaded.residual_ttt, loaded.greedy_ttt, loaded.ttt_backprop) == (3, True, False, "manual")


@pytest.mark.parametrize("r", [0, -2])
def test_r_below_one_is_an_error(r):
    with pytest.raises(ValueError, match=r"r=-?\d+ must be >= 1"):
        LaCTSWIGLUConfig(**tiny(r=r))


def test_r_must_be_an_int():
    with pytest.raises(TypeError, match="r=2.0"):
        LaCTSWIGLUConfig(**tiny(r=2.0))


def test_greedy_with_residual_warns_and_turns_residual_off():
    with pytest.warns(UserWarning, match="residual_ttt=False"):
        cfg = LaCTSWIGLUConfig(**tiny(r=2, greedy_ttt=True, residual_ttt=True))
    assert cfg.greedy_ttt and not cfg.residual_ttt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the valid combinations are silent
        LaCTSWIGLUConfig(**tiny(r=2, greedy_ttt=True))
        LaCTSWIGLUConfig(**tiny(r=2, residual_ttt=True))


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(ttt_backprop="fast"), "ttt_backprop='fast'"),
        (dict(hidden_size=30), "hidden_size=30 must be divisible by num_attn_heads=4"),
        (dict(hidden_size=36, num_attn_heads=6, num_lact_heads=5), "num_lact_heads=5"),
        (dict(num_attn_heads=32), "must be even for RoPE"),
        (dict(w0_w2_low_rank=17), "w0_w2_low_rank=17 exceeds min"),
        (dict(inter_multi=0.01), "inter_multi=0.01"),
        (dict(lr_dim=2), "lr_dim=2"),
        (dict(lr_parameterization="linear"), "lr_parameterization='linear'"),
        (dict(ttt_loss_type="l2"), "ttt_loss_type='l2'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(lact_chunk_size=0), "lact_chunk_size=0"),
        (dict(window_size=0), "window_size=0"),
    ],
)
def test_impossible_values_raise_value_error_naming_key_and_value(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        LaCTSWIGLUConfig(**tiny(**kw))


def test_non_bool_flags_raise_type_error():
    with pytest.raises(TypeError, match="residual_ttt='yes'"):
        LaCTSWIGLUConfig(**tiny(residual_ttt="yes"))
