"""Late fusion (SPEC Sec. 13): the late_concat / late_sum heads and their partial logits, the four fusion modes with
their running and D_train means, the CUR and the CLS groups against hand computations, the fused loss, the fusion
setting in a run's identity, and guided, random and the balancers training a late-fusion model."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from conftest import ToyLoader, read_jsonl
from custom_branches import CUR_TEST, CUR_TRAIN, TensorLoader, identity_net
from greedymm.config import DataConfig, TrainConfig, run_name
from greedymm.measures import CLSTracker, compute_cut_means, conditional_utilization, evaluate
from greedymm.methods import StepContext, make_method
from greedymm.models import (FusionMode, LateFusionNet, TwoBranchNet, UniModalNet, as_fusion, build_model,
                             fusion_names, get_fusion, mmtm_convnet, strip_final_linear)
from greedymm.training import load_checkpoint, train


def vector_net(head="late_concat", f=(2, 3), k=3, seed=0):
    """Encoders nn.Linear(4, F0), nn.Linear(5, F1) on vectors, seeded."""
    torch.manual_seed(seed)
    return LateFusionNet(nn.Sequential(nn.Linear(4, f[0])), nn.Sequential(nn.Linear(5, f[1])), f, k, head)


def ctx(mode=FusionMode.FUSED):
    return StepContext(epoch=0, step=1, batch=0, mode=mode, steps_per_epoch=None)


def test_fusions_are_registered_in_one_place():
    assert fusion_names() == ["mmtm", "late_concat", "late_sum"]
    assert [get_fusion(n).late for n in fusion_names()] == [False, True, True]
    with pytest.raises(ValueError, match="fusion='early' is unknown; allowed: mmtm, late_concat, late_sum"):
        get_fusion("early")


def test_late_concat_is_one_linear_layer_on_the_concatenated_features_split_into_partial_logits():
    net = vector_net("late_concat")
    x0, x1 = torch.randn(6, 4), torch.randn(6, 5)
    z0, z1, (e0, e1) = net(x0, x1, return_features=True)
    w = torch.cat([net.head0.weight, net.head1.weight], dim=1)  # (K, F0 + F1)
    z = F.linear(torch.cat([e0, e1], dim=1), w, net.head_bias)
    assert_close(net.predict(z0, z1), z)
    b = net.head_bias
    assert_close(z0, e0 @ net.head0.weight.T + b / 2)
    assert_close(z1, e1 @ net.head1.weight.T + b / 2)
    assert net.head0.bias is None and net.head1.bias is None
    # Initialised as nn.Linear(F0 + F1, K) would be from the same random stream.
    torch.manual_seed(0)
    nn.Linear(4, 2), nn.Linear(5, 3)
    full = nn.Linear(5, 3)
    assert_close(w, full.weight)
    assert_close(b, full.bias)


def test_late_sum_partial_logits_are_the_two_heads():
    net = vector_net("late_sum")
    x0, x1 = torch.randn(6, 4), torch.randn(6, 5)
    z0, z1, (e0, e1) = net(x0, x1, return_features=True)
    assert_close(z0, net.head0(e0))
    assert_close(z1, net.head1(e1))
    assert_close(net.predict(z0, z1), net.head0(e0) + net.head1(e1))


def test_running_means_are_sample_weighted_over_regular_training_steps_only():
    net = vector_net()
    net.train()
    a0, a1 = torch.randn(3, 4), torch.randn(3, 5)
    b0, b1 = torch.randn(5, 4), torch.randn(5, 5)
    with pytest.raises(RuntimeError, match="regular training step"):
        net(a0, a1, "rebalance_m0")
    assert not net.has_running_scales
    net(a0, a1)
    net(b0, b1)
    net(torch.randn(4, 4), torch.randn(4, 5), "rebalance_m1")  # not counted
    net.eval()
    net(torch.randn(4, 4), torch.randn(4, 5))  # evaluation: not counted
    assert net.has_running_scales
    with torch.no_grad():
        e0 = torch.cat([net.encoder0(a0), net.encoder0(b0)])  # (8, F0)
        e1 = torch.cat([net.encoder1(a1), net.encoder1(b1)])
    m0, m1 = net.running_means()
    assert_close(m0.float(), e0.mean(0))  # (3 * mean_a + 5 * mean_b) / 8, not the mean of the two batch means
    assert_close(m1.float(), e1.mean(0))
    assert net.feat_count.item() == 8


def test_rebalance_modes_replace_the_other_modality_by_its_running_mean():
    net = vector_net()
    net.train()
    net(torch.randn(8, 4), torch.randn(8, 5))
    m0, m1 = (m.float() for m in net.running_means())
    x0, x1 = torch.randn(4, 4), torch.randn(4, 5)
    f0, f1, (e0, e1) = net(x0, x1, "rebalance_m0", return_features=True)
    half = net.head_bias / 2
    assert_close(f0, e0 @ net.head0.weight.T + half)  # z0 as in fused mode
    assert_close(f1, (m1 @ net.head1.weight.T + half).expand(4, -1))  # e1 := its running mean
    g0, g1 = net(x0, x1, "rebalance_m1")
    assert_close(g0, (m0 @ net.head0.weight.T + half).expand(4, -1))
    assert_close(g1, e1 @ net.head1.weight.T + half)
    # Re-balancing m0: the fused loss sends no gradient to E1 (no per-sample information from m1 reaches E0's).
    net.zero_grad()
    F.cross_entropy(net.predict(*net(x0, x1, "rebalance_m0")), torch.tensor([0, 1, 2, 0])).backward()
    assert net.encoder1[0].weight.grad is None and net.encoder0[0].weight.grad is not None


@pytest.mark.parametrize("fusion", ["mmtm", "late_concat", "late_sum"])
def test_modes_cut_the_same_paths_for_every_fusion(fusion, toy_loaders):
    """Where MMTM and late fusion coincide: in re-balance m0, y0_hat depends on x0 alone; in re-balance m1, y1_hat on
    x1 alone; in cut mode y0_hat on x0 alone and y1_hat on x1 alone (gradients with respect to the inputs)."""
    torch.manual_seed(0)
    model = as_fusion(mmtm_convnet(4, widths=(4, 8)), fusion)
    model.train()
    for x0, x1, _ in toy_loaders[0]:
        model(x0, x1)
    toy_loaders[0].augment = False
    compute_cut_means(model, toy_loaders[0])
    model.eval()
    x0 = torch.randn(2, 3, 12, 12, requires_grad=True)
    x1 = torch.randn(2, 3, 12, 12, requires_grad=True)

    def depends(out, x):
        grad, = torch.autograd.grad(out.sum(), x, retain_graph=True, allow_unused=True)
        return grad is not None and grad.abs().sum().item() > 0

    y0, y1 = model(x0, x1, "rebalance_m0")
    assert depends(y0, x0) and not depends(y0, x1)
    y0, y1 = model(x0, x1, "rebalance_m1")
    assert depends(y1, x1) and not depends(y1, x0)
    c0, c1 = model(x0, x1, "cut")
    assert depends(c0, x0) and not depends(c0, x1)
    assert depends(c1, x1) and not depends(c1, x0)
    y0, y1 = model(x0, x1, "fused")
    fused = model.predict(y0, y1)
    assert depends(fused, x0) and depends(fused, x1)


def test_cut_means_are_the_d_train_means_of_the_features():
    net = vector_net()
    x0, x1, y = torch.randn(10, 4), torch.randn(10, 5), torch.arange(10) % 3
    with pytest.raises(RuntimeError, match="compute_cut_means"):
        net(x0, x1, "cut")
    net.train()
    compute_cut_means(net, TensorLoader((x0, x1, y), batch_size=4, shuffle=False))  # 4 + 4 + 2 samples
    assert net.training  # restored
    assert net.feat_count.item() == 0  # computed in eval mode: no running means gathered
    with torch.no_grad():
        assert_close(net.cut_mean0, net.encoder0(x0).mean(0))
        assert_close(net.cut_mean1, net.encoder1(x1).mean(0))
        c0, c1 = net(x0[:3], x1[:3], "cut")
        e0, e1 = net.encoder0(x0[:3]), net.encoder1(x1[:3])
        w0, w1, b = net.head0.weight, net.head1.weight, net.head_bias
        assert_close(c0, e0 @ w0.T + net.cut_mean1 @ w1.T + b)  # z with e1 := mean e1
        assert_close(c1, net.cut_mean0 @ w0.T + e1 @ w1.T + b)  # z with e0 := mean e0


def test_late_fusion_cur_by_hand():
    """K = 2, e0 = x0, e1 = x1 (scalars), z = [-(x0 + x1), x0 + x1]: class 1 iff x0 + x1 > 0.
    D_train: x0 = (1, 3), x1 = (-2, -2): means 2 and -2. Test (x0, x1, y):
      (1, 1, 1), (-1, 3, 1), (2, -1, 1), (-1, -1, 0), (3, -4, 0)
    fused: sums 2, 2, 1, -2, -1 -> 1, 1, 1, 0, 0: A(z) = 5/5.
    e1 := -2: x0 - 2 = -1, -3, 0, -3, 1 -> 0, 0, 0 (tie: argmax 0), 0, 1: correct 0, 0, 0, 1, 0 -> A = 1/5.
    e0 := 2: 2 + x1 = 3, 5, 1, 1, -2 -> 1, 1, 1, 1, 0: correct 1, 1, 1, 0, 1 -> A = 4/5.
    u(m1|m0) = (1 - 1/5) / 1 = 0.8, u(m0|m1) = (1 - 4/5) / 1 = 0.2, d_util = 0.6."""
    net = identity_net([-1.0, 1.0], [-1.0, 1.0], [0.0, 0.0])
    res = conditional_utilization(net, TensorLoader(CUR_TRAIN, batch_size=2, shuffle=False),
                                  TensorLoader(CUR_TEST, batch_size=2, shuffle=False))
    assert_close(res["acc"], 1.0)
    # partial logits: z0 = [-x0, x0] -> 1, 0, 1, 0, 1: correct 1, 0, 1, 1, 0; z1 = [-x1, x1] -> 1, 1, 0, 0, 0: 4/5
    assert_close((res["acc0"], res["acc1"]), (0.6, 0.8))
    assert_close(res["acc0_cut"], 0.2)
    assert_close(res["acc1_cut"], 0.8)
    assert_close(res["u_m1_m0"], 0.8)
    assert_close(res["u_m0_m1"], 0.2)
    assert_close(res["d_util"], 0.6)
    assert res["d_util_undefined"] == "" and math.isnan(res["fusion_spread"])


def test_late_fusion_cur_is_undefined_when_the_fused_prediction_is_at_chance():
    net = identity_net([0.0, 0.0], [0.0, 0.0], [1.0, 0.0])  # always class 0
    data = (torch.randn(8, 1), torch.randn(8, 1), torch.tensor([0, 1] * 4))
    res = conditional_utilization(net, TensorLoader(data, batch_size=4, shuffle=False),
                                  TensorLoader(data, batch_size=4, shuffle=False))
    assert "fused prediction at chance" in res["d_util_undefined"] and math.isnan(res["d_util"])


@pytest.mark.parametrize("head", ["late_concat", "late_sum"])
def test_cls_groups_by_hand(head):
    net = vector_net(head)
    groups = net.cls_groups()
    ids = {g: {id(p) for p in ps} for g, ps in groups.items()}
    assert ids["m0"] == {id(p) for p in net.encoder0.parameters()}
    assert ids["m1"] == {id(p) for p in net.encoder1.parameters()}
    assert ids["m0_prime"] == {id(p) for p in net.head1.parameters()}  # theta'_m0: the head reading m1
    assert ids["m1_prime"] == {id(p) for p in net.head0.parameters()}
    if head == "late_concat":
        assert all(id(net.head_bias) not in s for s in ids.values())  # the shared bias in no group
    # mu of a fused loss's gradients, by hand: theta'_m0 = W1 (late_concat) or h1.
    x0, x1, y = torch.randn(6, 4), torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    net.zero_grad()
    F.cross_entropy(net.predict(*net(x0, x1)), y).backward()
    mu = CLSTracker(groups).compute_mu()
    hand = lambda ps: sum(float(p.grad.double().square().sum()) for p in ps) / sum(
        float(p.detach().double().square().sum()) for p in ps)
    assert_close(mu.tolist(), [hand(list(net.encoder0.parameters())), hand(list(net.encoder1.parameters())),
                               hand(list(net.head1.parameters())), hand(list(net.head0.parameters()))])


def test_method_forward_and_loss_are_the_fused_loss():
    net = vector_net()
    method = make_method("vanilla")
    x0, x1, y = torch.randn(6, 4), torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    out = method.forward(net, x0, x1, ctx())
    assert_close(out["z"], out["y0"] + out["y1"])
    loss, terms = method.loss(out, y, ctx())
    assert_close(loss, F.cross_entropy(out["z"], y))
    assert_close(terms["loss0"], F.cross_entropy(out["y0"], y))
    assert not terms["loss0"].requires_grad
    res = evaluate(net, TensorLoader((x0, x1, y), batch_size=4, shuffle=False))
    with torch.no_grad():
        z = net.predict(*net(x0, x1))
    assert_close(res["acc"], (z.argmax(1) == y).float().mean().item())
    assert_close(res["loss"], F.cross_entropy(z, y).item())  # the training loss: CE(z), not CE(z0) + CE(z1)


def test_strip_final_linear_shares_the_branch_modules():
    torch.manual_seed(0)
    two = mmtm_convnet(4, widths=(4, 8))
    enc, lin = strip_final_linear(two.branch0)
    assert lin is two.branch0.head[2] and lin.in_features == 8
    assert enc.stage1 is two.branch0.stage1 and len(enc.head) == 2
    assert {id(p) for p in two.encoder(0).parameters()} == {id(p) for p in two.branch0.parameters()} - {
        id(lin.weight), id(lin.bias)}
    with pytest.raises(ValueError, match="no nn.Linear"):
        strip_final_linear(nn.Sequential(OrderedDict(stage1=nn.Conv2d(3, 4, 3))))


def test_build_model_keeps_mmtm_and_builds_late_fusion_from_the_same_branches():
    torch.manual_seed(0)
    mmtm = build_model("convnet", 4, (3, 3))
    torch.manual_seed(0)
    reference = mmtm_convnet(4)
    assert isinstance(mmtm, TwoBranchNet) and mmtm.fusion == "mmtm" and not mmtm.is_late
    assert all(torch.equal(a, b) for a, b in zip(mmtm.state_dict().values(), reference.state_dict().values()))
    torch.manual_seed(0)
    late = build_model("convnet", 4, (3, 3), fusion="late_sum")
    assert isinstance(late, LateFusionNet) and late.fusion == "late_sum" and late.is_late
    assert torch.equal(late.encoder0.stage1[0].weight, reference.branch0.stage1[0].weight)
    assert late.features == (64, 64) and late.num_classes == 4
    with pytest.raises(ValueError, match="fusion='x' is unknown"):
        build_model("convnet", 4, fusion="x")


def test_fusion_is_part_of_a_runs_identity_but_mmtm_runs_keep_their_names():
    data = DataConfig.smoke()
    legacy = TrainConfig.smoke()
    assert "fusion" not in legacy.identity()
    assert run_name(data, TrainConfig.smoke(fusion="mmtm")) == run_name(data, legacy)
    late = TrainConfig.smoke(fusion="late_concat")
    assert late.identity()["fusion"] == "late_concat"
    assert run_name(data, late) != run_name(data, legacy)
    assert run_name(data, late) != run_name(data, TrainConfig.smoke(fusion="late_sum"))
    with pytest.raises(ValueError, match="fusion='early' is unknown"):
        TrainConfig(fusion="early")


def test_unimodal_counterpart_of_a_late_fusion_model():
    torch.manual_seed(0)
    late = build_model("convnet", 4, fusion="late_concat")
    uni = UniModalNet.from_two_branch(late, 1)
    assert uni.modality == 1 and len(uni.se) == 0
    assert torch.equal(uni.branch.stage1[0].weight, late.encoder1.stage1[0].weight)
    assert uni.branch.stage1[0].weight is not late.encoder1.stage1[0].weight  # a copy
    assert uni(torch.randn(2, 3, 12, 12)).shape == (2, 4)


@pytest.mark.parametrize("algorithm", ["vanilla", "guided", "random", "ogm_ge", "rubi", "gblend"])
def test_methods_train_a_late_fusion_model(tmp_path, toy_loaders, algorithm):
    torch.manual_seed(0)
    model = as_fusion(mmtm_convnet(4, widths=(4, 8)), "late_concat")
    cfg = TrainConfig(algorithm=algorithm, fusion="late_concat", lr=0.05, max_epochs=2, progress=False,
                      log_dir=str(tmp_path / "logging"), ckpt_dir=str(tmp_path / "checkpoints"), run_name="run",
                      options={"epsilon": 0.0, "window": 2} if algorithm == "guided" else {})
    train_loader, val_loader, test_loader = toy_loaders
    result = train(model, train_loader, cfg, val_loader, test_loader, device="cpu")
    steps = read_jsonl(tmp_path / "logging" / "run" / "steps.jsonl")
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert all(math.isfinite(s["d_speed"]) for s in steps)
    if algorithm in ("guided", "random"):
        assert any(s["mode"] != "fused" for s in steps[len(train_loader):])
    epochs = read_jsonl(tmp_path / "logging" / "run" / "epochs.jsonl")
    assert {"val_acc", "val_acc0", "val_acc1", "train_acc"} <= set(epochs[-1])
    if algorithm == "vanilla":  # the logged step loss is the fused loss CE(z)
        assert "loss_fused" not in steps[0] and "loss0" in steps[0]
    state = load_checkpoint(result.best_path, map_location="cpu")["model"]
    assert state["feat_count"].item() > 0  # the running means travel with the checkpoint
    fresh = as_fusion(mmtm_convnet(4, widths=(4, 8)), "late_concat")
    fresh.load_state_dict(state)
    assert fresh.has_running_scales


@pytest.mark.parametrize("algorithm", ["guided", "ogm_ge"])
def test_resume_mid_epoch_on_late_fusion_is_exact(tmp_path, algorithm):
    """The running feature means travel with the checkpoint: a resumed run equals an uninterrupted one, bitwise."""
    def model():
        torch.manual_seed(0)
        return as_fusion(mmtm_convnet(4, widths=(4, 8)), "late_sum")

    def cfg(path, **kw):
        return TrainConfig(algorithm=algorithm, fusion="late_sum", lr=0.05, max_epochs=10, progress=False,
                           log_dir=str(path / "l"), ckpt_dir=str(path / "c"), run_name="run",
                           options={"epsilon": 0.0, "window": 2} if algorithm == "guided" else {}, **kw)

    def run(config):
        return train(model(), ToyLoader(), config, ToyLoader(24, seed=1), ToyLoader(24, seed=2), device="cpu")

    res_a = run(cfg(tmp_path / "a", max_steps=16))
    first = run(cfg(tmp_path / "b", max_steps=8, ckpt_every_steps=4))
    assert first.steps == 8
    torch.manual_seed(123)
    res_b = run(cfg(tmp_path / "b", max_steps=16))
    assert res_b.resumed_from_step == 8
    a, b = load_checkpoint(res_a.last_path)["model"], load_checkpoint(res_b.last_path)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and a["feat_count"].item() > 0
    assert (res_a.log_dir / "steps.jsonl").read_text() == (res_b.log_dir / "steps.jsonl").read_text()
    if algorithm == "guided":
        assert any(s["mode"] != "fused" for s in read_jsonl(res_b.log_dir / "steps.jsonl"))


def test_rubi_and_gblend_on_late_fusion_use_the_fused_logits():
    net = vector_net("late_concat")
    net.train()
    x0, x1, y = torch.randn(6, 4), torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    rubi = make_method("rubi")  # bias modality m0 by default
    rubi.setup(net)
    out = rubi.forward(net, x0, x1, ctx())
    assert_close(out["z"], out["y0"] + out["y1"])
    loss, terms = rubi.loss(out, y, ctx())
    mask = torch.sigmoid(out["c1"])
    assert_close(terms["loss_fused"], F.cross_entropy(out["z"] * mask, y))
    assert_close(loss, terms["loss_fused"] + F.cross_entropy(out["c2"], y))
    net.zero_grad()
    terms["loss_bias"].backward()  # the bias path never reaches the encoder (stop-gradient on e0)
    assert net.encoder0[0].weight.grad is None
    gblend = make_method("gblend")
    gblend.setup(net)
    out = make_method("vanilla").forward(net, x0, x1, ctx())
    loss, terms = gblend.loss(out, y, ctx())
    assert_close(terms["loss_fused"], F.cross_entropy(out["z"], y))  # the fused head is z, not (z0 + z1) / 2
    assert_close(loss, (2 / 3) * (terms["loss0"] + terms["loss1"] + terms["loss_fused"]))
