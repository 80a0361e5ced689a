"""The modality measures of SPEC Sec. 13 for any fusion: Shapley contributions, linear probes and robustness curves
against hand computations, the macro-F1 of `evaluate`, and the measures in a run's results record."""
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from custom_branches import CUR_TEST as TEST, CUR_TRAIN as TRAIN, TensorLoader, identity_net
from greedymm.measures import compute_cut_means, evaluate
from greedymm.measures.contribution import (coalition_values, fit_probe, input_std, linear_probes,
                                            modality_measures, robustness_curves, shapley_contribution,
                                            shapley_values)
from greedymm.measures.evaluate import macro_f1
from greedymm.models import final_linear, mmtm_convnet


def loaders():
    return TensorLoader(TRAIN, batch_size=2, shuffle=False), TensorLoader(TEST, batch_size=2, shuffle=False)


def test_shapley_values_by_hand():
    r = shapley_values(v01=0.9, v0=0.7, v1=0.4, v_none=0.1)
    assert_close(r["shapley0"], 0.55)  # ((0.9 - 0.4) + (0.7 - 0.1)) / 2
    assert_close(r["shapley1"], 0.25)  # ((0.9 - 0.7) + (0.4 - 0.1)) / 2
    assert_close(r["shapley0"] + r["shapley1"], 0.9 - 0.1)


def test_late_fusion_shapley_on_a_model_whose_accuracies_are_known():
    """v01 = 1, v0 = A(z | e1 := -2) = 1/5, v1 = A(z | e0 := 2) = 4/5 (see the CUR test); v({}): z = [0, 0] for
    every sample, argmax 0, correct for the two class-0 samples: 2/5. phi0 = ((1 - 4/5) + (1/5 - 2/5)) / 2 = 0,
    phi1 = ((1 - 1/5) + (4/5 - 2/5)) / 2 = 0.6."""
    net = identity_net([-1.0, 1.0], [-1.0, 1.0], [0.0, 0.0])
    res = shapley_contribution(net, *loaders())
    assert_close([res[k] for k in ("v01", "v0", "v1", "v_none")], [1.0, 0.2, 0.8, 0.4])
    assert_close(res["shapley0"], 0.0)
    assert_close(res["shapley1"], 0.6)


def test_mmtm_coalitions_cut_the_modality_in_the_fusion_and_its_branch(tiny_model, toy_loaders):
    train, _, test = toy_loaders
    tiny_model.train()
    for x0, x1, _ in train:
        tiny_model(x0, x1)
    train.augment = False
    v = coalition_values(tiny_model, train, test)
    tiny_model.eval()
    with torch.no_grad():
        e = [tiny_model(b[0], b[1], "fused", return_features=True)[2] for b in train]
        mean0 = torch.cat([f[0] for f in e]).mean(0)
        mean1 = torch.cat([f[1] for f in e]).mean(0)
        h0, h1 = final_linear(tiny_model.branch0), final_linear(tiny_model.branch1)
        x0, x1, y = (torch.cat([b[i] for b in test]) for i in range(3))
        y0, y1 = tiny_model(x0, x1, "fused")
        k0, k1 = tiny_model(x0, x1, "cut")
    acc = lambda out: (out.argmax(1) == y).double().mean().item()
    assert_close(v["v01"], acc((y0 + y1) / 2))
    assert_close(v["v0"], acc((k0 + h1(mean1)) / 2))  # m1 cut: in the MMTMs and in branch 1's features
    assert_close(v["v1"], acc((h0(mean0) + k1) / 2))
    assert_close(v["v_none"], acc((h0(mean0) + h1(mean1)).expand(len(y), -1) / 2))


def test_probe_on_separable_and_on_uninformative_features():
    g = np.random.default_rng(0)
    y = np.arange(60) % 3
    separable = np.eye(3)[y] * 5 + g.normal(0, 0.1, (60, 3))  # class k: a bump in feature k
    assert fit_probe(separable[:30], y[:30], separable[30:], y[30:]) == 1.0
    noise = g.normal(0, 1, (60, 3))
    assert fit_probe(noise[:30], y[:30], noise[30:], y[30:]) < 0.7
    assert fit_probe(noise[:30], y[:30], noise[30:], y[30:], seed=0) == fit_probe(noise[:30], y[:30], noise[30:],
                                                                                   y[30:], seed=0)


