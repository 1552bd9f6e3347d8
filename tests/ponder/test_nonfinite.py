"""Causality under non-finite inputs in PonderTTT's own layer and the adaptive path built on it
(issue 11, item 6): a NaN at token t leaves every output before t finite and bit-identical.

`PonderSimpleTTTLayer.forward_causal` masks nothing by multiplication: mini-batch b is produced by the
fast weights updated on mini-batches < b only, so a NaN can enter the weights only after its own
mini-batch has been produced. The official layers of the adaptive path (`official-linear`/`-mlp`) run
`official_port.ops.dual`, whose causal mask is tested with that op.
"""

from __future__ import annotations

import pytest
import torch

from ponder.adaptive import AdaptiveConfig, AdaptiveLM
from ponder.simple_layer import PonderSimpleTTTLayer, SimpleTTTConfig

T = 13  # mini-batches of 4: t = 4 and 8 start one, t = 2, 7 and 12 are inside one


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, T, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_simple_layer_nan_at_t_leaves_earlier_outputs_unchanged(inner_steps):
    torch.manual_seed(0)
    layer = PonderSimpleTTTLayer(SimpleTTTConfig(hidden_dim=16, num_heads=2, head_dim=8, ttt_hidden_dim=32,
                                                 chunk_size=4, dropout_rate=0.0, inner_lr=0.5))
    x = _x()
    clean, _, _ = layer.forward_causal(x, inner_steps=inner_steps)
    for t in (2, 4, 7, 8, 12):
        bad = x.clone()
        bad[0, t, 5] = float("nan")
        out, stats, state = layer.forward_causal(bad, inner_steps=inner_steps)
        torch.testing.assert_close(out[:, :t], clean[:, :t], rtol=0, atol=0, msg=f"t={t}")
        torch.testing.assert_close(out[1], clean[1], rtol=0, atol=0, msg=f"t={t}, other sequence")
        assert not torch.isfinite(out[0, t]).all()
        assert not torch.isfinite(state.w0[0]).all() and torch.isfinite(state.w0[1]).all()
    # carried state: the NaN in the second call never reaches the first call's outputs or state
    first, _, state = layer.forward_causal(x[:, :8], inner_steps=inner_steps)
    bad = x[:, 8:].clone()
    bad[0, 1] = float("nan")
    second, _, _ = layer.forward_causal(bad, state=state, inner_steps=inner_steps)
    torch.testing.assert_close(torch.cat([first, second[:, :1]], 1), clean[:, :9], rtol=0, atol=0)


def test_adaptive_ponder_simple_nan_at_t_leaves_earlier_outputs_unchanged():
    torch.manual_seed(0)
    model = AdaptiveLM(AdaptiveConfig(hidden_size=16, layer="ponder-simple", num_heads=2, mini_batch_size=4),
                       torch.randn(50, 16))
    with torch.no_grad():
        model.residual_gain.fill_(0.5)  # trained-like: the TTT output matters
    h = _x(1)
    clean, _, _ = model.adapt(h)
    for t in (2, 4, 7, 12):
        bad = h.clone()
        bad[0, t] = float("nan")
        out, _, _ = model.adapt(bad)
        torch.testing.assert_close(out[:, :t], clean[:, :t], rtol=0, atol=0, msg=f"t={t}")
        torch.testing.assert_close(model.logits(out[:, :t]), model.logits(clean[:, :t]), rtol=0, atol=0)
