"""The related work's balancers on the two-branch MMTM model (SPEC Sec. 12): OGM-GE's coefficients, modulation and
noise, Gradient Blending's weights and loss, each against hand computations, and both through the trainer (logs, the
CLS on unmodulated gradients, exact resume, settings)."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import ToyLoader, fresh_model, read_jsonl
from custom_branches import mlp_model, seq_image_model
from greedymm.config import DataConfig, TrainConfig, run_name
from greedymm.experiment.table import format_table, summarize
from greedymm.measures import CLS_GROUPS
from greedymm.methods import StepContext, get_method, make_method, method_names
from greedymm.methods.gblend import GBlendSettings, GradientBlending, blend_weights, head_losses
from greedymm.methods.ogm_ge import OGMGE, OGMSettings, encoder_weights, ogm_coefficients
from greedymm.models import FusionMode, mmtm_convnet
from greedymm.plots import plot_d_util
from greedymm.training import Trainer, load_checkpoint, train


def make_cfg(tmp_path, options=None, **kw):
    base = dict(lr=0.05, max_epochs=3, progress=False, log_dir=str(tmp_path / "logging"),
                ckpt_dir=str(tmp_path / "checkpoints"), run_name="run")
    return TrainConfig(**{**base, **kw}, options=options or {})


def step(epoch=0):
    """The context of a regular step in `epoch`."""
    return StepContext(epoch=epoch, step=1, batch=0, mode=FusionMode.FUSED, steps_per_epoch=None)


def ogm(alpha=0.1, start_epoch=0, end_epoch=None, noise=True, seed=0):
    return OGMGE(OGMSettings(ogm_alpha=alpha, ogm_start_epoch=start_epoch, ogm_end_epoch=end_epoch), seed=seed,
                 noise=noise)


def strip_time(history):
    return [{k: v for k, v in e.items() if k != "time"} for e in history]


# Fixed logits of 2 samples, 4 classes, labels (0, 1). softmax([ln 3, 0, 0, 0])[0] = 3 / 6 and softmax(0)[1] = 1 / 4,
# so s = 0.75 for STRONG; softmax(0)[y] = 1 / 4 for both samples, s = 0.5 for FLAT.
LABELS = torch.tensor([0, 1])
STRONG = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
FLAT = torch.zeros(2, 4)


def hand_k(rho, alpha):
    """Their Eq. 10 with their code's else branch, written out: (k0, k1)."""
    if rho > 1:
        return 1 - math.tanh(alpha * rho), 1.0
    return 1.0, 1 - math.tanh(alpha / rho)


# ------------------------------------------------------------------------------------------------------------ OGM-GE
@pytest.mark.parametrize("y0, y1, rho, k0, k1", [
    (STRONG, FLAT, 1.5, 1 - math.tanh(0.5 * 1.5), 1.0),  # branch 0 dominates: k0 = 1 - tanh(alpha rho)
    (FLAT, STRONG, 0.5 / 0.75, 1.0, 1 - math.tanh(0.5 * 0.75 / 0.5)),  # branch 1 dominates: k1 = 1 - tanh(alpha/rho)
    (STRONG, STRONG, 1.0, 1.0, 1 - math.tanh(0.5)),  # rho = 1: their code's else branch modulates branch 1
])
def test_ogm_coefficients_against_a_hand_computation(y0, y1, rho, k0, k1):
    got = ogm_coefficients(y0, y1, LABELS, alpha=0.5)
    assert all(t.shape == () and t.dtype == torch.float32 for t in got)
    assert_close([float(t) for t in got], [rho, k0, k1], rtol=1e-6, atol=1e-7)


