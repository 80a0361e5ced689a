"""The field's balancers (issue 19): MMPareto, OPM, PMR and AGM on the MMTM and the late-fusion models: each formula
against hand computations on fixed tensors, one step's hooks, the CLS on the gradients before modulation, exact
resume mid-run, and two-epoch runs on both fusions."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import ToyLoader, fresh_model, read_jsonl
from greedymm.config import TrainConfig
from greedymm.measures import CLS_GROUPS
from greedymm.methods import StepContext, get_method, method_names
from greedymm.methods.agm import AGM, AGMSettings, agm_coefficients, response_scores, shapley_responses
from greedymm.methods.contract import encoder_parameters
from greedymm.methods.mmpareto import MMPareto, MMParetoSettings, pareto_combine
from greedymm.methods.opm import OPM, OPMSettings, drop_probabilities, prediction_scores
from greedymm.methods.pmr import PMR, PMRSettings, pmr_coefficients, prototype_entropy, prototype_logits
from greedymm.models import FusionMode, as_fusion
from greedymm.training import load_checkpoint, train

FIELD = ("mmpareto", "opm", "pmr", "agm")
LABELS = torch.tensor([0, 1])
STRONG = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # p(y) = 1/2, 1/4
FLAT = torch.zeros(2, 4)  # p(y) = 1/4, 1/4


def model_of(fusion):
    model = fresh_model()
    return model if fusion == "mmtm" else as_fusion(model, fusion)


def make_cfg(tmp_path, algorithm, fusion="mmtm", options=None, **kw):
    base = dict(lr=0.05, max_epochs=2, progress=False, log_dir=str(tmp_path / "logging"),
                ckpt_dir=str(tmp_path / "checkpoints"), run_name="run")
    return TrainConfig(**{**base, **kw}, algorithm=algorithm, fusion=fusion, options=options or {})


def step(epoch=0, n=1, mode=FusionMode.FUSED):
    return StepContext(epoch=epoch, step=n, batch=0, mode=mode, steps_per_epoch=None)


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randn(n, 3, 12, 12, generator=g), torch.arange(n) % 4


def one_step(method, model, ctx=None):
    """A training step's forward, loss, backward and hooks by hand; the gradients before the hooks and the logs."""
    ctx = ctx or step()
    method.setup(model)
    x0, x1, y = batch()
    out = method.forward(model, x0, x1, ctx)
    loss, terms = method.loss(out, y, ctx)
    model.zero_grad(set_to_none=True)
    method.backward(loss, terms, ctx)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    logs = method.after_backward(model, out, y, ctx)
    return out, y, before, logs


# ---------------------------------------------------------------------------------------------------------- MMPareto
def test_pareto_combination_of_a_conflicting_pair():
    # g_mm = (3, 0), g_u = (-1, 1): <,> = -3, cos = -1/sqrt(2); w = (2 + 3) / (9 + 2 + 6) = 5/17;
    # n = 2 (5/17 g_mm + 12/17 g_u) = (6, 24) / 17, shorter than g_mm + g_u = (2, 1): raised to |(2, 1)| = sqrt(5)
    new, cos, w = pareto_combine([torch.tensor([3.0, 0.0])], [torch.tensor([-1.0, 1.0])], gamma=1.5)
    assert_close(float(cos), -1 / math.sqrt(2))
    assert_close(float(w), 5 / 17)
    assert_close(new[0], 1.5 * math.sqrt(5) * torch.tensor([1.0, 4.0]) / math.sqrt(17))
    # the min-norm direction has equal inner products with both gradients: it helps both objectives
    assert_close(float(new[0] @ torch.tensor([3.0, 0.0])), float(new[0] @ torch.tensor([-1.0, 1.0])), rtol=1e-6,
                 atol=0)


def test_pareto_rescales_each_tensor_to_its_summed_norm_only_when_shorter():
    # the same pair split into two tensors: n = (6/17) and (24/17); the sums are (2) and (1)
    new, _, w = pareto_combine([torch.tensor([3.0]), torch.tensor([0.0])], [torch.tensor([-1.0]), torch.tensor([1.0])],
                               gamma=2.0)
    assert_close(float(w), 5 / 17)
    assert_close(new[0], torch.tensor([2.0 * 2.0]))  # 6/17 < 2: raised to 2, boosted
    assert_close(new[1], torch.tensor([2.0 * 24 / 17]))  # 24/17 > 1: kept, boosted


