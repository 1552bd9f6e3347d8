"""The official TTT layers: fixture intermediates, carried state, causality, remat, init, errors."""

import numpy as np
import pytest
import torch

from official_port.configuration_ttt import TTTConfig
from official_port.layers import TTT_LAYERS, TTTMLP, TTTLinear, causal_conv_pair, flax_layer_params_to_torch
from parity.fixtures import BUNDLED, load_case
from parity.official_layer import build_layer

# The bundled layer fixtures themselves run once, in parity/test_parity.py (with what each must compare).


def test_intermediates_match_fixture():
    """The projections alone reproduce the fixture's `intermediate/*` arrays (localises failures)."""
    case = load_case(BUNDLED / "official" / "layer_ttt_mlp.json")
    layer = build_layer(case)
    x = torch.tensor(case.arrays["input/hidden_states"])
    with torch.no_grad():
        XQ, XK, XV, _ = layer.qkv(x, None)
    for name, got in (("conv_q", XQ), ("conv_k", XK), ("wv", XV)):
        ref = case.arrays[f"intermediate/{name}"]
        assert np.abs(got.numpy() - ref).max() <= 1e-5 * np.abs(ref).max(), name


def small_layer(name, seed=0, **cfg):
    torch.manual_seed(seed)
    config = TTTConfig(**{"hidden_size": 16, "num_attention_heads": 2, "mini_batch_size": 4, "conv_width": 3,
                          "remat_mini_batch_group_size": 2, **cfg})
    layer = TTT_LAYERS[name](config).double()
    with torch.no_grad():  # move every parameter off its constant init so all paths matter
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        layer.learnable_ttt_lr_bias.add_(2.0)  # larger inner steps: make the TTT updates visible
    return layer


