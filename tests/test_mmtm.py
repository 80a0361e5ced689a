"""MMTM and the SE block against hand computations, for every feature shape (SPEC Sec. 2, 3 and 9).

The references below write the formulas out with explicit matrix products from W_s, W_A, W_B and the squeeze
vectors, so a wrong formula in the module (a swapped mean, the wrong running mean, a frozen branch) changes numbers.
"""
import math

import pytest
import torch
from torch.testing import assert_close

from greedymm.models.mmtm import MMTM, FusionMode, SqueezeExcite, mmtm_hidden

# (shape of A, shape of B) without the batch dim: vectors, sequences, images and volumes, equal and unequal C.
SHAPES = {
    "image_equal": ((8, 5, 5), (8, 4, 4)),
    "vector_equal": ((6,), (6,)),
    "vector_unequal": ((6,), (10,)),
    "sequence_image": ((5, 7), (3, 4, 4)),
    "volume_sequence": ((4, 2, 3, 3), (4, 6)),
}


def pooled(x):
    """Squeeze by hand: mean over everything after the channel dim; vectors are their own squeeze. (B, C)"""
    return x.reshape(x.shape[0], x.shape[1], -1).mean(-1) if x.dim() > 2 else x


def as_map(scale, x):
    """(B, C) -> (B, C, 1, ...) against x."""
    return scale.reshape(scale.shape + (1,) * (x.dim() - 2))


def scales_by_hand(m, s_a_for_a, s_b_for_a, s_a_for_b, s_b_for_b):
    """sigmoid(E_A) from Z = ReLU(W_s [s_a_for_a; s_b_for_a] + b_s), sigmoid(E_B) from [s_a_for_b; s_b_for_b]."""
    w_s, b_s = m.fc_squeeze.weight, m.fc_squeeze.bias
    z_for_a = torch.relu(torch.cat([s_a_for_a, s_b_for_a], 1) @ w_s.T + b_s)  # (B, hidden)
    z_for_b = torch.relu(torch.cat([s_a_for_b, s_b_for_b], 1) @ w_s.T + b_s)
    return (torch.sigmoid(z_for_a @ m.fc_a.weight.T + m.fc_a.bias),  # (B, C_A)
            torch.sigmoid(z_for_b @ m.fc_b.weight.T + m.fc_b.bias))  # (B, C_B)


def fused_by_hand(m, a, b):
    """SPEC Sec. 2: both scales from Z on [S_A; S_B]; returns (A', B', sigmoid(E_A), sigmoid(E_B))."""
    s_a, s_b = pooled(a), pooled(b)
    scale_a, scale_b = scales_by_hand(m, s_a, s_b, s_a, s_b)
    return a * as_map(scale_a, a), b * as_map(scale_b, b), scale_a, scale_b


def make(case, seed=0, n=3):
    shape_a, shape_b = SHAPES[case]
    torch.manual_seed(seed)
    m = MMTM(shape_a[0], shape_b[0])
    g = torch.Generator().manual_seed(seed + 1)
    return m, torch.randn(n, *shape_a, generator=g), torch.randn(n, *shape_b, generator=g)


def warm(m, shape_a, shape_b, batches=(3, 5), seed=7):
    """Regular training passes on random batches; returns the hand-computed a-bar (C_A) and b-bar (C_B)."""
    g = torch.Generator().manual_seed(seed)
    scales_a, scales_b = [], []
    m.train()
    for n in batches:
        a, b = torch.randn(n, *shape_a, generator=g), torch.randn(n, *shape_b, generator=g)
        with torch.no_grad():
            _, _, sa, sb = fused_by_hand(m, a, b)
        scales_a.append(sa)
        scales_b.append(sb)
        m(a, b, FusionMode.FUSED)
    return torch.cat(scales_a).mean(0), torch.cat(scales_b).mean(0)  # every sample weighs the same


def test_hidden_size_is_the_authors_formula():
    assert MMTM(8).hidden == 8  # int(2 * 16 / 4) = C for C_A = C_B = C
    assert MMTM(6, 10).hidden == 8  # int(2 * 16 / 4)
    assert MMTM(3, 4).hidden == 3  # int(14 / 4)
    assert MMTM(4, 4, ratio=2).hidden == 8 and MMTM(1, 1).hidden == 1 == mmtm_hidden(1, 1)
    m = MMTM(6, 10)
    assert m.fc_squeeze.weight.shape == (8, 16)  # W_s: C_A + C_B -> hidden
    assert m.fc_a.weight.shape == (6, 8) and m.fc_b.weight.shape == (10, 8)  # W_A: -> C_A, W_B: -> C_B
    assert m.scale_sum_a.shape == m.squeeze_mean_a.shape == (6,)
    assert m.scale_sum_b.shape == m.squeeze_mean_b.shape == (10,)