def test_ogm_coefficients_when_a_score_underflows():
    dead = torch.tensor([[-200.0, 0.0, 0.0, 0.0], [0.0, -200.0, 0.0, 0.0]])  # p(y_i) = e^-200 = 0 in float32
    rho, k0, k1 = ogm_coefficients(STRONG, dead, LABELS, alpha=0.5)  # s1 = 0: rho = inf, branch 0 stops
    assert math.isinf(rho) and (float(k0), float(k1)) == (0.0, 1.0)
    rho, k0, k1 = ogm_coefficients(dead, STRONG, LABELS, alpha=0.5)  # s0 = 0: rho = 0, branch 1 stops
    assert float(rho) == 0.0 and (float(k0), float(k1)) == (1.0, 0.0)
    rho, k0, k1 = ogm_coefficients(dead, dead, LABELS, alpha=0.5)  # 0 / 0: nothing known, nothing modulated
    assert math.isnan(rho) and (float(k0), float(k1)) == (1.0, 1.0)


def modulated_names(model, branch):
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in encoder_weights(getattr(model, f"branch{branch}"))]


def test_encoder_weights_are_the_convolutions_or_an_mlps_hidden_layers():
    model = fresh_model()
    assert modulated_names(model, 1) == ["branch1.stage1.0.weight", "branch1.stage2.0.weight",
                                         "branch1.stage3.0.weight"]
    seq_image = seq_image_model()  # Conv1d on a sequence, Conv2d on an image
    assert modulated_names(seq_image, 0) == ["branch0.stage1.0.weight", "branch0.stage2.0.weight"]
    assert modulated_names(seq_image, 1) == ["branch1.stage1.0.weight", "branch1.stage2.0.weight"]
    mlp = mlp_model()  # no convolution: the linear layers but the head
    assert modulated_names(mlp, 0) == ["branch0.stage1.0.weight", "branch0.stage2.0.weight"]


def test_ogm_on_an_mlp_scales_its_hidden_linear_layers_not_its_head():
    model = mlp_model()
    before = seeded_grads(model)
    alg = ogm_ready(model, alpha=0.5, noise=False)
    alg.after_backward(model, {"y0": FLAT, "y1": STRONG}, LABELS, step())  # branch 1 dominates
    k = 1 - math.tanh(0.75)
    scaled = {"branch1.stage1.0.weight", "branch1.stage2.0.weight"}
    for name, p in model.named_parameters():
        if name in scaled:
            assert_close(p.grad, before[name] * k, rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.grad, before[name]), name


def seeded_grads(model):
    """Gradients of known, distinct scales: N(0.5 i, (0.01 (i + 1))^2) for the i-th parameter."""
    g = torch.Generator().manual_seed(1)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=g) * 0.01 * (i + 1) + 0.5 * i
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def ogm_ready(model, **kw):
    alg = ogm(**kw)
    alg.setup(model)
    return alg


@pytest.mark.parametrize("dominant", [0, 1])
def test_ogm_scales_only_the_dominant_branchs_conv_gradients(dominant):
    model = fresh_model()
    before = seeded_grads(model)
    alg = ogm_ready(model, alpha=0.5, noise=False)
    y0, y1 = (STRONG, FLAT) if dominant == 0 else (FLAT, STRONG)
    logs = alg.after_backward(model, {"y0": y0, "y1": y1}, LABELS, step())
    rho = 1.5 if dominant == 0 else 0.5 / 0.75
    k = 1 - math.tanh(0.5 * 1.5)  # alpha * rho = alpha / rho = 0.75 either way
    assert_close([float(logs["rho"]), float(logs["k0"]), float(logs["k1"])],
                 [rho, k if dominant == 0 else 1.0, 1.0 if dominant == 0 else k], rtol=1e-6, atol=1e-7)
    scaled = {f"branch{dominant}.stage{i}.0.weight" for i in (1, 2, 3)}
    for name, p in model.named_parameters():
        if name in scaled:
            assert_close(p.grad, before[name] * k, rtol=1e-6, atol=0)
        else:  # BN, heads, MMTMs and the other branch: untouched, bit for bit
            assert torch.equal(p.grad, before[name]), name


