"""Causality under non-finite inputs (issue 11, item 6): a NaN/inf at token t must leave every output
before t finite and bit-identical to the clean run, in the LaCT layer, its window attention and the model.

Before the fix, the window attention's P @ V multiplied the zero weight of a masked future key by its
NaN value (0 x NaN = NaN) and every earlier query of the window became NaN.
"""

from __future__ import annotations

import pytest
import torch

from lact.layers import LaCTSWIGLULayer, window_attention
from tests.lact.test_modeling import perturb_params, tiny_config, tiny_model

BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("window", [None, 4, 32])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_window_attention_keeps_a_bad_future_key_or_value_out_of_the_past(window, which, bad):
    g = torch.Generator().manual_seed(0)
    B, T, H, D, t = 2, 13, 2, 4, 6
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    clean = window_attention(q, k, v, window)
    x = {"k": k.clone(), "v": v.clone()}
    x[which][0, t, 1, 2] = BAD[bad]  # one element of one head of one sequence
    out = window_attention(q, x["k"], x["v"], window)
    torch.testing.assert_close(out[:, :t], clean[:, :t], rtol=0, atol=0)
    torch.testing.assert_close(out[1], clean[1], rtol=0, atol=0)  # the other sequence
    torch.testing.assert_close(out[0, :, 0], clean[0, :, 0], rtol=0, atol=0)  # the other head
    # the queries that do see it are not finite (nothing is hidden), those past its window are clean again
    reach = T if window is None else min(T, t + window)
    assert not torch.isfinite(out[0, t:reach, 1]).any()
    torch.testing.assert_close(out[0, reach:], clean[0, reach:], rtol=0, atol=0)


def test_window_attention_ignores_a_bad_padded_key_and_zeroes_padded_queries():
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 2, 9, 2, 4
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 6:] = 0  # right padding of sequence 0
    clean = window_attention(q, k, v, 4, mask)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[0, 7] = float("nan")  # garbage in a padded slot
    out = window_attention(q2, k2, v2, 4, mask)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    assert (out[0, 6:] == 0).all()


LAYER_CASES = {
    "r1": {},
    "short-window": dict(window_size=4),
    "full-window": dict(window_size=64),
    "r2-momentum": dict(r=2, use_momentum=True),
    "muon-prenorm": dict(use_muon=True, ttt_prenorm=True),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("backprop", ["autograd", "manual"])
def test_layer_nan_at_t_leaves_earlier_outputs_unchanged(case, backprop):
    cfg = tiny_config(**LAYER_CASES[case])
    torch.manual_seed(0)
    layer = LaCTSWIGLULayer.from_config(cfg, 0)
    perturb_params(layer, seed=1)
    layer.ttt_backprop = backprop
    T = 19  # chunks of 8: t = 8 starts a chunk, t = 5 and 13 are mid-chunk, 16 starts the last one
    x = torch.randn(2, T, cfg.hidden_size, generator=torch.Generator().manual_seed(2), requires_grad=True)
    clean = layer(x)[0]
    for t in (5, 8, 13, 16):
        xn = x.detach().clone()
        xn[0, t, 3] = float("nan")
        out = layer(xn.requires_grad_(True))[0]
        torch.testing.assert_close(out[:, :t], clean[:, :t], rtol=0, atol=0, msg=f"t={t}")
        torch.testing.assert_close(out[1], clean[1], rtol=0, atol=0, msg=f"t={t}, other sequence")
        assert not torch.isfinite(out[0, t]).all()


def test_model_nan_embedding_at_t_leaves_earlier_logits_unchanged():
    model = tiny_model(seed=0, window_size=4)
    perturb_params(model, seed=3)
    ids = torch.randint(0, 32, (1, 21), generator=torch.Generator().manual_seed(4))
    emb = model.get_input_embeddings()(ids).detach()
    clean = model(inputs_embeds=emb).logits
    for t in (3, 8, 15):
        bad = emb.clone()
        bad[0, t] = float("nan")
        out = model(inputs_embeds=bad).logits
        torch.testing.assert_close(out[:, :t], clean[:, :t], rtol=0, atol=0, msg=f"t={t}")