def test_pareto_without_conflict_boosts_the_plain_sum():
    new, cos, w = pareto_combine([torch.tensor([1.0, 2.0])], [torch.tensor([1.0, 0.0])], gamma=1.5)
    assert_close(float(cos), 1 / math.sqrt(5))
    assert float(w) == 0.5 and torch.equal(new[0], torch.tensor([3.0, 3.0]))
    new, cos, _ = pareto_combine([torch.zeros(2)], [torch.tensor([1.0, 0.0])], gamma=1.0)  # a zero gradient
    assert float(cos) == 0.0 and torch.equal(new[0], torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("fusion", ["mmtm", "late_concat"])
def test_mmpareto_step_combines_each_encoders_gradients_and_leaves_the_rest(fusion):
    model = model_of(fusion)
    method = MMPareto(MMParetoSettings(mmpareto_gamma=1.5))
    out, y, before, logs = one_step(method, model)
    # the losses: CE of the fused prediction and of each partial logit
    fused = out["y0"] + out["y1"] if fusion != "mmtm" else (out["y0"] + out["y1"]) / 2
    assert_close(out["fused"], fused)
    names = {id(p): n for n, p in model.named_parameters()}
    for k in (0, 1):
        params = encoder_parameters(model, k)
        x0, x1, _ = batch()
        ref = model_of(fusion)  # the same weights: the uni-modal gradient of encoder k, by hand
        ref.load_state_dict(model.state_dict())
        y0_hat, y1_hat = ref(x0, x1)
        g_u = torch.autograd.grad(F.cross_entropy((y0_hat, y1_hat)[k], y), encoder_parameters(ref, k))
        g_t = [before[names[id(p)]] for p in params]
        want, cos, w = pareto_combine([t - u for t, u in zip(g_t, g_u)], list(g_u), 1.5, g_t)
        assert_close(float(logs[f"cos{k}"]), float(cos), rtol=1e-5, atol=1e-6)
        for p, g in zip(params, want):
            assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    encoders = {id(p) for k in (0, 1) for p in encoder_parameters(model, k)}
    for n, p in model.named_parameters():  # heads, MMTMs, the late-fusion layer: the summed loss's gradient
        if id(p) not in encoders and n in before:
            assert torch.equal(p.grad, before[n]), n


# --------------------------------------------------------------------------------------------------------------- OPM
def test_opm_scores_and_drop_probability_against_a_hand_computation():
    assert_close(prediction_scores(STRONG, FLAT, LABELS), torch.tensor([0.375, 0.25]))
    q0 = 0.5 * (1 + 0.5 * math.tanh(0.375 / 0.25 - 1))
    assert_close(drop_probabilities(0.375, 0.25, 0.5, 0.5), (q0, 0.0))
    assert_close(drop_probabilities(0.25, 0.375, 0.5, 0.5), (0.0, q0))  # m1 dominant: only m1 is dropped
    assert drop_probabilities(0.3, 0.3, 0.5, 0.5) == (0.0, 0.0)  # balanced: nothing dropped
    assert drop_probabilities(0.3, 0.0, 0.5, 0.5) == (0.75, 0.0)  # s1 = 0: tanh(inf) = 1
    assert drop_probabilities(0.9, 0.1, 0.9, 1.0) == (1.0, 0.0)  # clipped at 1
    assert drop_probabilities(float("nan"), 0.1, 0.5, 0.5) == (0.0, 0.0)


@pytest.mark.parametrize("scores, drop_mode", [((0.375, 0.25), FusionMode.REBALANCE_M1),
                                               ((0.25, 0.375), FusionMode.REBALANCE_M0)])
def test_opm_drops_the_dominant_modality_with_its_probability(scores, drop_mode):
    method = OPM(OPMSettings(opm_q_base=0.5, opm_lambda=0.5, opm_p_exe=0.7), seed=3)
    assert method.next_mode(step(epoch=0)) is FusionMode.FUSED  # warm-up: no draw
    twin = torch.Generator().manual_seed(3 * 1_000_003 + 4242)
    method.last_scores = scores
    p = 0.7 * 0.5 * (1 + 0.5 * math.tanh(0.375 / 0.25 - 1))
    modes = [method.next_mode(step(epoch=1)) for _ in range(200)]
    want = [drop_mode if float(torch.rand((), generator=twin)) < p else FusionMode.FUSED for _ in range(200)]
    assert modes == want and 0.3 < modes.count(drop_mode) / 200 < 0.6
    assert_close(method.p, p)


def test_opm_observes_regular_steps_only_and_resumes_its_stream():
    method = OPM(seed=1)
    method.observe(step(mode=FusionMode.FUSED), {"opm_s0": 0.4, "opm_s1": 0.2})
    method.observe(step(mode=FusionMode.REBALANCE_M1), {"opm_s0": 0.1, "opm_s1": 0.9})
    assert method.last_scores == (0.4, 0.2)
    method.next_mode(step(epoch=1))
    twin = OPM(seed=99)
    twin.load_state_dict(copy.deepcopy(method.state_dict()))
    assert twin.last_scores == (0.4, 0.2)
    assert [twin.next_mode(step(epoch=1)) for _ in range(20)] == [method.next_mode(step(epoch=1)) for _ in range(20)]


def test_opm_run_logs_follow_the_last_regular_steps_scores(tmp_path, toy_loaders):
    res = train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, "opm", max_epochs=3,
                                                        options={"opm_p_exe": 1.0, "opm_q_base": 0.7}))
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    last = None
    for s in steps:
        if s["epoch"] == 1:
            assert s["mode"] == "fused" and s["opm_p"] == 0.0
        elif last is not None:
            q = drop_probabilities(last["opm_s0"], last["opm_s1"], 0.7, 0.5)
            assert_close(s["opm_p"], max(q), rtol=1e-6, atol=1e-7)
            if s["mode"] != "fused":
                assert s["mode"] == ("rebalance_m1" if q[0] > 0 else "rebalance_m0")
        if s["mode"] == "fused":
            last = s
    assert any(s["mode"] != "fused" for s in steps)
    assert sum(e["rebalance_m0"] + e["rebalance_m1"] for e in res.history) == sum(s["mode"] != "fused" for s in steps)