def test_ge_noise_has_each_gradients_std_and_touches_nothing_else():
    model = fresh_model(widths=(32, 64, 64))  # conv weights of 864, 18432 and 36864 entries
    before = seeded_grads(model)
    alg = ogm_ready(model, alpha=2.0, seed=3)
    logs = alg.after_backward(model, {"y0": STRONG, "y1": FLAT}, LABELS, step())  # branch 0: k0 = 1 - tanh(3)
    k0 = 1 - math.tanh(3.0)
    assert_close([float(logs["k0"]), float(logs["k1"])], [k0, 1.0])
    convs = {f"branch{b}.stage{i}.0.weight": k for b, k in ((0, k0), (1, 1.0)) for i in (1, 2, 3)}
    for name, p in model.named_parameters():
        if name not in convs:
            assert torch.equal(p.grad, before[name]), name
            continue
        g = before[name].double()
        noise = p.grad.double() - g * convs[name]
        n = g.numel()
        # the std of the gradient before modulation (k0 = 0.005 makes the modulated one's std 200 times smaller)
        assert_close(noise.std(), g.std(), rtol=5 / math.sqrt(2 * n), atol=0)
        assert abs(float(noise.mean())) < 5 * float(g.std()) / math.sqrt(n)
    # the noise is the algorithm's own seeded stream: the same seed draws it again, another does not
    for seed, same in ((3, True), (4, False)):
        other = fresh_model(widths=(32, 64, 64))
        seeded_grads(other)
        ogm_ready(other, alpha=2.0, seed=seed).after_backward(other, {"y0": STRONG, "y1": FLAT}, LABELS, step())
        assert torch.equal(other.branch1.stage2[0].weight.grad, model.branch1.stage2[0].weight.grad) == same


@pytest.mark.parametrize("epoch, active", [(0, False), (1, True), (2, True), (3, True), (4, False)])
def test_modulation_and_noise_only_inside_the_window(epoch, active):
    # the window is start <= epoch <= end, the end epoch included as in the official code
    model = fresh_model()
    before = seeded_grads(model)
    alg = ogm(alpha=0.5, start_epoch=1, end_epoch=3)
    alg.setup(model)
    logs = alg.after_backward(model, {"y0": STRONG, "y1": FLAT}, LABELS, step(epoch))
    assert_close(float(logs["rho"]), 1.5)  # logged either way
    assert_close([float(logs["k0"]), float(logs["k1"])], [1 - math.tanh(0.75) if active else 1.0, 1.0])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.grad, before[n])}
    expected = {f"branch{b}.stage{i}.0.weight" for b in (0, 1) for i in (1, 2, 3)}  # noise reaches both branches
    assert changed == (expected if active else set())
    assert alg.draws == int(active)


def test_ogm_generator_state_round_trips():
    model = fresh_model()
    seeded_grads(model)
    alg = ogm_ready(model, seed=5)
    alg.after_backward(model, {"y0": STRONG, "y1": FLAT}, LABELS, step())
    state = copy.deepcopy(alg.state_dict())
    draws = [alg.generator.get_state()]
    twin = ogm(seed=99)  # another seed: only the state can make it draw the same
    twin.setup(fresh_model())
    twin.load_state_dict(state)
    assert twin.draws == 1 and torch.equal(twin.generator.get_state(), draws[0])
    assert torch.equal(torch.randn(5, generator=twin.generator), torch.randn(5, generator=alg.generator))


def test_ogm_resumed_on_another_kind_of_device_draws_a_fresh_seeded_stream():
    alg = ogm(seed=5)
    alg.setup(fresh_model())
    state = {**alg.state_dict(), "generator": torch.zeros(16, dtype=torch.uint8), "generator_device": "cuda",
             "draws": 7}
    alg.load_state_dict(state)  # a CUDA generator's state cannot drive a CPU generator
    reseeded = alg.generator.get_state()
    alg.load_state_dict({**state, "draws": 8})
    assert not torch.equal(alg.generator.get_state(), reseeded)  # a function of the draws so far: a new stream
    fresh = ogm(seed=5)
    fresh.setup(fresh_model())
    assert not torch.equal(fresh.generator.get_state(), reseeded)
    torch.manual_seed(5)  # the global generator, which drew the initial weights: the noise must not replay it
    assert not torch.equal(fresh.generator.get_state(), torch.get_rng_state())


