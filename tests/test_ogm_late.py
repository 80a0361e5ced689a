"""OGM-GE in its home architecture (SPEC Sec. 12-13): on a late_concat model the scores come from the split head's
partial logits W0 e0 + b/2, W1 e1 + b/2, the loss is the fused CE(z) alone, and only the dominant encoder's
convolution gradients are scaled (the head, the norms and the other encoder untouched), as in the official code."""
import math

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from greedymm.methods import StepContext
from greedymm.methods.ogm_ge import OGMGE, OGMSettings, ogm_coefficients
from greedymm.models import FusionMode, as_fusion, mmtm_convnet


def late_model():
    torch.manual_seed(0)
    return as_fusion(mmtm_convnet(3, widths=(4, 8)), "late_concat")


def test_ogm_on_late_concat_uses_the_partial_logits_and_the_fused_loss_and_scales_the_dominant_encoder():
    model = late_model()
    alg = OGMGE(OGMSettings(ogm_alpha=0.5), seed=0, noise=False)
    alg.setup(model)
    assert [id(p) for p in alg.modulated[0]] == [id(model.encoder0.stage1[0].weight),
                                                  id(model.encoder0.stage2[0].weight)]
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = StepContext(epoch=0, step=1, batch=0, mode=FusionMode.FUSED, steps_per_epoch=None)
    model.train()
    out = alg.forward(model, x0, x1, ctx)
    loss, _ = alg.loss(out, y, ctx)
    b = model.head_bias
    w0, w1 = model.head0.weight, model.head1.weight
    assert_close(loss, F.cross_entropy(out["z"], y))
    model.zero_grad()
    loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    logs = alg.after_backward(model, out, y, ctx)
    rho, k0, k1 = ogm_coefficients(out["y0"], out["y1"], y, 0.5)
    s0 = F.softmax(out["y0"].detach(), 1)[torch.arange(6), y].sum()
    s1 = F.softmax(out["y1"].detach(), 1)[torch.arange(6), y].sum()
    assert_close(logs["rho"], s0 / s1)
    dominant = 0 if float(s0 / s1) > 1 else 1
    k = float(k0 if dominant == 0 else k1)
    assert k < 1
    scaled = {f"encoder{dominant}.stage{i}.0.weight" for i in (1, 2)}
    for name, p in model.named_parameters():
        if name in scaled:
            assert_close(p.grad, before[name] * k)
        else:
            assert torch.equal(p.grad, before[name]), name
    # The scores came from W_k e_k + b/2 (training-mode batch norms: recompute the features in training mode).
    with torch.no_grad():
        model.train()
        z0, z1, (f0, f1) = model(x0, x1, return_features=True)
    assert_close(z0, f0 @ w0.T + b / 2)
    assert_close(z1, f1 @ w1.T + b / 2)