# --------------------------------------------------------------------------------------------------------------- PMR
def test_pmr_coefficients():
    assert [float(b) for b in pmr_coefficients(torch.tensor(3.0), torch.tensor(2.0))] == [0.0, 0.5]
    assert [float(b) for b in pmr_coefficients(torch.tensor(1.0), torch.tensor(4.0))] == [1.0, 0.0]  # clipped
    assert [float(b) for b in pmr_coefficients(torch.tensor(2.0), torch.tensor(2.0))] == [0.0, 0.0]
    assert [float(b) for b in pmr_coefficients(torch.tensor(0.0), torch.tensor(0.0))] == [0.0, 0.0]


def test_pmr_loss_against_a_hand_computation():
    # K = 2, F = 1. m0: prototypes 0, 2, features 0, 2 (labels 0, 1): logits (0, -2), (-2, 0), p(y) = 1/(1+e^-2).
    # m1: prototypes 0, 1, features 1, 0: logits (-1, 0), (0, -1), p(y) = e^-1/(1+e^-1). m0 leads by far: b1 = 1.
    method = PMR(PMRSettings(pmr_alpha=2.0, pmr_mu=0.5, pmr_per_epochs=1))
    method.prototypes = [torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [1.0]])]
    method.since = 1
    y = torch.tensor([0, 1])
    out = {"y0": torch.zeros(2, 2), "y1": torch.zeros(2, 2), "e0": torch.tensor([[0.0], [2.0]]),
           "e1": torch.tensor([[1.0], [0.0]])}
    loss, terms = method.loss(out, y, step(epoch=1))
    p0, p1 = 1 / (1 + math.exp(-2)), math.exp(-1) / (1 + math.exp(-1))
    assert (float(terms["pmr_b0"]), float(terms["pmr_b1"])) == (0.0, 1.0)  # rho = 2 p0 / 2 p1 = 3.27 > 2
    assert_close(float(terms["pce0"]), -math.log(p0))
    assert_close(float(terms["pce1"]), -math.log(p1))
    per0 = -(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0))
    assert_close(float(terms["per0"]), per0)
    base = 2 * math.log(2)  # CE of the zero logits of both branches
    assert_close(float(loss), base + 2.0 * 1.0 * -math.log(p1) - 0.5 * 1.0 * per0)
    _, late = method.loss(out, y, step(epoch=2))  # past the PER epochs: no entropy term
    assert float(late["per0"]) == 0.0
    assert_close(prototype_logits(out["e1"], method.prototypes[1]), torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))
    assert_close(prototype_entropy(torch.zeros(3, 4)), torch.tensor(math.log(4)))