def test_bad_ogm_settings():
    with pytest.raises(ValueError, match="alpha=-1"):
        ogm(alpha=-1)
    with pytest.raises(ValueError, match="ogm_end_epoch=1 must be at least ogm_start_epoch=2"):
        ogm(start_epoch=2, end_epoch=1)
    assert ogm(start_epoch=2, end_epoch=2).active(2)  # a one-epoch window
    with pytest.raises(TypeError, match="TwoBranchNet"):
        OGMGE().setup(torch.nn.Linear(2, 2))
    no_hidden = fresh_model()
    no_hidden.branch0 = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(3, 4))  # a head and nothing else
    with pytest.raises(ValueError, match="branch0 has neither"):
        OGMGE().setup(no_hidden)


# --------------------------------------------------------------------------------------------------- Gradient Blending
@pytest.mark.parametrize("g_end, o_end, expected", [
    # dG = (0.5, 0.2, 1.0), dO = (0.5, 0.2, 1.0): raw = (2, 5, 1), sum 8
    ((1.5, 1.8, 1.0), (0.6, 0.3, 1.1), (2 / 8, 5 / 8, 1 / 8)),
    # a negative dG (head 1 generalised worse) is clamped to 0; a negative dO counts through its square
    ((1.5, 2.1, 1.0), (0.6, 0.3, -0.9), (2 / 3, 0.0, 1 / 3)),
    # dO = 0 with dG > 0 (head 2) is the limit +inf: it takes all the weight
    ((1.5, 1.8, 1.0), (0.6, 0.3, 0.1), (0.0, 0.0, 1.0)),
    # two such heads share it
    ((1.5, 1.8, 1.0), (0.1, 0.3, 0.1), (0.5, 0.0, 0.5)),
    # dO = 0 with dG = 0 gives 0; the others are normalised
    ((1.5, 2.0, 1.0), (0.6, 0.1, 1.1), (2 / 3, 0.0, 1 / 3)),
    # no head generalised better: all raw weights 0 -> equal weights
    ((2.0, 2.5, 2.2), (0.6, 0.3, 1.1), (1 / 3, 1 / 3, 1 / 3)),
    # a non-finite loss counts as 0
    ((math.nan, 1.8, 1.0), (0.6, 0.3, 1.1), (0.0, 5 / 6, 1 / 6)),
])
def test_blend_weights_against_a_hand_computation(g_end, o_end, expected):
    g_start, o_start = (2.0, 2.0, 2.0), (0.1, 0.1, 0.1)
    assert_close(blend_weights(g_start, o_start, g_end, o_end), list(expected), rtol=1e-9, atol=1e-12)


def test_head_losses_read_the_record_and_need_validation():
    record = {"val_loss0": 1.0, "val_loss1": 2.0, "val_loss_fused": 0.5, "train_loss0": 0.25, "train_loss1": 1.5,
              "train_loss_fused": 0.75}
    assert head_losses(record) == ([1.0, 2.0, 0.5], [0.75, 0.5, -0.25])
    with pytest.raises(ValueError, match="val_loader"):
        head_losses({"train_loss0": 1.0, "train_loss1": 1.0, "train_loss_fused": 1.0})


