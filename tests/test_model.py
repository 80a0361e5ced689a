"""MMTM fusion modes, running means and the two-branch model (SPEC Sec. 2-3)."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from greedymm.mmtm import MMTM, FusionMode
from greedymm.model import TwoBranchNet, conv_branch, mmtm_convnet, mmtm_resnet18
from greedymm.utilization import compute_squeeze_means


def _inputs(seed, n=4, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture
def warm_model(tiny_model):
    """The tiny model after one regular training pass (running means exist), in eval mode."""
    tiny_model.train()(_inputs(0), _inputs(1))
    return tiny_model.eval()


@pytest.mark.parametrize("mode, blind_branch", [("rebalance_m0", 0), ("rebalance_m1", 1)])
def test_rebalance_cuts_the_other_modality_from_one_branch(warm_model, mode, blind_branch):
    x0, x1 = _inputs(2), _inputs(3)
    base = warm_model(x0, x1, mode)
    changed = warm_model(x0, _inputs(4), mode) if blind_branch == 0 else warm_model(_inputs(4), x1, mode)
    other = 1 - blind_branch
    assert_close(changed[blind_branch], base[blind_branch])  # e.g. y0_hat ignores x1 in re-balance m0
    assert (changed[other] - base[other]).abs().max() > 1e-4  # while y1_hat still sees x1


def test_cut_mode_makes_each_branch_unimodal(warm_model, toy_loaders):
    compute_squeeze_means(warm_model, toy_loaders[2])
    x0, x1 = _inputs(2), _inputs(3)
    y0, y1 = warm_model(x0, x1, "cut")
    y0_new_x1, y1_new_x1 = warm_model(x0, _inputs(4), "cut")
    y0_new_x0, y1_new_x0 = warm_model(_inputs(5), x1, "cut")
    assert_close(y0_new_x1, y0)  # y0_hat depends on x0 only
    assert_close(y1_new_x0, y1)  # y1_hat depends on x1 only
    assert (y1_new_x1 - y1).abs().max() > 1e-4 and (y0_new_x0 - y0).abs().max() > 1e-4
    # whereas in fused mode each branch does see the other modality
    assert (warm_model(x0, _inputs(4))[0] - warm_model(x0, x1)[0]).abs().max() > 1e-4


def test_cut_mode_needs_squeeze_means(warm_model):
    with pytest.raises(RuntimeError, match="compute_squeeze_means"):
        warm_model(_inputs(0), _inputs(1), "cut")


def test_squeeze_means_are_the_dataset_mean_of_pooled_features(warm_model, toy_loaders):
    loader = toy_loaders[1]
    compute_squeeze_means(warm_model, loader)
    x0 = torch.cat([b[0] for b in loader])
    x1 = torch.cat([b[1] for b in loader])
    with torch.no_grad():  # features entering the first MMTM: stage1 of each branch
        s_a = warm_model.branch0.stage1(x0).mean(dim=(2, 3)).mean(0)
        s_b = warm_model.branch1.stage1(x1).mean(dim=(2, 3)).mean(0)
    mmtm = warm_model.mmtms["stage1"]
    assert_close(mmtm.squeeze_mean_a, s_a)
    assert_close(mmtm.squeeze_mean_b, s_b)


@pytest.mark.parametrize("builder, size, n_mmtm", [
    (lambda: mmtm_resnet18(num_classes=40), 64, 3),
    (lambda: mmtm_resnet18(num_classes=10, in_channels=1), 32, 3),
    (lambda: mmtm_convnet(5, widths=(4, 8)), 16, 2),
])
def test_models_forward_shapes_and_cls_groups(builder, size, n_mmtm):
    torch.manual_seed(0)
    model = builder()
    c_in = model.branch0[0][0].in_channels
    y0, y1 = model(torch.randn(2, c_in, size, size), torch.randn(2, c_in, size, size))
    k = y0.shape[1]
    assert y0.shape == y1.shape == (2, k)
    assert len(model.mmtms) == n_mmtm
    groups = {name: {id(p) for p in ps} for name, ps in model.cls_groups().items()}
    shared = {id(p) for m in model.mmtms.values() for p in m.fc_squeeze.parameters()}
    assert groups["m0"].isdisjoint(groups["m1"])
    assert groups["m0_prime"] & groups["m1_prime"] == shared  # W_s, b_s carry both modalities
    assert set().union(*groups.values()) == {id(p) for p in model.parameters()}
    assert len(groups["m0"]) == len(list(model.branch0.parameters()))
    assert len(groups["m0_prime"]) == 4 * n_mmtm  # W_A, b_A, W_s, b_s per MMTM


def test_resnet_mmtms_sit_after_layer2_to_layer4():
    model = mmtm_resnet18()
    assert {k: (m.channels_a, m.channels_b, m.hidden) for k, m in model.mmtms.items()} == {
        "layer2": (128, 128, 128), "layer3": (256, 256, 256), "layer4": (512, 512, 512)}


def test_branches_with_different_channels_are_fused():
    torch.manual_seed(0)
    model = TwoBranchNet(conv_branch(3, widths=(8, 8)), conv_branch(3, widths=(8, 16)), ["stage2"])
    m = model.mmtms["stage2"]
    assert (m.channels_a, m.channels_b, m.hidden) == (8, 16, 12)  # hidden = int(2 * 24 / 4)
    y0, y1 = model(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    assert y0.shape == y1.shape == (2, 3)


@pytest.mark.parametrize("stages, message", [
    (["layer9"], "not stages of the branches"),
    ([], "fusion_stages is empty"),
    (["head"], "exclude the last stage"),
])
def test_bad_fusion_stages_are_rejected(stages, message):
    with pytest.raises(ValueError, match=message):
        TwoBranchNet(conv_branch(3), conv_branch(3), stages)


def test_branches_must_be_sequential_with_equal_stage_names():
    with pytest.raises(TypeError, match="nn.Sequential"):
        TwoBranchNet(nn.Linear(2, 2), conv_branch(3), ["stage1"])
    with pytest.raises(ValueError, match="same stage names"):
        TwoBranchNet(conv_branch(3, widths=(4, 4)), conv_branch(3, widths=(4, 4, 4)), ["stage1"])


def test_running_means_and_squeeze_means_survive_a_state_dict_round_trip(warm_model, toy_loaders):
    compute_squeeze_means(warm_model, toy_loaders[1])
    x0, x1 = _inputs(2), _inputs(3)
    fresh = mmtm_convnet(4, widths=(4, 8, 8)).eval()
    fresh.load_state_dict(warm_model.state_dict())
    for mode in ("rebalance_m0", "rebalance_m1", "cut"):
        for got, want in zip(fresh(x0, x1, mode), warm_model(x0, x1, mode)):
            assert_close(got, want)
