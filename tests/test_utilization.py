"""The conditional utilization rate and d_util (SPEC Sec. 7)."""
import math

import pytest
import torch
from torch.testing import assert_close

from greedymm.measures.cur import (chance_level, compute_squeeze_means, conditional_utilization, undefined_reason,
                                   utilization_rates)


def test_utilization_rates_by_hand():
    r = utilization_rates(acc0=0.8, acc1=0.5, acc0_cut=0.6, acc1_cut=0.5)
    assert_close(r["u_m1_m0"], 0.25)  # (0.8 - 0.6) / 0.8
    assert_close(r["u_m0_m1"], 0.0)
    assert_close(r["d_util"], 0.25)
    r = utilization_rates(0.5, 0.9, 0.5, 0.0)
    assert_close(r["d_util"], -1.0)  # branch 1 entirely relies on m0
    assert math.isnan(utilization_rates(0.0, 0.5, 0.0, 0.5)["u_m1_m0"])


def test_conditional_utilization_against_manual_evaluation(tiny_model, toy_loaders):
    train, _, test = toy_loaders
    tiny_model.train()
    for x0, x1, _ in train:  # fill BN statistics and running means
        tiny_model(x0, x1)
    train.augment = False
    res = conditional_utilization(tiny_model, train, test)
    x0 = torch.cat([b[0] for b in test])
    x1 = torch.cat([b[1] for b in test])
    y = torch.cat([b[2] for b in test])
    tiny_model.eval()
    with torch.no_grad():
        y0, y1 = tiny_model(x0, x1, "fused")
        c0, c1 = tiny_model(x0, x1, "cut")
    acc = lambda out: (out.argmax(1) == y).float().mean().item()
    assert_close(res["acc"], acc((y0 + y1) / 2))
    assert_close(res["acc0"], acc(y0))
    assert_close(res["acc1"], acc(y1))
    assert_close(res["acc0_cut"], acc(c0))
    assert_close(res["acc1_cut"], acc(c1))
    u10 = (acc(y0) - acc(c0)) / acc(y0)
    u01 = (acc(y1) - acc(c1)) / acc(y1)
    assert_close(res["u_m1_m0"], u10)
    assert_close(res["u_m0_m1"], u01)
    level = 0.25 + 2 * math.sqrt(0.25 * 0.75 / 24)  # 4 classes, 24 test samples
    assert_close(res["chance"], level)
    if acc(y0) > level and acc(y1) > level and res["fusion_spread"] >= 1e-2:
        assert res["d_util_undefined"] == "" and -1 <= res["d_util"] <= 1
        assert_close(res["d_util"], u10 - u01)
    else:  # an untrained head at chance: d_util has no meaning
        assert res["d_util_undefined"] and math.isnan(res["d_util"])


def test_squeeze_means_refuse_an_augmenting_loader(tiny_model, toy_loaders):
    loader = toy_loaders[0]
    loader.augment = True
    with pytest.raises(ValueError, match="without augmentation"):
        compute_squeeze_means(tiny_model, loader)


def test_chance_level_by_hand():
    assert_close(chance_level(10, 100), 0.1 + 2 * math.sqrt(0.1 * 0.9 / 100))  # 0.16
    assert_close(chance_level(6, 240), 1 / 6 + 2 * math.sqrt((1 / 6) * (5 / 6) / 240))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        chance_level(1, 10)


@pytest.mark.parametrize("acc0, acc1, spread, expected", [
    (0.9, 0.8, 0.3, []),  # both heads learnt, a live fusion: defined
    (0.9, 0.15, 0.3, ["branch 1 at chance"]),
    (0.1, 0.8, 0.3, ["branch 0 at chance"]),
    (0.9, 0.8, 1e-4, ["fusion collapsed"]),
    (0.9, 0.8, None, []),  # no spread given: only the heads are checked
    (0.1, 0.1, 0.0, ["fusion collapsed", "branch 0 at chance", "branch 1 at chance"]),
])
def test_undefined_reasons(acc0, acc1, spread, expected):
    reason = undefined_reason(acc0, acc1, num_classes=10, n=100, spread=spread)  # chance level 0.16
    parts = [r for r in reason.split("; ") if r]
    assert [p.split(":")[0] for p in parts] == expected


def test_a_head_just_above_the_chance_level_counts():
    level = chance_level(10, 100)
    assert undefined_reason(level + 1e-9, 0.9, 10, 100) == ""
    assert "branch 0 at chance" in undefined_reason(level, 0.9, 10, 100)


def test_collapsed_fusion_makes_d_util_undefined(tiny_model, toy_loaders):
    """A fusion whose excitation weights are zero gives the same scales to every sample: cutting it changes nothing,
    so both u are 0, and d_util must be marked undefined (not reported as 0, "balanced")."""
    train, _, test = toy_loaders
    train.augment = False
    with torch.no_grad():
        for m in tiny_model.mmtms.values():
            m.fc_a.weight.zero_()
            m.fc_b.weight.zero_()
    res = conditional_utilization(tiny_model, train, test)
    assert res["fusion_spread"] < 1e-6
    assert res["u_m1_m0"] == 0 and res["u_m0_m1"] == 0  # measured, and empty
    assert "fusion collapsed" in res["d_util_undefined"] and math.isnan(res["d_util"])


def test_fusion_spread_is_the_largest_std_of_a_scale(tiny_model, toy_loaders):
    train, _, test = toy_loaders
    train.augment = False
    res = conditional_utilization(tiny_model, train, test)
    x0 = torch.cat([b[0] for b in test])
    x1 = torch.cat([b[1] for b in test])
    scales = []
    hooks = [m.register_forward_hook(lambda mod, args, out: scales.append(
        torch.cat([torch.sigmoid(mod.fc_a(mod._excite(args[0].mean((2, 3)), args[1].mean((2, 3))))),
                   torch.sigmoid(mod.fc_b(mod._excite(args[0].mean((2, 3)), args[1].mean((2, 3)))))], 1)))
             for m in tiny_model.mmtms.values()]
    tiny_model.eval()
    with torch.no_grad():
        tiny_model(x0, x1, "fused")
    for h in hooks:
        h.remove()
    expected = max(float(s.double().std(0, unbiased=False).max()) for s in scales)
    assert_close(res["fusion_spread"], expected, rtol=1e-6, atol=1e-9)