def test_blended_loss_is_the_weighted_sum_of_the_three_heads():
    alg = GradientBlending()
    alg.setup(fresh_model())
    alg._set_weights([0.5, 0.2, 0.3])
    y0 = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    y1 = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    y = torch.tensor([0, 1])

    def ce(logits):  # by hand: mean over samples of log(sum exp) - logit of the label
        return sum(math.log(sum(math.exp(v) for v in row)) - row[int(t)]
                   for row, t in zip(logits.tolist(), y)) / len(y)

    fused = (y0 + y1) / 2
    loss, terms = alg.loss({"y0": y0, "y1": y1}, y, step())
    assert_close(float(loss), 0.5 * ce(y0) + 0.2 * ce(y1) + 0.3 * ce(fused), rtol=1e-6, atol=1e-7)
    assert_close([float(terms[k]) for k in ("loss0", "loss1", "loss_fused")], [ce(y0), ce(y1), ce(fused)],
                 rtol=1e-6, atol=1e-7)
    logs = alg.after_backward(None, {}, y, step())
    assert_close([float(logs[k]) for k in ("w0", "w1", "w_fused")], [0.5, 0.2, 0.3])


def synthetic_record(epoch, val, train):
    return {"epoch": epoch, **{f"val_loss{s}": v for s, v in zip(("0", "1", "_fused"), val)},
            **{f"train_loss{s}": v for s, v in zip(("0", "1", "_fused"), train)}}


# A synthetic loss history: (val losses, train losses) of the heads y0, y1, fused after epochs 1..5.
HISTORY = {1: ((2.0, 2.0, 2.0), (1.9, 1.9, 1.9)),
           2: ((9.0, 9.0, 9.0), (0.0, 0.0, 0.0)),  # inside the window: ignored by the estimate
           3: ((1.5, 1.8, 2.1), (1.0, 1.5, 1.9)),  # vs 1: dG = (0.5, 0.2, -0.1), dO = (0.4, 0.2, 0.1)
           4: ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
           5: ((1.5, 1.0, 2.1), (1.0, 0.7, 1.9))}  # vs 3: dG = (0, 0.8, 0), dO = (0, 0, 0)


@pytest.mark.parametrize("scale", [2.0, 1.0])
def test_weights_are_re_estimated_every_n_epochs_from_the_last_window(scale):
    alg = GradientBlending(GBlendSettings(gblend_period=2, gblend_scale=scale))
    alg.setup(fresh_model())
    third = torch.tensor(scale / 3, dtype=torch.float32).item()  # the weights sum to the scale (2: vanilla's)
    raw = (0.5 / 0.4 ** 2, 0.2 / 0.2 ** 2, 0.0)  # 3.125, 5, clamped
    after3 = [torch.tensor(scale * r / sum(raw), dtype=torch.float32).item() for r in raw]
    expected_used = {1: [third] * 3, 2: [third] * 3, 3: [third] * 3, 4: after3, 5: after3}
    expected_next = {1: [third] * 3, 2: [third] * 3, 3: after3, 4: after3, 5: [0.0, scale, 0.0]}  # dO = 0 < dG
    states = {}
    for epoch, (val, tr) in HISTORY.items():
        out = alg.end_epoch(synthetic_record(epoch, val, tr), step(epoch - 1))
        assert_close([out["w0"], out["w1"], out["w_fused"]], expected_used[epoch], rtol=1e-6, atol=0)
        assert_close([out["next_w0"], out["next_w1"], out["next_w_fused"]], expected_next[epoch], rtol=1e-6, atol=0)
        assert alg._w.tolist() == alg.weights == [out["next_w0"], out["next_w1"], out["next_w_fused"]]  # the loss's
        states[epoch] = copy.deepcopy(alg.state_dict())
    # a resumed algorithm keeps the weights and the window's start (epoch 3)
    resumed = GradientBlending(GBlendSettings(gblend_period=2, gblend_scale=scale))
    resumed.setup(fresh_model())
    resumed.load_state_dict(states[4])
    assert resumed.weights == states[4]["weights"] and resumed._w.tolist() == states[4]["weights"]
    assert_close(resumed.weights, after3, rtol=1e-6, atol=0)
    assert resumed.end_epoch(synthetic_record(5, *HISTORY[5]), step(4))["next_w1"] == scale