def test_fused_mode_by_hand_with_numbers():
    # C_A = 1 (a vector), C_B = 2 (a sequence): hidden = int(2 * 3 / 4) = 1. Weights set to round numbers.
    m = MMTM(1, 2)
    with torch.no_grad():
        m.fc_squeeze.weight.copy_(torch.tensor([[1.0, -1.0, 2.0]]))
        m.fc_squeeze.bias.fill_(0.5)
        m.fc_a.weight.copy_(torch.tensor([[2.0]]))
        m.fc_a.bias.fill_(-1.0)
        m.fc_b.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        m.fc_b.bias.copy_(torch.tensor([0.0, 1.0]))
    a = torch.tensor([[3.0]])  # S_A = 3
    b = torch.tensor([[[1.0, 3.0], [0.0, -2.0]]])  # S_B = (2, -1)
    out_a, out_b = m.eval()(a, b)
    z = 3.0 - 2.0 + 2.0 * -1.0 + 0.5  # W_s [3; 2; -1] + 0.5 = -0.5 -> ReLU 0
    assert z < 0
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert_close(out_a, torch.tensor([[3.0 * sig(-1.0)]]))  # E_A = 2 * 0 - 1
    # E_B = (0 + 0, -1 * 0 + 1): channel 0 times sigmoid(0), channel 1 times sigmoid(1)
    assert_close(out_b, torch.tensor([[[1.0 * sig(0.0), 3.0 * sig(0.0)], [0.0, -2.0 * sig(1.0)]]]))
    # a squeeze where the ReLU passes: S_A = 5 -> z = 5 - 2 - 2 + 0.5 = 1.5
    out_a, out_b = m(torch.tensor([[5.0]]), b)
    assert_close(out_a, torch.tensor([[5.0 * sig(2.0)]]))  # E_A = 2 * 1.5 - 1
    assert_close(out_b[0, :, 0], torch.tensor([1.0 * sig(1.5), 0.0]))  # E_B = (1.5, -1.5 + 1)
    assert_close(out_b[0, 1, 1], torch.tensor(-2.0 * sig(-0.5)))


@pytest.mark.parametrize("case", list(SHAPES))
def test_fused_mode_by_hand_for_every_shape(case):
    m, a, b = make(case)
    out_a, out_b = m.eval()(a, b, "fused")
    ref_a, ref_b, _, _ = fused_by_hand(m, a, b)
    assert out_a.shape == a.shape and out_b.shape == b.shape
    assert_close(out_a, ref_a)
    assert_close(out_b, ref_b)


@pytest.mark.parametrize("case", list(SHAPES))
def test_running_means_are_sample_weighted_over_regular_training_steps_only(case):
    m, _, _ = make(case)
    shape_a, shape_b = SHAPES[case]
    a_bar, b_bar = warm(m, shape_a, shape_b)
    # Neither re-balancing nor evaluation passes may move the means (the authors' code let them).
    g = torch.Generator().manual_seed(9)
    other = lambda: (torch.randn(7, *shape_a, generator=g), torch.randn(7, *shape_b, generator=g))
    m(*other(), FusionMode.REBALANCE_M0)
    m(*other(), FusionMode.REBALANCE_M1)
    m.eval()(*other(), FusionMode.FUSED)
    got_a, got_b = m.running_scales()
    assert float(m.scale_count) == 8
    assert_close(got_a.float(), a_bar)  # 8 samples weighted equally, not 2 batch means
    assert_close(got_b.float(), b_bar)  # b-bar from sigmoid(E_B), not sigmoid(E_A)


@pytest.mark.parametrize("case", list(SHAPES))
def test_rebalance_m0_scales_branch0_by_a_bar_and_leaves_branch1_fused(case):
    m, a, b = make(case)
    a_bar, b_bar = warm(m, *SHAPES[case])
    assert (a_bar - 0.5).abs().max() > 1e-3  # a constant 0.5 would not pass
    if a_bar.shape == b_bar.shape:
        assert (a_bar - b_bar).abs().max() > 1e-3  # nor would b-bar in place of a-bar
    out_a, out_b = m.eval()(a, b, "rebalance_m0")
    _, ref_b, _, _ = fused_by_hand(m, a, b)
    assert_close(out_a, a * as_map(a_bar, a))  # A * a-bar: no information from m1
    assert_close(out_b, ref_b)  # B * sigmoid(E_B): branch 1 keeps its fused scale


