"""The two-branch model (SPEC Sec. 2-3, 9-10): branches of any architecture and feature shape, the fusion modes on
whole models, CLS groups, training and the CUR on vector and sequence models, the pooled features for RUBi and the
Colored-and-gray MNIST model. The MMTM's formulas themselves are in test_mmtm.py.
"""
import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from custom_branches import CUSTOM, NUM_CLASSES, TensorLoader, mlp_branch
from greedymm.config import TrainConfig
from greedymm.measures import compute_squeeze_means, conditional_utilization
from greedymm.models import (FusionMode, TwoBranchNet, conv_branch, digit_branch, final_linear, mmtm_convnet,
                             mmtm_digits, mmtm_resnet18)
from greedymm.models.two_branch import _stage_channels
from greedymm.runtime import set_channels_last, to_device
from greedymm.training import load_checkpoint, train


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


image = lambda c, size: lambda: (torch.randn(2, c, size, size), torch.randn(2, c, size, size))


@pytest.mark.parametrize("builder, inputs, n_mmtm", [
    (lambda: mmtm_resnet18(num_classes=40), image(3, 64), 3),
    (lambda: mmtm_resnet18(num_classes=10, in_channels=1), image(1, 32), 3),
    (lambda: mmtm_convnet(5, widths=(4, 8)), image(3, 16), 2),
    (lambda: mmtm_digits(10), lambda: (torch.randn(2, 3, 28, 28), torch.randn(2, 1, 28, 28)), 3),
    (CUSTOM["mlp"][0], lambda: CUSTOM["mlp"][1](2, 0)[:2], 2),
    (CUSTOM["seq_image"][0], lambda: CUSTOM["seq_image"][1](2, 0)[:2], 2),
])
def test_models_forward_shapes_and_cls_groups(builder, inputs, n_mmtm):
    torch.manual_seed(0)
    model = builder()
    y0, y1 = model(*inputs())
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


# ------------------------------------------------------------------------------- any architecture, any shape
def test_channels_are_inferred_per_branch_from_conv_norm_and_linear_layers():
    torch.manual_seed(0)
    shapes = lambda model: {k: (m.channels_a, m.channels_b, m.hidden) for k, m in model.mmtms.items()}
    # Linear-BatchNorm1d stages of unequal widths; hidden = int(2 (C_A + C_B) / 4)
    assert shapes(CUSTOM["mlp"][0]()) == {"stage1": (12, 20, 16), "stage2": (16, 8, 12)}
    # Conv1d-BatchNorm1d stages fused with Conv2d-BatchNorm2d stages
    assert shapes(CUSTOM["seq_image"][0]()) == {"stage1": (6, 4, 5), "stage2": (10, 8, 9)}
    assert _stage_channels(nn.Sequential(nn.Linear(4, 7), nn.ReLU())) == 7  # a stage ending in Linear
    assert _stage_channels(nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 5))) == 5  # the last one counts
    assert _stage_channels(nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 9, 1), nn.BatchNorm2d(9))) == 9
    assert _stage_channels(nn.Sequential(nn.Conv3d(1, 5, 3), nn.ReLU())) == 5
    assert _stage_channels(nn.Sequential(nn.Conv1d(2, 9, 1), nn.GroupNorm(3, 9))) == 9
    assert _stage_channels(nn.Sequential(nn.ReLU(), nn.Flatten())) is None


def test_a_volume_branch_fused_with_a_vector_branch():
    torch.manual_seed(0)
    volume = nn.Sequential(OrderedDict(
        stage1=nn.Sequential(nn.Conv3d(1, 5, 3, padding=1), nn.BatchNorm3d(5), nn.ReLU()),
        head=nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1), nn.Linear(5, 3))))
    vector = nn.Sequential(OrderedDict(stage1=nn.Sequential(nn.Linear(4, 7), nn.ReLU()), head=nn.Linear(7, 3)))
    model = TwoBranchNet(volume, vector, ["stage1"])
    assert (model.mmtms["stage1"].channels_a, model.mmtms["stage1"].channels_b) == (5, 7)
    y0, y1 = model(torch.randn(2, 1, 4, 4, 4), torch.randn(2, 4))
    assert y0.shape == y1.shape == (2, 3)