def test_equal_blending_weights_train_at_vanillas_gradient_scale():
    """SPEC Sec. 12: weights summing to 2 make the first gradients those of CE(y0) + CE(y1) + ... at the same scale:
    with equal weights 2/3 the loss is 2/3 (CE(y0) + CE(y1) + CE(fused)), whose gradient norm is comparable to
    vanilla's; weights summing to 1 would halve it."""
    y0 = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 2.0, 0.0, 0.0]], requires_grad=True)
    y1 = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    grads = {}
    for scale in (1.0, 2.0):
        alg = GradientBlending(GBlendSettings(gblend_scale=scale))
        alg.setup(fresh_model())
        loss, _ = alg.loss({"y0": y0, "y1": y1}, y, step())
        grads[scale] = torch.autograd.grad(loss, (y0, y1))
    for g1, g2 in zip(grads[1.0], grads[2.0]):
        assert_close(g2, 2 * g1)  # the default scale doubles their formulation's step
    assert GradientBlending().weights == [torch.tensor(2 / 3, dtype=torch.float32).item()] * 3
    with pytest.raises(ValueError, match="gblend_scale=0"):
        GradientBlending(GBlendSettings(gblend_scale=0))


def test_bad_gblend_settings():
    with pytest.raises(ValueError, match="period=0"):
        GradientBlending(GBlendSettings(gblend_period=0))


# ------------------------------------------------------------------------------------------------ through the trainer
class SpyOGM(OGMGE):
    """Records, before the modulation, mu of the branch groups by hand and the batch's scores by hand."""

    def __init__(self, model, alpha, start_epoch, seed):
        super().__init__(OGMSettings(ogm_alpha=alpha, ogm_start_epoch=start_epoch), seed=seed)
        self.groups = model.cls_groups()
        self.seen = []

    def after_backward(self, model, out, y, ctx):
        mu = {}
        for g in ("m0", "m1"):
            params = self.groups[g]
            grad = sum(float((p.grad.double() ** 2).sum()) for p in params)
            mu[g] = grad / sum(float((p.detach().double() ** 2).sum()) for p in params)
        scores = [sum(math.exp(row[int(t)]) / sum(math.exp(v) for v in row) for row, t in zip(o.tolist(), y))
                  for o in (out["y0"], out["y1"])]
        self.seen.append({"mu": mu, "rho": scores[0] / scores[1]})
        return super().after_backward(model, out, y, ctx)


def test_ogm_ge_end_to_end_logs_follow_the_formula_and_the_cls_sees_unmodulated_gradients(tmp_path, toy_loaders):
    train_l, val, _ = toy_loaders
    model = fresh_model()
    spy = SpyOGM(model, alpha=0.5, start_epoch=1, seed=0)
    res = train(model, train_l, make_cfg(tmp_path, algorithm="ogm_ge", max_epochs=2,
                                         options={"ogm_alpha": 0.5, "ogm_start_epoch": 1}), val, method=spy)
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    assert len(steps) == len(spy.seen) == 2 * len(train_l)
    for s, seen in zip(steps, spy.seen):
        assert_close(s["rho"], seen["rho"], rtol=1e-5, atol=0)
        k0, k1 = hand_k(s["rho"], 0.5) if s["epoch"] >= 2 else (1.0, 1.0)  # the window starts after epoch 1
        assert_close((s["k0"], s["k1"]), (k0, k1), rtol=1e-6, atol=1e-7)
        # mu is measured on the gradients before modulation and noise
        assert_close((s["mu_m0"], s["mu_m1"]), (seen["mu"]["m0"], seen["mu"]["m1"]), rtol=1e-5, atol=0)
    assert any(min(s["k0"], s["k1"]) < 1 for s in steps if s["epoch"] >= 2)
    assert "rho" not in res.history[-1] and math.isfinite(res.history[-1]["d_speed"])