def test_linear_probes_read_each_encoders_features():
    """e0 = x0 separates the classes by sign; e1 = x1 is noise independent of the label."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x0 = (y.float() * 2 - 1)[:, None] * (1 + torch.rand(40, 1, generator=g))
    x1 = torch.randn(40, 1, generator=g)
    net = identity_net([-1.0, 1.0], [0.0, 0.0], [0.0, 0.0])
    train = TensorLoader((x0[:20], x1[:20], y[:20]), batch_size=8, shuffle=False)
    test = TensorLoader((x0[20:], x1[20:], y[20:]), batch_size=8, shuffle=False)
    res = linear_probes(net, train, test)
    assert res["probe0"] == 1.0
    assert res["probe1"] < 0.8


def test_input_std_by_hand():
    x0 = torch.tensor([[1.0, 3.0], [5.0, 7.0]])  # mean 4, variance (9 + 1 + 1 + 9) / 4 = 5
    x1 = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    s0, s1 = input_std(TensorLoader((x0, x1, torch.tensor([0, 1])), batch_size=1, shuffle=False))
    assert_close(s0, math.sqrt(5.0))
    assert s1 == 0.0


def test_robustness_curve_starts_at_the_fused_accuracy_and_ends_with_the_cut():
    net = identity_net([-1.0, 1.0], [-1.0, 1.0], [0.0, 0.0])
    train, test = loaders()
    res = robustness_curves(net, train, test)
    assert res["robust_sigmas"] == [0.0, 0.25, 0.5, 1.0, 2.0, "cut"]
    assert_close(res["robust0"][0], evaluate(net, test)["acc"])  # sigma = 0: the fused accuracy (1.0)
    assert_close(res["robust0"][-1], 0.8)  # m0 cut: v({1})
    assert_close(res["robust1"][-1], 0.2)  # m1 cut: v({0})
    assert len(res["robust0"]) == len(res["robust1"]) == 6
    assert res == robustness_curves(net, *loaders())  # seeded noise
    # m1 has std 0 over D_train (both -2): its noise is 0 at every sigma, the fused accuracy stays.
    assert res["robust1"][:5] == [1.0] * 5
    # A large noise on m0 (std 1 over D_train) changes predictions.
    big = robustness_curves(net, train, test, sigmas=(0.0, 50.0))
    assert big["robust0"][1] < 1.0


def test_macro_f1_by_hand():
    # labels 0, 0, 1, 2; predictions 0, 1, 1, 1: class 0: TP 1, FN 1 -> 2/3; class 1: TP 1, FP 2 -> 2/4;
    # class 2: TP 0, FN 1 -> 0; macro = (2/3 + 1/2 + 0) / 3.
    conf = torch.zeros(1, 3, 3, dtype=torch.float64)
    for t, p in ((0, 0), (0, 1), (1, 1), (2, 1)):
        conf[0, t, p] += 1
    assert_close(macro_f1(conf)[0], (2 / 3 + 1 / 2) / 3)
    # A class that is neither a label nor a prediction is left out: labels 0, 1 predicted right.
    conf = torch.zeros(1, 3, 3, dtype=torch.float64)
    conf[0, 0, 0] = conf[0, 1, 1] = 1
    assert macro_f1(conf)[0] == 1.0


def test_evaluate_reports_macro_f1_per_head():
    net = identity_net([-1.0, 1.0], [-1.0, 1.0], [0.0, 0.0])
    res = evaluate(net, loaders()[1])
    assert res["f1"] == 1.0  # all 5 right
    # z0 = [-x0, x0]: predictions 1, 0, 1, 0, 1 for labels 1, 1, 1, 0, 0:
    # class 0: TP 1, FP 1, FN 1 -> 1/2; class 1: TP 2, FP 1, FN 1 -> 4/6; macro 7/12.
    assert_close(res["f1_0"], (1 / 2 + 2 / 3) / 2)


def test_modality_measures_work_on_mmtm(tiny_model, toy_loaders):
    train, _, test = toy_loaders
    train.augment = False
    res = modality_measures(tiny_model, train, test)
    for k in ("shapley0", "shapley1", "probe0", "probe1"):
        assert math.isfinite(res[k])
    assert_close(res["shapley0"] + res["shapley1"], res["v01"] - res["v_none"])
    assert_close(res["robust0"][0], res["v01"])


def test_modality_measures_are_the_three_calls():
    net = identity_net([-1.0, 1.0], [-1.0, 1.0], [0.0, 0.0])
    res = modality_measures(net, *loaders())
    assert_close([res["shapley0"], res["shapley1"]], [0.0, 0.6])
    assert res["probe0"] == linear_probes(net, *loaders())["probe0"]
    assert res["robust0"] == robustness_curves(net, *loaders())["robust0"]