def test_pmr_coefficients_carry_no_gradient():
    # m1's prototype score 2 / (1 + e^-0.4) against m0's 2 / (1 + e^-2): rho = 1.47, b1 = 0.47, not saturated
    method = PMR(PMRSettings(pmr_alpha=2.0, pmr_mu=0.5))
    method.prototypes, method.since = [torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [1.0]])], 1
    y = torch.tensor([0, 1])
    e0, e1 = torch.tensor([[0.0], [2.0]], requires_grad=True), torch.tensor([[0.3], [0.7]], requires_grad=True)
    out = {"y0": torch.zeros(2, 2), "y1": torch.zeros(2, 2), "e0": e0, "e1": e1}
    loss, terms = method.loss(out, y, step(epoch=1))
    b1 = float(terms["pmr_b1"])
    assert 0.4 < b1 < 0.5 and float(terms["pmr_b0"]) == 0.0
    loss.backward()
    f0, f1 = e0.detach().requires_grad_(), e1.detach().requires_grad_()
    want = (2.0 * b1 * F.cross_entropy(prototype_logits(f1, method.prototypes[1]), y)
            - 0.5 * b1 * prototype_entropy(prototype_logits(f0, method.prototypes[0])))
    want.backward()
    assert_close(e0.grad, f0.grad) and assert_close(e1.grad, f1.grad)


def test_pmr_prototypes_are_the_last_epochs_class_means():
    method = PMR(PMRSettings(pmr_momentum=0.25))
    y = torch.tensor([0, 1, 0])
    out = {"y0": torch.zeros(3, 3), "y1": torch.zeros(3, 3), "e0": torch.tensor([[1.0], [2.0], [3.0]]),
           "e1": torch.tensor([[0.0, 1.0], [4.0, 4.0], [2.0, 1.0]])}
    _, terms = method.loss(out, y, step(epoch=0))
    assert float(terms["pce0"]) == 0.0 and method.prototypes is None  # none before an epoch ends
    method.end_epoch({}, step(epoch=0))
    assert_close(method.prototypes[0], torch.tensor([[2.0], [2.0], [0.0]]))  # class 2 unseen: 0 at first
    assert_close(method.prototypes[1], torch.tensor([[1.0, 1.0], [4.0, 4.0], [0.0, 0.0]]))
    assert method.since == 1
    out2 = dict(out, e0=torch.tensor([[5.0], [6.0], [7.0]]))
    method.loss(out2, torch.tensor([2, 1, 1]), step(epoch=1))
    method.end_epoch({}, step(epoch=1))
    # new means: class 1 -> 6.5, class 2 -> 5, class 0 absent (keeps 2); blended 0.75 new + 0.25 old
    assert_close(method.prototypes[0], torch.tensor([[2.0], [0.75 * 6.5 + 0.25 * 2.0], [0.75 * 5.0]]))


# --------------------------------------------------------------------------------------------------------------- AGM
class Mean:
    predict = staticmethod(lambda a, b: (a + b) / 2)


class Sum:
    predict = staticmethod(lambda a, b: a + b)


def test_shapley_responses():
    y0, y1, a0, a1 = (torch.full((1, 2), v) for v in (4.0, 2.0, 3.0, 1.0))
    phi0, phi1 = shapley_responses(Mean(), y0, y1, a0, a1)
    # v01 = 3, v0 = 3/2, v1 = 1/2: phi0 = ((3 - 1/2) + 3/2) / 2 = 2, phi1 = ((3 - 3/2) + 1/2) / 2 = 1
    assert_close(phi0, torch.full((1, 2), 2.0)) and assert_close(phi1, torch.full((1, 2), 1.0))
    phi0, phi1 = shapley_responses(Sum(), y0, y1, y0, y1)  # late fusion: the partial logits themselves
    assert torch.equal(phi0, y0) and torch.equal(phi1, y1)