def test_gblend_end_to_end_weights_follow_the_loss_history(tmp_path, toy_loaders):
    train_l, val, _ = toy_loaders
    res = train(fresh_model(), train_l, make_cfg(tmp_path, algorithm="gblend", options={"gblend_period": 1},
                                                 max_epochs=3), val)
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    hist = res.history
    names = ("w0", "w1", "w_fused")
    for s in steps:
        epoch = hist[s["epoch"] - 1]
        assert [s[k] for k in names] == [epoch[k] for k in names]  # constant within an epoch
        assert_close(s["loss"], sum(s[k] * s[t] for k, t in zip(names, ("loss0", "loss1", "loss_fused"))),
                     rtol=1e-6, atol=1e-7)
    assert_close([hist[0][k] for k in names], [2 / 3] * 3)  # equal, summing to 2: vanilla's gradient scale
    for prev, cur, nxt in zip(hist, hist[1:], hist[2:] + [None]):  # period 1: every epoch from the second
        raw = []
        for t in ("0", "1", "_fused"):
            d_g = prev[f"val_loss{t}"] - cur[f"val_loss{t}"]
            d_o = (cur[f"val_loss{t}"] - cur[f"train_loss{t}"]) - (prev[f"val_loss{t}"] - prev[f"train_loss{t}"])
            raw.append(max(d_g / d_o ** 2, 0.0))
        want = [2 * r / sum(raw) for r in raw] if sum(raw) > 0 else [2 / 3] * 3
        assert_close([cur[f"next_{k}"] for k in names], want, rtol=1e-6, atol=1e-7)
        if nxt is not None:
            assert [nxt[k] for k in names] == [cur[f"next_{k}"] for k in names]
    assert len({tuple(e[k] for k in names) for e in hist}) > 1  # the weights did move
    assert "train_loss_fused" in hist[-1] and "val_loss_fused" in hist[-1]


