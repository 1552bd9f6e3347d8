"""Tests of `official_port.convert_jax`: the official streaming checkpoint reader, the flax -> port
name map (with its errors) and the conversion CLI."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
import torch

from official_port import TTTForCausalLM
from official_port.convert_jax import (
    flax_params_to_state_dict,
    load_flax_params,
    load_official_checkpoint,
    main,
    read_streaming_checkpoint,
    resolve_config,
)
from parity.fixtures import BUNDLED, load_case
from tests.helpers import assert_close

CKPT_DIR = BUNDLED / "checkpoints"
PARAMS_FILE = CKPT_DIR / "model_ttt_linear.streaming_params"
TRAIN_STATE_FILE = CKPT_DIR / "model_ttt_linear.streaming_train_state"


@pytest.fixture(scope="module")
def ckpt_case():
    return load_case(CKPT_DIR / "model_ttt_linear_ckpt.json")


@pytest.fixture(scope="module")
def model_case():
    return load_case(BUNDLED / "official" / "model_ttt_linear.json")


# ------------------------------------------------------------------ the streaming format
def test_both_streaming_files_hold_the_same_bf16_model_params(model_case):
    p = read_streaming_checkpoint(PARAMS_FILE)
    t = read_streaming_checkpoint(TRAIN_STATE_FILE)  # optimizer state and step are skipped
    fixture_keys = {k[len("param/"):] for k in model_case.arrays if k.startswith("param/")}
    assert set(p) == set(t) == fixture_keys
    for k in p:
        assert p[k].dtype == np.float32 and p[k].shape == model_case.arrays["param/" + k].shape
        np.testing.assert_array_equal(p[k], t[k])
        # bfloat16 decoded exactly: the low 16 bits of every float32 are zero
        assert not (p[k].view(np.uint32) & 0xFFFF).any()
    # one adamw step (lr 3e-3) away from the fixture's float32 params, then rounded to bf16
    k = "model/h/0/seq_modeling_block/wq/kernel"
    diff = np.abs(p[k] - model_case.arrays["param/" + k]).max()
    assert 1e-4 < diff < 2e-2


def test_bfloat16_decoding_matches_torch(tmp_path):
    x = torch.randn(3, 5) * 7
    bf = x.to(torch.bfloat16)
    payload = msgpack.packb(msgpack.ExtType(1, msgpack.packb(
        [[3, 5], "bfloat16", bf.view(torch.int16).numpy().tobytes()])))
    ints = np.arange(4, dtype=np.int32)
    payload_int = msgpack.packb(msgpack.ExtType(1, msgpack.packb([[4], "int32", ints.tobytes()])))
    f32 = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    payload_f32 = msgpack.packb(msgpack.ExtType(1, msgpack.packb([[2, 3], "float32", f32.tobytes()])))
    path = tmp_path / "streaming_params"
    with open(path, "wb") as f:
        for key, pl in ((["model", "a"], payload), (["model", "b"], payload_int), (["model", "c"], payload_f32),
                        (["opt_state", "x"], payload)):
            f.write(msgpack.packb([key, pl]))
    got = read_streaming_checkpoint(path)
    assert set(got) == {"model/a", "model/b", "model/c"}
    np.testing.assert_array_equal(got["model/a"], bf.float().numpy())
    np.testing.assert_array_equal(got["model/b"], ints)
    np.testing.assert_array_equal(got["model/c"], f32)


# The checkpoint fixture's logits (both streaming files) are checked once, in parity/test_parity.py.


def test_truncated_garbage_and_empty_files_give_clear_errors(tmp_path):
    data = PARAMS_FILE.read_bytes()
    cut = tmp_path / "truncated"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        read_streaming_checkpoint(cut)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not an official streaming checkpoint|truncated"):
        read_streaming_checkpoint(garbage)
    text = tmp_path / "text"
    text.write_text("hello, this is not msgpack\n" * 10)
    with pytest.raises(ValueError, match="not an official streaming checkpoint|truncated"):
        read_streaming_checkpoint(text)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="no model parameters"):
        read_streaming_checkpoint(empty)
    with pytest.raises(FileNotFoundError):
        read_streaming_checkpoint(tmp_path / "missing")


# ------------------------------------------------------------------ the name map
def _fixture_params(case):
    return {k[len("param/"):]: v for k, v in case.arrays.items() if k.startswith("param/")}


def test_name_map_covers_every_parameter_with_the_right_layout(model_case):
    params = _fixture_params(model_case)
    config = resolve_config(model_case.meta["config_full"])
    sd = flax_params_to_state_dict(params, config)
    model = TTTForCausalLM(config)
    assert set(sd) == set(model.state_dict()) - {"lm_head.weight"}
    # spot-check the layouts against section 3.2 of the fixture README
    ff = params["model/h/1/feed_forward/w2/kernel"]
    np.testing.assert_array_equal(sd["model.h.1.feed_forward.w2.weight"].numpy(), ff.T)
    conv = params["model/h/0/conv/conv1/kernel"]  # [w, 1, D]
    np.testing.assert_array_equal(sd["model.h.0.conv.conv1.weight"].numpy()[5, 0, :], conv[:, 0, 5])
    np.testing.assert_array_equal(sd["model.wte.weight"].numpy(), params["model/wte/embedding"])
    tied = load_flax_params(params, config)
    assert tied.lm_head.weight is tied.model.wte.weight


def test_missing_extra_and_misshaped_keys_are_named(model_case):
    params = _fixture_params(model_case)
    config = resolve_config(model_case.meta["config_full"])
    missing = dict(params)
    del missing["model/h/1/ffn_norm/kernel"]
    with pytest.raises(ValueError, match=r"missing.*model\.h\.1\.ffn_norm\.weight"):
        flax_params_to_state_dict(missing, config)
    extra = dict(params, **{"model/h/2/ffn_norm/kernel": params["model/h/1/ffn_norm/kernel"]})
    with pytest.raises(ValueError, match=r"unexpected.*model/h/2/ffn_norm/kernel"):
        flax_params_to_state_dict(extra, config)
    stray = dict(params, **{"model/h/0/mystery/kernel": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected.*model/h/0/mystery/kernel"):
        flax_params_to_state_dict(stray, config)
    wrong = dict(params)
    wrong["model/h/0/feed_forward/w1/kernel"] = params["model/h/0/feed_forward/w1/kernel"][:, :-1]
    with pytest.raises(ValueError, match=r"model/h/0/feed_forward/w1/kernel: shape \(64, 127\)"):
        flax_params_to_state_dict(wrong, config)
    layer_missing = dict(params)
    del layer_missing["model/h/0/seq_modeling_block/ttt_norm/scale"]
    with pytest.raises(ValueError, match="ttt_norm"):
        flax_params_to_state_dict(layer_missing, config)
    # a config that does not match the checkpoint (self_attention instead of ttt_linear)
    other = resolve_config(dict(model_case.meta["config_full"], seq_modeling_block="self_attention"))
    with pytest.raises(ValueError, match="unexpected"):
        flax_params_to_state_dict(params, other)


def test_untied_lm_head_kernel_is_transposed(model_case):
    params = _fixture_params(model_case)
    config = resolve_config(dict(model_case.meta["config_full"], tie_word_embeddings=False))
    with pytest.raises(ValueError, match=r"missing.*lm_head\.weight"):
        flax_params_to_state_dict(params, config)
    kernel = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)  # [D, V]
    model = load_flax_params(dict(params, **{"lm_head/kernel": kernel}), config)
    assert model.lm_head.weight is not model.model.wte.weight
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), kernel.T)


def test_resolve_config_sources(tmp_path, model_case):
    assert resolve_config("125m-TTT").hidden_size == 768
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"config_full": model_case.meta["config_full"]}))
    assert resolve_config(path).seq_modeling_block == "ttt_linear"
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_config("no-such-preset")


# ------------------------------------------------------------------ CLI
def test_cli_writes_a_reloadable_hf_folder(tmp_path, ckpt_case, capsys):
    out = tmp_path / "hf"
    rc = main([str(PARAMS_FILE), "--config", str(CKPT_DIR / "model_ttt_linear_ckpt.json"), "--out", str(out)])
    assert rc == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert "reload max|logit diff| = 0" in capsys.readouterr().out
    model = TTTForCausalLM.from_pretrained(out).eval()
    ids = torch.as_tensor(ckpt_case.arrays["input/input_ids"]).long()
    with torch.no_grad():
        assert_close("logits", ckpt_case.arrays["output/logits"], model(ids).logits, 1e-5)


def test_npz_of_flax_params_loads(model_case):
    model = load_official_checkpoint(BUNDLED / "official" / "model_ttt_linear.npz", model_case.meta["config_full"])
    ids = torch.as_tensor(model_case.arrays["input/input_ids"]).long()
    with torch.no_grad():
        assert_close("logits", model_case.arrays["output/logits"], model(ids).logits, 1e-5)