def test_agm_scores_and_coefficients_against_a_hand_computation():
    assert_close(response_scores(FLAT, STRONG, LABELS),
                 torch.tensor([math.log(4), -(math.log(0.5) + math.log(0.25)) / 2], dtype=torch.float64))
    dead = torch.tensor([[-200.0, 0.0, 0.0, 0.0]])  # p(y) underflows: floored at 1e-8
    assert_close(float(response_scores(dead, dead, LABELS[:1])[0]), -math.log(1e-8))
    alpha = 0.3
    kappa = agm_coefficients(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                             alpha)
    # r0 = e^(2 - 1), eta0 = 1: m0 leads more than on average, its gradient shrinks; m1's grows
    assert_close(kappa, torch.tensor([math.exp(alpha * (1 - math.e)), math.exp(alpha * (1 - 1 / math.e))],
                                     dtype=torch.float64))
    capped = agm_coefficients(torch.zeros(2, dtype=torch.float64), torch.tensor([0.0, 20.0], dtype=torch.float64), 1.0)
    assert_close(float(capped[0]), math.exp(10.0))  # eta0 - r0 = e^20 - 1, capped at 10


@pytest.mark.parametrize("fusion", ["mmtm", "late_concat"])
def test_agm_step_scales_each_encoders_weights_by_its_kappa(fusion):
    model = model_of(fusion)
    method = AGM(AGMSettings(agm_alpha=0.5))
    method.s_avg = torch.tensor([1.2, 1.5], dtype=torch.float64)
    out, y, before, logs = one_step(method, model, step(n=3))
    s = response_scores(out["phi0"], out["phi1"], y)
    assert_close([float(logs["agm_s0"]), float(logs["agm_s1"])], s.tolist())
    kappa = agm_coefficients(s, torch.tensor([1.2, 1.5], dtype=torch.float64), 0.5)
    assert_close([float(logs["agm_k0"]), float(logs["agm_k1"])], kappa.tolist())
    scaled = {id(p): k for k in (0, 1) for p in encoder_parameters(model, k) if p.dim() >= 2}
    for n, p in model.named_parameters():
        if id(p) in scaled:
            assert_close(p.grad, before[n] * float(kappa[scaled[id(p)]]), rtol=1e-6, atol=0)
        elif n in before:
            assert torch.equal(p.grad, before[n]), n  # biases, norms, heads, fusion: untouched
    assert_close(method.s_avg, torch.tensor([1.2, 1.5], dtype=torch.float64) * 2 / 3 + s / 3)
    if fusion != "mmtm":
        assert torch.equal(out["phi0"], out["y0"].detach())


# ------------------------------------------------------------------------------------------------ through the trainer
def group_mu(model):
    """mu of each CLS group from the model's current gradients, by hand."""
    groups, mu = model.cls_groups(), {}
    for g in CLS_GROUPS:
        grad = sum(float((p.grad.double() ** 2).sum()) for p in groups[g] if p.grad is not None)
        mu[g] = grad / sum(float((p.detach().double() ** 2).sum()) for p in groups[g])
    return mu


@pytest.mark.parametrize("algorithm", ["mmpareto", "agm"])
def test_the_cls_is_measured_before_the_modulation(tmp_path, toy_loaders, algorithm):
    seen = []
    cls = get_method(algorithm)

    class Spied(cls):
        def forward(self, model, x0, x1, ctx):
            self.inputs = (x0, x1)
            return super().forward(model, x0, x1, ctx)

        def after_backward(self, model, out, y, ctx):
            ref = copy.deepcopy(model)  # the same weights: the gradients of the plain loss, with no edit
            ref.zero_grad(set_to_none=True)
            self.loss(self.forward(ref, *self.inputs, ctx), y, ctx)[0].backward()
            logs = super().after_backward(model, out, y, ctx)
            seen.append((group_mu(ref), group_mu(model)))
            return logs

    settings = cls.Settings(**({"agm_alpha": 1.0} if algorithm == "agm" else {}))
    res = train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, algorithm), method=Spied(settings))
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    assert len(steps) == len(seen)
    for s, (plain, _) in zip(steps, seen):
        assert_close([s[f"mu_{g}"] for g in CLS_GROUPS], [plain[g] for g in CLS_GROUPS], rtol=1e-5, atol=0)
    assert any(abs(edited["m0"] - plain["m0"]) > 1e-3 * plain["m0"] for plain, edited in seen)  # it did modulate