@pytest.mark.parametrize("name", list(TTT_LAYERS))
@pytest.mark.parametrize("split", [[3, 6, 2, 4], [1] * 15])
def test_split_and_token_by_token_equal_whole(name, split):
    layer = small_layer(name)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    with torch.no_grad():
        whole, _, s_whole = layer(x)
        outs, state, i = [], None, 0
        for n in split:
            o, _, state = layer(x[:, i:i + n], state=state)
            outs.append(o)
            i += n
    assert state.seen_tokens == 15 and state.inner.num_buffered == 15 % 4
    assert (torch.cat(outs, 1) - whole).abs().max() < 1e-12
    for a, b in zip(state.inner.params, s_whole.inner.params):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("name", list(TTT_LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_path_is_bit_identical_to_the_autograd_path(name, dtype):
    """Without autograd the layer rotates, masks, normalises and gates in place and writes the op's output
    straight into the head-merged layout; every value must equal the autograd path's bit for bit, whole
    or in pieces that start and end inside mini-batches, and the state too. (The torch path: the C kernels'
    are compared with it in test_c_scan.)"""
    layer = small_layer(name).to(dtype)
    layer.kernel = "torch"
    x = torch.randn(2, 15, 16, dtype=dtype)
    want, _, s_want = layer(x)
    want_pieces, state = [], None
    for a, b in ((0, 6), (6, 15)):
        o, _, state = layer(x[:, a:b], state=state)
        want_pieces.append(o)
    with torch.no_grad():
        got, _, s_got = layer(x)
        got_pieces, state_got = [], None
        for a, b in ((0, 6), (6, 15)):
            o, _, state_got = layer(x[:, a:b], state=state_got)
            got_pieces.append(o)
    assert want.requires_grad and not got.requires_grad
    assert torch.equal(got, want.detach())
    assert torch.equal(torch.cat(got_pieces, 1), torch.cat(want_pieces, 1).detach())
    for a, b in zip((*s_got.inner.params, *state_got.inner.params), (*s_want.inner.params, *state.inner.params)):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_stats_in_pieces_count_every_mini_batch_start_once(name):
    """With stats on, a call in which no mini-batch starts (here 2 tokens after 5, m = 4) is valid and
    reports none; over the pieces, every mini-batch start (0, 4, 8, 12) is reported exactly once."""
    layer = small_layer(name)
    x = torch.randn(1, 15, 16, dtype=torch.float64)
    state, counts = None, []
    with torch.no_grad():
        for a, b in ((0, 5), (5, 7), (7, 15)):
            _, stats, state = layer(x[:, a:b], state=state, output_ttt_stats=True)
            counts.append(stats[0].numel())
    assert counts == [2, 0, 2]


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp_base"])
@pytest.mark.parametrize("t", [3, 6])
def test_layer_causality(name, t):
    layer = small_layer(name)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    with torch.no_grad():
        base, _, _ = layer(x)
        y = x.clone()
        y[:, t + 1:] += torch.randn_like(y[:, t + 1:])
        out, _, _ = layer(y)
    assert torch.equal(out[:, :t + 1], base[:, :t + 1])
    assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-3


def test_causal_conv_pair_matches_conv1d_and_gradcheck():
    """The shifted multiply-add convs (hand-written backward) against F.conv1d and float64 gradcheck."""
    g = torch.Generator().manual_seed(0)
    B, T, D, w = 2, 9, 6, 4
    a_ext = torch.randn(B, T + w - 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    kern = torch.randn(w, 2, D, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, D, generator=g, dtype=torch.float64, requires_grad=True)
    out = torch.stack(causal_conv_pair(a_ext, kern, bias), dim=2)
    ref = torch.stack([torch.nn.functional.conv1d(a_ext.transpose(1, 2), kern[:, c].T[:, None], bias[c], groups=D)
                       .transpose(1, 2) for c in range(2)], dim=2)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
    assert (out - ref).abs().max() < 1e-13
    for a, b in zip(torch.autograd.grad((out * cot).sum(), (a_ext, kern, bias)),
                    torch.autograd.grad((ref * cot).sum(), (a_ext, kern, bias))):
        assert (a - b).abs().max() < 1e-12
    assert torch.autograd.gradcheck(causal_conv_pair, (a_ext, kern, bias))


@pytest.mark.parametrize("name", list(TTT_LAYERS))
def test_layer_nan_at_t_leaves_earlier_outputs_and_other_rows_identical(name):
    t = 6  # mid mini-batch (m = 4)
    layer = small_layer(name)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    with torch.no_grad():
        base, _, _ = layer(x)
        y = x.clone()
        y[0, t] = float("nan")
        out, _, _ = layer(y)
    assert torch.isfinite(out[0, :t]).all() and torch.equal(out[0, :t], base[0, :t])
    assert torch.isnan(out[0, t:]).all()
    assert torch.equal(out[1], base[1])  # sequences of a batch never mix


def test_carried_state_gradients_equal_whole_sequence():
    """Gradients flow through a carried state exactly as through one call (ponder trains this way)."""
    layer = small_layer("ttt_mlp")
    x = torch.randn(1, 14, 16, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(1, 14, 16, dtype=torch.float64)
    whole, _, _ = layer(x)
    g_whole = torch.autograd.grad((whole * cot).sum(), [x, layer.W1, layer.conv_k.weight])
    o1, _, st = layer(x[:, :6])
    o2, _, _ = layer(x[:, 6:], state=st)
    g_split = torch.autograd.grad((torch.cat([o1, o2], 1) * cot).sum(), [x, layer.W1, layer.conv_k.weight])
    for a, b in zip(g_whole, g_split):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # detach() cuts the carry: the second chunk's output no longer reaches the first chunk's input
    o2d, _, _ = layer(x[:, 6:], state=st.detach())
    gx = torch.autograd.grad(o2d.sum(), x)[0]
    assert gx[:, :6].abs().max() == 0 and gx[:, 6:].abs().max() > 0


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_remat_layer_gradients_identical(name):
    layer = small_layer(name)
    x = torch.randn(2, 18, 16, dtype=torch.float64, requires_grad=True)
    grads = []
    for remat in (False, True):
        layer.remat = remat
        out, _, _ = layer(x)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [x, *layer.parameters()]))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)


def test_inner_steps_and_naive_twin_in_layer():
    layer = small_layer("ttt_linear")
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        o1, _, _ = layer(x)
        o2, s2, st2 = layer(x, inner_steps=2, output_ttt_stats=True)
        layer.use_naive = True
        o2n, s2n, st2n = layer(x, inner_steps=2, output_ttt_stats=True)
    assert torch.equal(o1[:, :4], o2[:, :4]) and (o1[:, 4:] - o2[:, 4:]).abs().max() > 1e-5
    assert (o2 - o2n).abs().max() < 1e-12
    assert s2[0].shape == (3,) and all(s.shape == (2,) for s in s2[1:])  # 3 mini-batches start, 2 complete
    for a, b in zip(s2, s2n):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-12


def test_positions_only_matter_mod_mini_batch():
    layer = small_layer("ttt_mlp")
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    pos = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        a, _, _ = layer(x)
        b, _, _ = layer(x, position_ids=pos + 4)  # + m: same phases
        c, _, _ = layer(x, position_ids=pos + 1)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4


def test_official_init_statistics():
    torch.manual_seed(0)
    layer = TTTMLP(TTTConfig(hidden_size=256, num_attention_heads=4, mini_batch_size=16))
    for name in ("wq", "wv", "wo", "wg"):
        assert abs(getattr(layer, name).weight.std().item() - 0.02) < 1e-3
    assert abs(layer.W1.std().item() - 0.02) < 1e-3 and abs(layer.W2.std().item() - 0.02) < 1e-3
    # flax lecun_normal on the depthwise conv: fan_in = width 4 -> std 0.5 after truncating a normal
    # of std 0.5 / 0.8796 at 2 of its std
    w = layer.conv_q.weight
    assert abs(w.std().item() - 0.5) < 0.03 and w.abs().max().item() <= 2 * 0.5 / 0.87962566 + 1e-6
    for p in (layer.b1, layer.b2, layer.learnable_token_idx, layer.learnable_ttt_lr_bias, layer.conv_q.bias):
        assert p.abs().max() == 0
    assert torch.equal(layer.ttt_norm_weight, torch.ones(4, 64))


def test_converter_errors_name_keys():
    case = load_case(BUNDLED / "official" / "layer_ttt_linear.json")
    params = {k[len("param/"):]: v for k, v in case.arrays.items() if k.startswith("param/")}
    assert set(flax_layer_params_to_torch(params, "TTTLinear")) == set(TTTLinear(TTTConfig(
        hidden_size=64, num_attention_heads=4)).state_dict())
    bad = dict(params)
    bad.pop("wg/kernel")
    bad["extra/kernel"] = np.zeros(2)
    with pytest.raises(ValueError, match=r"missing \['wg.weight'\].*extra/kernel"):
        flax_layer_params_to_torch(bad, "ttt.models.ttt_layer.TTTLinear")
    with pytest.raises(ValueError, match="cls_name"):
        flax_layer_params_to_torch(params, "TTTConv")


def test_bad_inputs_raise():
    layer = small_layer("ttt_linear")
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(2, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="position_ids"):
        layer(x, position_ids=torch.arange(4).expand(2, 4))
    with pytest.raises(ValueError, match="inner_steps"):
        layer(x, inner_steps=0)
    _, _, st = layer(x)
    with pytest.raises(ValueError, match="batch size"):
        layer(x[:1], state=st)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_cuda_keeps_fp32_inner_loop():
    layer = small_layer("ttt_mlp").float().cuda()
    x = torch.randn(2, 16, 16, device="cuda")
    ref, _, _ = layer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _, st = layer(x)
        out.float().sum().backward()
    assert all(p.dtype == torch.float32 for p in st.inner.params)
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
