"""The conditional utilization rate and d_util (SPEC Sec. 7)."""
import math

import pytest
import torch
from torch.testing import assert_close

from greedymm.measures.cur import compute_squeeze_means, conditional_utilization, utilization_rates


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
    assert_close(res["d_util"], u10 - u01)
    assert -1 <= res["d_util"] <= 1


def test_squeeze_means_refuse_an_augmenting_loader(tiny_model, toy_loaders):
    loader = toy_loaders[0]
    loader.augment = True
    with pytest.raises(ValueError, match="without augmentation"):
        compute_squeeze_means(tiny_model, loader)