@pytest.mark.parametrize("algorithm, fusion", [(a, "mmtm") for a in FIELD] + [("mmpareto", "late_concat"),
                                                                               ("opm", "late_concat"),
                                                                               ("pmr", "late_concat"),
                                                                               ("agm", "late_concat")])
def test_resume_mid_run_is_exact(tmp_path, algorithm, fusion):
    options = {"opm_p_exe": 1.0, "agm_alpha": 0.5}

    def run(folder, ckpt_every=None, steps=16, model=None):
        return train(model or model_of(fusion), ToyLoader(), make_cfg(tmp_path / folder, algorithm, fusion, options,
                                                                      max_steps=steps, max_epochs=10,
                                                                      ckpt_every_steps=ckpt_every),
                     ToyLoader(24, seed=1))

    res_a = run("a")
    first = run("b", ckpt_every=5, steps=8)  # 6 batches per epoch: stopped in epoch 2
    assert first.steps == 8 and first.stop_reason == "max_steps"
    torch.manual_seed(123)  # other global RNG state: the checkpoint restores it
    res_b = run("b", model=model_of(fusion))
    assert res_b.resumed_from_step == 8
    model_a, model_b = (load_checkpoint(r.last_path)["model"] for r in (res_a, res_b))
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    assert (res_a.log_dir / "steps.jsonl").read_text() == (res_b.log_dir / "steps.jsonl").read_text()


@pytest.mark.parametrize("fusion", ["mmtm", "late_concat"])
@pytest.mark.parametrize("algorithm", FIELD)
def test_two_epochs_on_both_fusions_are_finite(tmp_path, toy_loaders, algorithm, fusion):
    train_l, val, test = toy_loaders
    res = train(model_of(fusion), train_l, make_cfg(tmp_path, algorithm, fusion), val, test, device="cpu")
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    assert len(res.history) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert all(math.isfinite(s["d_speed"]) for s in steps if s["mode"] == "fused")
    assert all(math.isfinite(res.history[-1][k]) for k in ("val_acc", "test_acc", "d_speed"))


def test_the_field_is_registered_after_the_papers_rows():
    names = method_names()
    assert names[-4:] == list(FIELD)
    for name in FIELD:
        cls = get_method(name)
        assert cls.multimodal and not cls.paper_row and cls.label and cls.sweeps
        assert 2 <= len(cls.sweeps[0].grid("digits")) <= 4
    colors = [get_method(n).color for n in names]
    assert len(set(colors)) == len(colors)  # one colour per method in the figures


@pytest.mark.parametrize("algorithm, options, message", [
    ("mmpareto", {"mmpareto_gamma": 0.0}, "mmpareto_gamma=0.0"),
    ("opm", {"opm_q_base": 1.5}, "opm_q_base=1.5"),
    ("opm", {"warmup_epochs": 0}, "warmup_epochs=0"),
    ("pmr", {"pmr_momentum": 1.0}, "pmr_momentum=1.0"),
    ("agm", {"agm_alpha": -1.0}, "agm_alpha=-1.0"),
])
def test_bad_settings_are_refused(algorithm, options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(algorithm=algorithm, options=options).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fusion", ["mmtm", "late_concat"])
@pytest.mark.parametrize("algorithm", FIELD)
def test_cuda_step_synchronises_once(tmp_path, toy_loaders, algorithm, fusion):
    from greedymm.training import Trainer

    trainer = Trainer(model_of(fusion), toy_loaders[0], make_cfg(tmp_path, algorithm, fusion,
                                                                 {"opm_p_exe": 1.0, "warmup_epochs": 1}),
                      device="cuda")
    trainer.logs.files = {"steps": io.StringIO()}
    batches = [tuple(t.cuda() for t in b) for b in toy_loaders[0]]
    for b in batches:  # past the first epoch: OPM's drops, PMR's prototypes
        trainer._train_step(*b)
    trainer.method.end_epoch({}, StepContext(0, trainer.step, 0, FusionMode.FUSED, None))
    trainer.epoch = 1
    trainer._train_step(*batches[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer._train_step(*batches[1])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