@pytest.mark.parametrize("case", list(SHAPES))
def test_rebalance_m1_scales_branch1_by_b_bar_and_leaves_branch0_fused(case):
    m, a, b = make(case)
    a_bar, b_bar = warm(m, *SHAPES[case])
    assert (b_bar - 0.5).abs().max() > 1e-3
    out_a, out_b = m.eval()(a, b, "rebalance_m1")
    ref_a, _, _, _ = fused_by_hand(m, a, b)
    assert_close(out_b, b * as_map(b_bar, b))  # B * b-bar
    assert_close(out_a, ref_a)  # A * sigmoid(E_A)


@pytest.mark.parametrize("case", list(SHAPES))
def test_cut_mode_by_hand_for_every_shape(case):
    m, a, b = make(case)
    g = torch.Generator().manual_seed(3)
    # Distinct, non-zero means: zeros, or mean S_A and mean S_B swapped (shape-compatible when C_A = C_B), differ.
    mean_a = torch.randn(m.channels_a, generator=g) + 1.0
    mean_b = torch.randn(m.channels_b, generator=g) - 1.0
    m.set_squeeze_means(mean_a, mean_b)
    out_a, out_b = m.eval()(a, b, "cut")
    s_a, s_b = pooled(a), pooled(b)
    n = a.shape[0]
    # branch 0: Z on [S_A; mean S_B]; branch 1: Z on [mean S_A; S_B] (SPEC Sec. 3)
    scale_a, scale_b = scales_by_hand(m, s_a, mean_b.expand(n, -1), mean_a.expand(n, -1), s_b)
    assert_close(out_a, a * as_map(scale_a, a))
    assert_close(out_b, b * as_map(scale_b, b))
    if m.channels_a == m.channels_b:  # the swapped means would give other numbers
        wrong_a, _ = scales_by_hand(m, s_a, mean_a.expand(n, -1), mean_a.expand(n, -1), s_b)
        assert (wrong_a - scale_a).abs().max() > 1e-4


def test_rebalance_before_any_regular_step_is_an_error():
    with pytest.raises(RuntimeError, match="at least one regular"):
        MMTM(4)(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), "rebalance_m0")


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="allowed: 'fused', 'rebalance_m0', 'rebalance_m1', 'cut'"):
        FusionMode.parse("balanced")


@pytest.mark.parametrize("a, b, message", [
    (torch.randn(2, 5), torch.randn(2, 6), r"a \(branch 0\) has shape \(2, 5\); expected \(batch, 4, \*spatial\)"),
    (torch.randn(2, 4, 3), torch.randn(2, 4), r"b \(branch 1\) has shape \(2, 4\); expected \(batch, 6"),
    (torch.randn(4), torch.randn(2, 6), r"a \(branch 0\) has shape \(4,\)"),
    (torch.randn(2, 4), torch.randn(3, 6), "batches of 2 and 3 samples"),
])
def test_wrong_feature_shapes_get_a_clear_error(a, b, message):
    with pytest.raises(ValueError, match=message):
        MMTM(4, 6)(a, b)


@pytest.mark.parametrize("shape", [(6,), (6, 7), (6, 4, 5), (6, 2, 3, 3)])
def test_squeeze_excite_by_hand(shape):
    torch.manual_seed(0)
    se = SqueezeExcite(6, hidden=4)
    x = torch.randn(3, *shape)
    s = pooled(x)  # (B, C)
    z = torch.relu(s @ se.fc_squeeze.weight.T + se.fc_squeeze.bias)  # (B, hidden)
    scale = torch.sigmoid(z @ se.fc_excite.weight.T + se.fc_excite.bias)  # (B, C)
    assert_close(se(x), x * as_map(scale, x))
    assert se.fc_squeeze.weight.shape == (4, 6) and se.fc_excite.weight.shape == (6, 4)


def test_squeeze_excite_by_hand_with_numbers():
    se = SqueezeExcite(2, hidden=1)
    with torch.no_grad():
        se.fc_squeeze.weight.copy_(torch.tensor([[1.0, 2.0]]))
        se.fc_squeeze.bias.fill_(-1.0)
        se.fc_excite.weight.copy_(torch.tensor([[1.0], [-2.0]]))
        se.fc_excite.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.tensor([[[1.0, 3.0], [1.0, 1.0]]])  # (1, 2, 2): s = (2, 1), z = ReLU(2 + 2 - 1) = 3
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert_close(se(x), torch.tensor([[[sig(3.0), 3 * sig(3.0)], [sig(-5.0), sig(-5.0)]]]))
    assert SqueezeExcite(5).hidden == 5 == MMTM(5).hidden  # the default matches the MMTM of ratio 4


def test_squeeze_excite_rejects_the_wrong_channels():
    with pytest.raises(ValueError, match=r"the SE input has shape \(2, 3, 4\); expected \(batch, 5"):
        SqueezeExcite(5)(torch.randn(2, 3, 4))