def test_fusion_channels_may_give_pairs_where_a_stage_has_no_channel_layer():
    torch.manual_seed(0)
    branch = lambda c: nn.Sequential(OrderedDict(stage1=nn.Identity(), head=nn.Linear(c, 3)))
    with pytest.raises(ValueError, match="cannot infer the channels of branch 0 after stage 'stage1'"):
        TwoBranchNet(branch(12), branch(5), ["stage1"])
    model = TwoBranchNet(branch(12), branch(5), ["stage1"], fusion_channels=[(12, 5)])
    m = model.mmtms["stage1"]
    assert (m.channels_a, m.channels_b) == (12, 5)
    x0, x1 = torch.randn(3, 12), torch.randn(3, 5)
    y0, _ = model(x0, x1)
    # by hand: the vector is its own squeeze, Z = ReLU(W_s [x0; x1] + b_s), A' = x0 * sigmoid(W_A Z + b_A)
    z = torch.relu(torch.cat([x0, x1], 1) @ m.fc_squeeze.weight.T + m.fc_squeeze.bias)
    a = x0 * torch.sigmoid(z @ m.fc_a.weight.T + m.fc_a.bias)
    assert_close(y0, a @ model.branch0.head.weight.T + model.branch0.head.bias)
    assert TwoBranchNet(branch(4), branch(4), ["stage1"], fusion_channels=[4]).mmtms["stage1"].channels_b == 4
    with pytest.raises(ValueError, match=r"must be C or a pair \(C_A, C_B\)"):
        TwoBranchNet(branch(4), branch(4), ["stage1"], fusion_channels=[(4, 4, 4)])


def _warm(model, data):
    """A regular training pass (BN statistics, a-bar, b-bar), then eval mode."""
    model.train()(data[0], data[1])
    return model.eval()


@pytest.mark.parametrize("name", list(CUSTOM))
def test_fusion_modes_cut_the_right_modality_on_custom_models(name):
    torch.manual_seed(0)
    build, make_data = CUSTOM[name]
    model = _warm(build(), make_data(8, 0))
    x0, x1, _ = make_data(5, 1)
    new_x0, new_x1, _ = make_data(5, 2)
    compute_squeeze_means(model, TensorLoader(make_data(16, 3)))
    moved = lambda u, v: (u - v).abs().max() > 1e-4
    with torch.no_grad():
        for mode in FusionMode:
            y0, y1 = model(x0, x1, mode)
            y0_other_x1, _ = model(x0, new_x1, mode)
            _, y1_other_x0 = model(new_x0, x1, mode)
            blind0 = mode in (FusionMode.REBALANCE_M0, FusionMode.CUT)  # y0_hat depends on x0 alone
            blind1 = mode in (FusionMode.REBALANCE_M1, FusionMode.CUT)
            assert moved(y0_other_x1, y0) != blind0, mode
            assert moved(y1_other_x0, y1) != blind1, mode


