"""Library API of the LaCT and TTT models on bad or degenerate input (issue 11, item 9): clear errors
naming the argument, or defined results (`ttt_common.model_inputs`).

Degenerate inputs with a defined result are checked against an independent computation: B = 0 gives
empty outputs; a loss with no scored target is 0 with zero gradients, and a loss with some ignored
targets equals the mean cross-entropy over the kept ones computed by hand.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lact import LaCTForCausalLM, LaCTSWIGLUConfig, LaCTSWIGLULayer
from official_port import TTTConfig, TTTForCausalLM
from official_port.layers import TTT_LAYERS

V = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def lact_model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = LaCTSWIGLUConfig(hidden_size=16, num_hidden_layers=1, num_attn_heads=2, num_lact_heads=2,
                               lact_chunk_size=4, window_size=4, vocab_size=V, intermediate_size=32,
                               max_position_embeddings=64)
    return LaCTForCausalLM(cfg)


def ttt_model():
    torch.manual_seed(0)
    return TTTForCausalLM(TTTConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1,
                                    mini_batch_size=4, vocab_size=V, max_sequence_length=64))


MODELS = {"lact": lact_model, "ttt": ttt_model}


def ids(B=2, T=9, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
def test_bad_ids_and_embeddings_are_named(name):
    model = MODELS[name]()
    x = ids()
    cases = [
        (dict(input_ids=x.float()), TypeError, "input_ids must hold integer token ids.*inputs_embeds"),
        (dict(input_ids=x + V), ValueError, rf"token id {int((x + V).max())}, outside .*\[0, {V}\)"),
        (dict(input_ids=x - V - 5), ValueError, r"token id -\d+, outside"),
        (dict(input_ids=x[:, :0]), ValueError, "length 0"),
        (dict(inputs_embeds=torch.randn(2, 9, 16, dtype=torch.float64)), TypeError,
         "float64 but the model's weights are torch.float32"),
        (dict(inputs_embeds=torch.ones(2, 9, 16, dtype=torch.long)), TypeError, "floating-point"),
        (dict(inputs_embeds=torch.randn(2, 9, 15)), ValueError, "hidden_size=16"),
        (dict(input_ids=x, labels=x.float()), TypeError, "labels must hold integer"),
        (dict(input_ids=x, labels=x + V), ValueError, rf"labels hold {int((x + V)[:, 1:].max())}, .*-100"),
        (dict(input_ids=x, labels=x[:, :4]), ValueError, "labels must have shape"),
        (dict(input_ids=x, attention_mask=torch.ones(2, 4)), ValueError, "attention_mask must be"),
    ]
    for kwargs, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            model(**kwargs)
    # int32 ids are accepted (what nn.Embedding takes) and equal int64 ids
    torch.testing.assert_close(model(input_ids=x.int()).logits, model(input_ids=x).logits, rtol=0, atol=0)
    # a padding label of -100 at position 0 is never scored, so it is not a bad label
    lab = x.clone()
    lab[:, 0] = -100
    assert torch.isfinite(model(input_ids=x, labels=lab).loss)


@pytest.mark.parametrize("name", list(MODELS))
def test_degenerate_inputs_have_defined_results(name):
    model = MODELS[name]()
    # B = 0: empty logits of the right shape, no error
    assert model(input_ids=ids()[:0]).logits.shape == (0, 9, V)
    # T = 1: logits; a loss has no target -> 0 with zero gradients and a warning
    x = ids(T=1)
    assert model(input_ids=x).logits.shape == (2, 1, V)
    for labels in (x, torch.full((2, 9), -100), torch.cat([ids()[:, :1], torch.full((2, 8), -100)], 1)):
        model.zero_grad()
        inp = ids(T=labels.shape[1])
        with pytest.warns(UserWarning, match="no scored next-token target"):
            loss = model(input_ids=inp, labels=labels).loss
        assert loss.item() == 0.0
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # some ignored targets: the mean over the kept ones, computed independently
    x = ids(seed=3)
    lab = x.clone()
    lab[0, 3:7] = -100
    out = model(input_ids=x, labels=lab)
    logp = torch.log_softmax(out.logits.double(), -1)
    kept = [(b, t) for b in range(2) for t in range(8) if lab[b, t + 1] != -100]
    ref = -sum(logp[b, t, lab[b, t + 1]] for b, t in kept) / len(kept)
    assert len(kept) == 12 and math.isclose(out.loss.item(), ref.item(), rel_tol=1e-6)


def test_layers_refuse_wrong_dtypes_and_empty_time_and_accept_empty_batch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = LaCTSWIGLUConfig(hidden_size=16, num_hidden_layers=1, num_attn_heads=2, num_lact_heads=2,
                               lact_chunk_size=4, window_size=4, vocab_size=V)
    tcfg = TTTConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, mini_batch_size=4, vocab_size=V)
    layers = {"lact": LaCTSWIGLULayer.from_config(cfg, 0), "ttt_linear": TTT_LAYERS["ttt_linear"](tcfg),
              "ttt_mlp": TTT_LAYERS["ttt_mlp"](tcfg)}
    for name, layer in layers.items():
        with pytest.raises(TypeError, match="float64 but the"):
            layer(torch.randn(2, 5, 16, dtype=torch.float64))
        with pytest.raises(TypeError, match="floating-point"):
            layer(torch.ones(2, 5, 16, dtype=torch.long))
        with pytest.raises(ValueError, match="T=0"):
            layer(torch.randn(2, 0, 16))
        x = torch.randn(0, 5, 16, requires_grad=True)
        out = layer(x)[0]
        assert out.shape == (0, 5, 16), name
        out.sum().backward()  # an empty batch still backpropagates (to nothing)
        assert x.grad.shape == x.shape
        # T = 1 is an ordinary input
        assert torch.isfinite(layer(torch.randn(2, 1, 16))[0]).all()
    # under autocast the dtype rule is autocast's: bf16 inputs into a float32 layer run
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layers["ttt_linear"](torch.randn(1, 6, 16, dtype=torch.bfloat16))[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