@pytest.mark.parametrize("algorithm", ["ogm_ge", "gblend"])
def test_resume_mid_epoch_is_exact(tmp_path, algorithm):
    n_steps = 20  # 6 batches per epoch: the stop at 10 is mid-epoch 2; gblend re-estimates at the ends of 2 and 3
    kw = dict(algorithm=algorithm, max_epochs=10, options={"gblend_period": 1, "ogm_alpha": 0.5})

    def run(folder, ckpt_every=None, steps=n_steps, model=None):
        return train(model or fresh_model(), ToyLoader(), make_cfg(tmp_path / folder, max_steps=steps,
                                                                   ckpt_every_steps=ckpt_every, **kw),
                     ToyLoader(24, seed=1), ToyLoader(24, seed=2))

    res_a = run("a")
    first = run("b", ckpt_every=5, steps=n_steps // 2)
    assert first.steps == 10 and first.stop_reason == "max_steps"
    torch.manual_seed(123)  # a fresh process would have other global RNG state; the checkpoint restores it
    res_b = run("b", model=mmtm_convnet(4, widths=(4, 8, 8)))
    assert res_b.resumed_from_step == 10 and res_b.steps_this_call == 10
    model_a, model_b = (load_checkpoint(r.last_path)["model"] for r in (res_a, res_b))
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k  # bitwise
    assert (res_a.log_dir / "steps.jsonl").read_text() == (res_b.log_dir / "steps.jsonl").read_text()
    assert strip_time(res_a.history) == strip_time(res_b.history)
    if algorithm == "gblend":
        assert res_b.history[-1]["next_w0"] != res_b.history[0]["w0"]  # resumed with re-estimated weights


# ------------------------------------------------------------------------------------------------------- settings
def test_algorithms_settings_and_identity():
    names = method_names()
    assert names[:6] == [n for n in names if get_method(n).paper_row] and names[6:8] == ["ogm_ge", "gblend"]

    def make_algorithm(cfg):
        return make_method(cfg.algorithm, cfg.options, cfg.seed)

    alg = make_algorithm(TrainConfig(algorithm="ogm_ge", options=dict(ogm_alpha=0.3, ogm_start_epoch=2,
                                                                      ogm_end_epoch=5), seed=7))
    assert isinstance(alg, OGMGE) and (alg.alpha, alg.window, alg.seed, alg.noise) == (0.3, (2, 5), 7, True)
    alg = make_algorithm(TrainConfig(algorithm="gblend", options={"gblend_period": 4}))
    assert isinstance(alg, GradientBlending) and alg.period == 4
    # a balancer's settings define its own runs only
    for field, value, owner in (("ogm_alpha", 0.8, "ogm_ge"), ("ogm_start_epoch", 1, "ogm_ge"),
                                ("ogm_end_epoch", 9, "ogm_ge"), ("gblend_period", 5, "gblend")):
        for algorithm in ("vanilla", "guided", "ogm_ge", "gblend"):
            changed = TrainConfig(algorithm=algorithm, options={field: value}).identity() != TrainConfig(
                algorithm=algorithm).identity()
            assert changed == (algorithm == owner), (field, algorithm)
    data = DataConfig.paper()
    assert run_name(data, TrainConfig(algorithm="ogm_ge", options={"ogm_alpha": 0.8})) != run_name(
        data, TrainConfig(algorithm="ogm_ge"))
    assert run_name(data, TrainConfig(algorithm="vanilla", options={"ogm_alpha": 0.8})) == run_name(
        data, TrainConfig(algorithm="vanilla"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(options=dict(ogm_alpha=-0.1)), "ogm_alpha=-0.1 must be a finite number >= 0"),
    (dict(options=dict(ogm_alpha=math.inf)), "ogm_alpha=inf"),
    (dict(options=dict(ogm_start_epoch=-1)), "ogm_start_epoch=-1 must be 0 or more"),
    (dict(options=dict(ogm_start_epoch=3, ogm_end_epoch=2)), "ogm_end_epoch=2 must be at least ogm_start_epoch=3"),
    (dict(options=dict(gblend_period=0)), "gblend_period=0 must be at least 1"),
    (dict(algorithm="ogm"), "allowed: unimodal_m0, unimodal_m1, vanilla, rubi, random, guided, ogm_ge, gblend"),
])
def test_bad_balancer_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_table_and_d_util_plot_show_the_balancers_after_the_papers_rows():
    runs = [{"algorithm": a, "seed": 0, "acc": 0.9, "acc0": 0.8, "acc1": 0.7, "u_m1_m0": 0.1, "u_m0_m1": 0.1,
             "d_util": d, "d_speed": 0.0, "status": "ok"} for a, d in (("gblend", 0.2), ("vanilla", -0.1),
                                                                      ("ogm_ge", 0.1))]
    table = summarize(runs)
    assert list(table) == ["vanilla", "ogm_ge", "gblend"]
    lines = format_table(table, {"vanilla": {"acc": (90.09, 0.58), "d_util": -0.1}}).splitlines()
    assert "(not in the paper)" in lines[3] and "(not in the paper)" in lines[4] and "90.09" in lines[2]
    fig = plot_d_util({a: [table[a]["d_util"][0]] for a in table})
    colors = [bar.get_facecolor()[:3] for bar in fig.axes[0].patches]
    from matplotlib.colors import to_rgb
    assert colors == [to_rgb(get_method(a).color) for a in table] and len(set(colors)) == 3


# ---------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algorithm", ["ogm_ge", "gblend"])
def test_cuda_balancer_step_synchronises_once(tmp_path, toy_loaders, algorithm):
    trainer = Trainer(fresh_model(), toy_loaders[0], make_cfg(tmp_path, algorithm=algorithm), device="cuda")
    trainer.logs.files = {"steps": io.StringIO()}
    batches = [tuple(t.cuda() for t in b) for b in toy_loaders[0]]
    trainer._train_step(*batches[0])  # kernels warm, cached indices built
    trainer._train_step(*batches[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = trainer._train_step(*batches[2])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert ("rho" in record) == (algorithm == "ogm_ge") and ("w0" in record) == (algorithm == "gblend")