@pytest.mark.parametrize("name", list(CUSTOM))
def test_a_training_step_in_every_mode_on_custom_models(name):
    torch.manual_seed(0)
    build, make_data = CUSTOM[name]
    model = build()
    x0, x1, y = make_data(8, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()(x0, x1, "fused")  # re-balancing needs a regular training pass first
    compute_squeeze_means(model, TensorLoader(make_data(16, 1)))  # the cut mode needs the squeeze means
    mmtms = list(model.mmtms.values())
    for mode in FusionMode:
        before = {k: v.clone() for k, v in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
        y0_hat, y1_hat = model(x0, x1, mode)
        loss = F.cross_entropy(y0_hat, y) + F.cross_entropy(y1_hat, y)
        loss.backward()
        assert torch.isfinite(loss)
        # W_A is not used in re-balance m0 (branch 0 gets a-bar), W_B not in re-balance m1; all else learns
        assert all((m.fc_a.weight.grad is None) == (mode is FusionMode.REBALANCE_M0) for m in mmtms), mode
        assert all((m.fc_b.weight.grad is None) == (mode is FusionMode.REBALANCE_M1) for m in mmtms), mode
        assert all(p.grad is not None for p in [*model.branch0.parameters(), *model.branch1.parameters()])
        opt.step()
        changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
        # every weight of both branches moved (a bias right before a batch norm has no gradient to follow)
        assert {k for k in before if k.startswith(("branch0.", "branch1.")) and k.endswith("weight")} <= changed


@pytest.mark.parametrize("name", list(CUSTOM))
def test_cur_on_custom_models_against_a_manual_evaluation(name):
    torch.manual_seed(0)
    build, make_data = CUSTOM[name]
    train_l, test_l = TensorLoader(make_data(24, 0), shuffle=False), TensorLoader(make_data(12, 1), shuffle=False)
    model = build().train()
    for x0, x1, _ in train_l:
        model(x0, x1)
    res = conditional_utilization(model, train_l, test_l)
    model.eval()
    x0, x1, _ = train_l.x0, train_l.x1, train_l.y
    with torch.no_grad():  # the squeeze means: the mean over D_train of what enters the first MMTM, per branch
        f0, f1 = model.branch0.stage1(x0), model.branch1.stage1(x1)
        pool = lambda f: f.reshape(f.shape[0], f.shape[1], -1).mean(-1)
        first = model.mmtms["stage1"]
        assert_close(first.squeeze_mean_a, pool(f0).mean(0))  # (C_A,)
        assert_close(first.squeeze_mean_b, pool(f1).mean(0))  # (C_B,)
        y0, y1 = model(test_l.x0, test_l.x1, "fused")
        c0, c1 = model(test_l.x0, test_l.x1, "cut")
    acc = lambda out: (out.argmax(1) == test_l.y).float().mean().item()
    assert_close(res["acc"], acc((y0 + y1) / 2))
    assert_close((res["acc0"], res["acc1"], res["acc0_cut"], res["acc1_cut"]), (acc(y0), acc(y1), acc(c0), acc(c1)))
    assert_close((res["u_m1_m0"], res["u_m0_m1"]), ((acc(y0) - acc(c0)) / acc(y0), (acc(y1) - acc(c1)) / acc(y1)))
    if res["d_util_undefined"]:  # an untrained head at chance: d_util is marked undefined, never reported as 0
        assert math.isnan(res["d_util"])
    else:
        assert_close(res["d_util"], (acc(y0) - acc(c0)) / acc(y0) - (acc(y1) - acc(c1)) / acc(y1))


def test_vector_model_trains_resumes_exactly_and_gets_a_cur(tmp_path):
    from custom_branches import vector_data

    loaders = lambda: (TensorLoader(vector_data(48, 0)), TensorLoader(vector_data(24, 1), shuffle=False),
                       TensorLoader(vector_data(24, 2), shuffle=False))

    def cfg(folder, max_steps, **kw):
        return TrainConfig(algorithm="guided", options=dict(epsilon=0.0, window=2, warmup_epochs=1), lr=0.05,
                           max_epochs=10, max_steps=max_steps, progress=False,
                           log_dir=str(tmp_path / folder / "logging"), ckpt_dir=str(tmp_path / folder / "checkpoints"),
                           run_name="vectors", **kw)

    def fresh():
        torch.manual_seed(0)
        return CUSTOM["mlp"][0]()

    def run(cfg):
        train_l, val_l, test_l = loaders()
        return train(fresh(), train_l, cfg, val_l, test_l)

    straight = run(cfg("a", 15))
    first = run(cfg("b", 8, ckpt_every_steps=4))  # 6 batches per epoch: stops mid-epoch 2
    assert first.steps == 8
    torch.manual_seed(123)  # a fresh process would have other global RNG state
    resumed = run(cfg("b", 15))
    assert resumed.resumed_from_step == 8 and resumed.steps == straight.steps == 15
    want, got = load_checkpoint(straight.last_path)["model"], load_checkpoint(resumed.last_path)["model"]
    assert all(torch.equal(want[k], got[k]) for k in want)  # bitwise, a-bar and b-bar included
    modes = {json.loads(line)["mode"] for line in (resumed.log_dir / "steps.jsonl").read_text().splitlines()}
    assert modes > {"fused"}  # guided with epsilon 0 re-balanced the vector model
    model = fresh()
    model.load_state_dict(load_checkpoint(resumed.best_path)["model"])
    train_eval, _, test_l = loaders()
    res = conditional_utilization(model, train_eval, test_l)
    assert res["acc0"] > 1 / NUM_CLASSES  # m0 carries the class: branch 0 learned
    assert -1 <= res["d_util"] <= 1 or (math.isnan(res["d_util"]) and "branch 1 at chance" in res["d_util_undefined"])


def test_to_device_gives_channels_last_to_images_only():
    model = nn.Linear(2, 2)
    set_channels_last(model, True)  # what the trainer does on CUDA

    vec, img = torch.randn(2, 5), torch.randn(2, 3, 4, 4)
    x0, x1, y = to_device(vec, img, torch.zeros(2), torch.device("cpu"), model)
    assert_close(x0, vec) and assert_close(x1, img)
    assert x1.is_contiguous(memory_format=torch.channels_last) and not img.is_contiguous(
        memory_format=torch.channels_last)
    seq, vol = torch.randn(2, 3, 7), torch.randn(2, 1, 3, 3, 3)
    x0, x1, _ = to_device(seq, vol, torch.zeros(2), torch.device("cpu"), model)
    assert x0.shape == seq.shape and x1.shape == vol.shape
    set_channels_last(model, False)
    assert not to_device(vec, img, torch.zeros(2), torch.device("cpu"), model)[1].is_contiguous(
        memory_format=torch.channels_last)


# ------------------------------------------------------------------------------- pooled features for RUBi
@pytest.mark.parametrize("builder, x_shape, features", [
    (lambda: mmtm_resnet18(num_classes=5), (2, 3, 32, 32), 512),
    (lambda: mmtm_convnet(4, widths=(4, 8, 6)), (3, 3, 16, 16), 6),
])
def test_return_features_are_the_pooled_input_of_the_final_linear_layer(builder, x_shape, features):
    torch.manual_seed(0)
    model = builder().eval()
    x0, x1 = torch.randn(*x_shape), torch.randn(*x_shape)
    with torch.no_grad():
        y0, y1, (e0, e1) = model(x0, x1, "fused", return_features=True)
        plain = model(x0, x1, "fused")
        # by hand: every stage but the head, fusing after the MMTM stages, then the global average pool
        a, b = x0, x1
        for name in model.stage_names[:-1]:
            a, b = getattr(model.branch0, name)(a), getattr(model.branch1, name)(b)
            if name in model.mmtms:
                a, b = model.mmtms[name](a, b)
    assert e0.shape == (x_shape[0], features) and e1.shape == (x_shape[0], features)
    assert_close(e0, a.mean(dim=(2, 3)))
    assert_close(e1, b.mean(dim=(2, 3)))
    fc0, fc1 = final_linear(model.branch0), final_linear(model.branch1)
    assert fc0.in_features == features
    assert_close(y0, e0 @ fc0.weight.T + fc0.bias)
    assert_close(y1, e1 @ fc1.weight.T + fc1.bias)
    assert_close(plain, (y0, y1))
    assert all(not m._forward_pre_hooks for m in model.modules())  # the hooks are gone after the call


def test_return_features_need_a_final_linear_layer():
    conv_head = lambda: nn.Sequential(OrderedDict(
        stage1=nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
        head=nn.Sequential(nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))))
    model = TwoBranchNet(conv_head(), conv_head(), ["stage1"])
    x = torch.randn(2, 3, 8, 8)
    assert model(x, x)[0].shape == (2, 3)  # fine without features
    with pytest.raises(ValueError, match="last stage 'head' .* has no nn.Linear"):
        model(x, x, return_features=True)


# ------------------------------------------------------------------------------- Colored-and-gray MNIST
def test_digit_model_shapes_and_fusion_stages():
    torch.manual_seed(0)
    model = mmtm_digits(10, channels=(3, 1))
    x0, x1 = torch.randn(4, 3, 28, 28), torch.randn(4, 1, 28, 28)
    y0, y1 = model(x0, x1)
    assert y0.shape == y1.shape == (4, 10)
    assert {k: (m.channels_a, m.channels_b) for k, m in model.mmtms.items()} == {
        "stage2": (32, 32), "stage3": (64, 64), "stage4": (64, 64)}  # after each of the last three conv layers
    for branch, c_in in ((model.branch0, 3), (model.branch1, 1)):
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 4 and convs[0].in_channels == c_in
        sizes, x = [], torch.randn(2, c_in, 28, 28)
        for name in ("stage1", "stage2", "stage3", "stage4"):
            x = getattr(branch, name)(x)
            sizes.append(x.shape[-1])
        assert sizes == [14, 7, 7, 7]
    _, _, (e0, e1) = model(x0, x1, return_features=True)
    assert e0.shape == e1.shape == (4, 64)


def test_digit_settings_are_checked():
    with pytest.raises(ValueError, match="exactly four conv layers"):
        digit_branch(10, 1, widths=(8, 16, 32))
    with pytest.raises(ValueError, match="input channels of m0 and m1"):
        mmtm_digits(10, channels=(3,))
    assert mlp_branch(4, (5,))  # the helper builds (keeps the import honest)
