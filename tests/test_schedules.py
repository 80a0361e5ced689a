"""Conditional learning speed and the guided / random schedules (SPEC Sec. 4-5)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from greedymm.measures import CLSTracker
from greedymm.methods import Method, RebalancingSettings, StepContext, make_method
from greedymm.methods.guided import Guided, GuidedSettings
from greedymm.methods.random import Random
from greedymm.models import FusionMode

M0, M1, FUSED = FusionMode.REBALANCE_M0, FusionMode.REBALANCE_M1, FusionMode.FUSED


def hand_mu(params):
    """sum ||grad||^2 / sum ||p||^2 with plain Python loops (grad None counts as 0)."""
    g = sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None)
    w = sum(float((p.detach().double() ** 2).sum()) for p in params)
    return g / w


def test_cls_matches_hand_computation_over_steps(tiny_model, toy_loaders):
    groups = tiny_model.cls_groups()
    tracker = CLSTracker(groups)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    modes = [FUSED, FUSED, M0, FUSED, M1]
    sums = {k: 0.0 for k in groups}
    for mode, (x0, x1, y) in zip(modes, toy_loaders[0]):
        y0, y1 = tiny_model(x0, x1, mode)
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(y0, y) + F.cross_entropy(y1, y)).backward()
        mu = tracker.compute_mu()
        expected = {k: hand_mu(ps) for k, ps in groups.items()}
        assert_close(mu, torch.tensor([expected[k] for k in ("m0", "m1", "m0_prime", "m1_prime")],
                                      dtype=torch.float64))
        if mode is FUSED:  # re-balancing steps are logged but not accumulated
            sums = {k: sums[k] + expected[k] for k in sums}
        speeds = tracker.update(mu, regular=mode is FUSED)
        s10 = math.log10(sums["m0_prime"] / sums["m0"])
        s01 = math.log10(sums["m1_prime"] / sums["m1"])
        assert_close(speeds, torch.tensor([s10, s01, s10 - s01], dtype=torch.float64))
        opt.step()
    assert mu[2] > 0  # in re-balance m1 W_A still has gradients


def test_cls_treats_missing_gradients_as_zero(tiny_model, toy_loaders):
    x0, x1, y = next(iter(toy_loaders[0]))
    tiny_model(x0, x1)  # fills the running means
    y0, y1 = tiny_model(x0, x1, M0)  # W_A unused: no gradient
    (F.cross_entropy(y0, y) + F.cross_entropy(y1, y)).backward()
    groups = tiny_model.cls_groups()
    assert any(p.grad is None for p in groups["m0_prime"])
    mu = CLSTracker(groups).compute_mu()
    assert_close(mu[2].item(), hand_mu(groups["m0_prime"]))


def test_cls_rejects_empty_groups(tiny_model):
    groups = tiny_model.cls_groups()
    groups["m1_prime"] = []
    with pytest.raises(ValueError, match="m1_prime"):
        CLSTracker(groups)


def step(epoch, mode=FUSED):
    return StepContext(epoch=epoch, step=1, batch=0, mode=mode, steps_per_epoch=None)


def guided(epsilon, window, warmup_epochs=1):
    return Guided(GuidedSettings(epsilon=epsilon, window=window, warmup_epochs=warmup_epochs))


def run_schedule(method, d_speeds, epochs):
    """Drive a method's schedule: before each step ask the mode, after it report d_speed (scripted per step)."""
    modes = []
    for epoch, d in zip(epochs, d_speeds):
        ctx = step(epoch)
        ctx.mode = method.next_mode(ctx)
        modes.append(ctx.mode)
        method.observe(ctx, {"d_speed": d})
    return modes


def test_guided_schedule_follows_algorithm_1():
    s = guided(epsilon=0.1, window=3, warmup_epochs=1)
    d = [0.5, 0.5, 0.05,  # warm-up epoch 0: never re-balance, whatever d_speed is
         0.05, 0.2, 9, 9, 9, -0.3, -9, -9, -9, 0.0, 0.1, -0.1, 0.11, 9, 9, 9, 0.0]
    epochs = [0] * 3 + [1] * (len(d) - 3)
    got = run_schedule(s, d, epochs)
    want = [FUSED, FUSED, FUSED,
            FUSED,  # last warm-up d = 0.05 <= eps
            FUSED,  # previous regular d = 0.05
            M0, M0, M0,  # d = 0.2 > eps -> window of W=3 for m0; the d_speeds inside it are ignored
            FUSED,  # regular step after the window (d = -0.3 reported after it)
            M1, M1, M1,  # d = -0.3 < -eps -> m1
            FUSED, FUSED,  # d = 0.0, then |0.1| is not > eps
            FUSED, FUSED,  # |-0.1| not > eps; d = 0.11 reported after this step
            M0, M0, M0, FUSED]
    assert got == want


def test_guided_checks_last_warmup_step_and_ignores_nan():
    s = guided(epsilon=0.01, window=2, warmup_epochs=1)
    assert run_schedule(s, [float("nan"), -0.5, 0, 0, 0], [0, 0, 1, 1, 1]) == [FUSED, FUSED, M1, M1, FUSED]
    s = guided(epsilon=0.01, window=2, warmup_epochs=0)
    assert run_schedule(s, [float("nan"), 0.0], [0, 0]) == [FUSED, FUSED]


def test_guided_state_round_trip_continues_a_window():
    a = guided(0.01, 5)
    run_schedule(a, [1.0, 0, 0], [1, 1, 1])  # inside an m0 window, 2 steps in
    b = guided(0.01, 5)
    b.load_state_dict(a.state_dict())
    assert run_schedule(a, [0] * 5, [1] * 5) == run_schedule(b, [0] * 5, [1] * 5) == [M0, M0, M0, FUSED, FUSED]


def test_random_schedule_is_uniform_deterministic_and_resumable():
    s = Random(RebalancingSettings(warmup_epochs=1), seed=3)
    assert [s.next_mode(step(0)) for _ in range(10)] == [FUSED] * 10
    draws = [s.next_mode(step(1)) for _ in range(3000)]
    for m in (FUSED, M0, M1):
        assert abs(draws.count(m) / 3000 - 1 / 3) < 0.03
    again = Random(RebalancingSettings(warmup_epochs=1), seed=3)
    assert [again.next_mode(step(1)) for _ in range(100)] == draws[:100]
    state = s.state_dict()
    resumed = Random(RebalancingSettings(warmup_epochs=1), seed=99)
    resumed.load_state_dict(state)
    assert [resumed.next_mode(step(1)) for _ in range(50)] == [s.next_mode(step(1)) for _ in range(50)]


def test_make_method():
    for name in ("vanilla", "rubi", "ogm_ge", "gblend", "unimodal_m0"):  # every other method: regular steps only
        assert type(make_method(name)).next_mode is Method.next_mode and not make_method(name).rebalancing
    assert isinstance(make_method("guided"), Guided)
    assert isinstance(make_method("random"), Random)
    made = make_method("guided", {"epsilon": 0.3, "ogm_alpha": 0.9, "warmup_epochs": 2}, seed=4)
    assert (made.epsilon, made.window, made.warmup_epochs, made.seed) == (0.3, 5, 2, 4)  # another's setting: unread
    with pytest.raises(ValueError, match="epsilon"):
        guided(-1, 5)
    with pytest.raises(ValueError, match="window"):
        guided(0.1, 0)
