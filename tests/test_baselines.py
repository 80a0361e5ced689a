"""The Table-1 baselines in the trainer (SPEC Sec. 9): the uni-modal SE network and RUBi, against hand computations."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import ToyLoader, fresh_model, read_jsonl
from greedymm.config import TrainConfig
from greedymm.measures import CLS_GROUPS, evaluate
from greedymm.methods import StepContext
from greedymm.methods.rubi import RUBi, RUBiHeads, RUBiSettings
from greedymm.methods.unimodal import UniModal
from greedymm.models import FusionMode, UniModalNet, mmtm_convnet
from greedymm.training import Trainer, load_checkpoint, train

FUSED_STEP = StepContext(epoch=0, step=1, batch=0, mode=FusionMode.FUSED, steps_per_epoch=None)


def make_cfg(tmp_path, **kw):
    base = dict(lr=0.05, max_epochs=2, progress=False, log_dir=str(tmp_path / "logging"),
                ckpt_dir=str(tmp_path / "checkpoints"), run_name="run")
    return TrainConfig(**{**base, **kw})


def first_batch(loader):
    loader.set_epoch(0, 0)
    return next(iter(loader))


# -------------------------------------------------------------------------------------------------------- RUBi
@pytest.mark.parametrize("bias_input", ["unimodal", "fused"])
@pytest.mark.parametrize("bias", [0, 1])
def test_rubi_loss_against_a_hand_computation(bias, bias_input):
    model = fresh_model().train()
    rubi = RUBi(RUBiSettings(rubi_bias=f"m{bias}", rubi_bias_input=bias_input))
    heads = rubi.setup(model)
    assert isinstance(heads, RUBiHeads) and heads.c1[0].in_features == 8 and heads.c2.out_features == 4
    x0, x1, y = first_batch(ToyLoader())
    out = rubi.forward(model, x0, x1, FUSED_STEP)
    loss, terms = rubi.loss(out, y, FUSED_STEP)

    # by hand: the features entering the bias branch's final linear layer, the MLP, the mask, three CE terms
    ref = copy.deepcopy(model)  # its running scales now include this batch, as the bias pass saw them
    with torch.no_grad():
        a, b = x0, x1
        for name in ref.stage_names[:-1]:
            a, b = getattr(ref.branch0, name)(a), getattr(ref.branch1, name)(b)
            if name in ref.mmtms:
                a, b = ref.mmtms[name](a, b, "fused")
        y0 = ref.branch0.head[-1](a.mean(dim=(2, 3)))
        y1 = ref.branch1.head[-1](b.mean(dim=(2, 3)))
        e = (a if bias == 0 else b).mean(dim=(2, 3))  # the head's pool + flatten: (B, 8)
        if bias_input == "unimodal":  # branch b alone: every fusion scale of b is its running mean over the steps
            h = x0 if bias == 0 else x1
            branch = ref.branch0 if bias == 0 else ref.branch1
            for name in ref.stage_names[:-1]:
                h = getattr(branch, name)(h)
                if name in ref.mmtms:
                    h = h * ref.mmtms[name].running_scales()[bias].float()[None, :, None, None]
            e = h.mean(dim=(2, 3))
        hidden = torch.relu(e @ heads.c1[0].weight.T + heads.c1[0].bias)
        c1 = hidden @ heads.c1[2].weight.T + heads.c1[2].bias  # (B, K)
        c2 = c1 @ heads.c2.weight.T + heads.c2.bias
        mask = 1 / (1 + torch.exp(-c1))
        l0 = F.cross_entropy(y0 * mask, y)
        l1 = F.cross_entropy(y1 * mask, y)
        lb = F.cross_entropy(c2, y)
    assert_close((terms["loss0"].item(), terms["loss1"].item(), terms["loss_bias"].item()),
                 (l0.item(), l1.item(), lb.item()), rtol=1e-5, atol=1e-6)
    assert_close(loss.item(), (l0 + l1 + lb).item(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [0, 1])
def test_rubi_bias_input_sees_the_bias_modality_alone_and_leaves_the_norms(bias):
    """SPEC Sec. 9: as RUBi's question-only branch, the mask must come from the bias modality alone. Changing the
    other modality's input changes the fused features (through the MMTMs) but not the bias classifier's input; the
    extra pass moves no batch-norm statistic (they are those of the regular pass alone)."""
    x0, x1, y = first_batch(ToyLoader())
    other = torch.flip(x1 if bias == 0 else x0, dims=[0])  # the other modality of other samples
    inputs = {"same": (x0, x1), "other": (x0, other) if bias == 0 else (other, x1)}
    c1 = {}
    for input_ in ("unimodal", "fused"):
        for key, (a, b) in inputs.items():
            model = fresh_model().train()
            model(*first_batch(ToyLoader(seed=3))[:2], "fused")  # an earlier regular step: the running means
            rubi = RUBi(RUBiSettings(rubi_bias=f"m{bias}", rubi_bias_input=input_))
            rubi.setup(model)
            torch.manual_seed(0)
            rubi.heads.load_state_dict(RUBiHeads(8, 4).state_dict())  # the same heads in every case
            c1[input_, key] = rubi.forward(model, a, b, FUSED_STEP)["c1"].detach()
            if input_ == "unimodal" and key == "same":
                plain = fresh_model().train()
                plain(*first_batch(ToyLoader(seed=3))[:2], "fused")
                plain(a, b, "fused")
                for (k, v), (_, w) in zip(model.state_dict().items(), plain.state_dict().items()):
                    if "running" in k or "num_batches" in k or "scale_" in k:
                        assert torch.equal(v, w), k
    assert torch.equal(c1["unimodal", "same"], c1["unimodal", "other"])
    assert not torch.allclose(c1["fused", "same"], c1["fused", "other"])
    assert RUBi().settings.rubi_bias_input == "unimodal"
    with pytest.raises(ValueError, match="rubi_bias_input='x' is unknown"):
        RUBiSettings(rubi_bias_input="x").validate()


def test_rubi_bias_path_sends_no_gradient_into_the_branches():
    model = fresh_model().train()
    rubi = RUBi(RUBiSettings(rubi_bias="m0"))
    heads = rubi.setup(model)
    x0, x1, y = first_batch(ToyLoader())
    out = rubi.forward(model, x0, x1, FUSED_STEP)
    loss, terms = rubi.loss(out, y, FUSED_STEP)
    loss.backward()
    rubi_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())

    # the same step with the mask a constant: the branches and MMTMs must get exactly the same gradients
    model.zero_grad(set_to_none=True)
    mask = torch.sigmoid(out["c1"]).detach()
    y0, y1 = model(x0, x1, "fused")
    (F.cross_entropy(y0 * mask, y) + F.cross_entropy(y1 * mask, y)).backward()
    for k, p in model.named_parameters():
        assert_close(rubi_grads[k], p.grad, rtol=1e-5, atol=1e-7, msg=k)
    # and the bias-only loss alone reaches no parameter of the model
    model.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    out = rubi.forward(model, x0, x1, FUSED_STEP)
    F.cross_entropy(out["c2"], y).backward()
    assert all(p.grad is None for p in model.parameters())


def test_rubi_trains_regular_steps_logs_the_cls_and_resumes_exactly(tmp_path):
    loader, val = ToyLoader(), ToyLoader(24, seed=1, shuffle=False)
    straight = train(fresh_model(), loader, make_cfg(tmp_path / "a", algorithm="rubi", max_steps=15, max_epochs=5),
                     val)
    steps = read_jsonl(straight.log_dir / "steps.jsonl")
    assert {s["mode"] for s in steps} == {"fused"}
    assert all(k in steps[0] for k in ("loss_bias", "mu_m0", "mu_m1_prime", "d_speed"))
    assert_close(steps[0]["loss"], steps[0]["loss0"] + steps[0]["loss1"] + steps[0]["loss_bias"])
    first = train(fresh_model(), ToyLoader(), make_cfg(tmp_path / "b", algorithm="rubi", max_steps=8,
                                                        max_epochs=5, ckpt_every_steps=4), val)
    assert first.steps == 8
    torch.manual_seed(99)
    resumed = train(fresh_model(), ToyLoader(), make_cfg(tmp_path / "b", algorithm="rubi", max_steps=15,
                                                          max_epochs=5), val)
    a, b = load_checkpoint(straight.last_path), load_checkpoint(resumed.last_path)
    for part in ("model", "extra"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert (straight.log_dir / "steps.jsonl").read_text() == (resumed.log_dir / "steps.jsonl").read_text()


def test_rubi_is_evaluated_without_its_mask(tmp_path):
    val = ToyLoader(24, seed=1, shuffle=False)
    res = train(fresh_model(), ToyLoader(), make_cfg(tmp_path, algorithm="rubi", max_epochs=2), val)
    model = fresh_model()
    model.load_state_dict(load_checkpoint(res.last_path)["model"])  # the model alone: no heads, no mask
    ev = evaluate(model, val)
    assert_close((res.history[-1]["val_acc"], res.history[-1]["val_loss"]), (ev["acc"], ev["loss"]))


def test_rubi_mu_of_the_first_step_by_hand(tmp_path):
    """The CLS groups are the model's: RUBi's c1, c2 are in none of them, but their loss shapes the gradients."""
    loader = ToyLoader()
    model = fresh_model()
    initial = copy.deepcopy(model)
    res = train(model, loader, make_cfg(tmp_path, algorithm="rubi", max_steps=1, max_epochs=1))
    logged = read_jsonl(res.log_dir / "steps.jsonl")[0]
    rubi = RUBi()  # bias m0
    torch.manual_seed(0)  # the trainer built the heads right after the model, from the global RNG
    mmtm_convnet(4, widths=(4, 8, 8))
    rubi.setup(initial)  # so this draws the heads' initial weights exactly as the trainer did
    x0, x1, y = first_batch(loader)
    loss, _ = rubi.loss(rubi.forward(initial.train(), x0, x1, FUSED_STEP), y, FUSED_STEP)
    loss.backward()
    groups = initial.cls_groups()
    for g in CLS_GROUPS:
        grad = sum(float((p.grad.double() ** 2).sum()) for p in groups[g] if p.grad is not None)
        weight = sum(float((p.detach().double() ** 2).sum()) for p in groups[g])
        assert_close(logged[f"mu_{g}"], grad / weight, rtol=1e-6, atol=0)


# -------------------------------------------------------------------------------------------------- uni-modal
@pytest.mark.parametrize("modality", [0, 1])
def test_unimodal_reads_its_modality_and_logs_no_cls(tmp_path, modality):
    loader = ToyLoader()
    net = UniModalNet.from_two_branch(fresh_model(), modality)
    initial = copy.deepcopy(net)
    res = train(net, loader, make_cfg(tmp_path, algorithm=f"unimodal_m{modality}", max_steps=1, max_epochs=1))
    logged = read_jsonl(res.log_dir / "steps.jsonl")[0]
    x0, x1, y = first_batch(loader)
    with torch.no_grad():
        hand = F.cross_entropy(initial.train()(x1 if modality else x0), y).item()
    assert_close(logged["loss"], hand, rtol=1e-6, atol=1e-7)
    assert not any(k.startswith(("mu_", "s_", "d_speed", "acc0")) for k in logged)


def test_unimodal_trains_evaluates_and_resumes_exactly(tmp_path):
    val = ToyLoader(24, seed=1, shuffle=False)

    def net():
        return UniModalNet.from_two_branch(fresh_model(), 1)

    straight = train(net(), ToyLoader(), make_cfg(tmp_path / "a", algorithm="unimodal_m1", max_steps=15,
                                                   max_epochs=5), val)
    train(net(), ToyLoader(), make_cfg(tmp_path / "b", algorithm="unimodal_m1", max_steps=8, max_epochs=5,
                                       ckpt_every_steps=4), val)
    resumed = train(net(), ToyLoader(), make_cfg(tmp_path / "b", algorithm="unimodal_m1", max_steps=15,
                                                  max_epochs=5), val)
    a, b = load_checkpoint(straight.last_path)["model"], load_checkpoint(resumed.last_path)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    epoch = straight.history[-1]
    assert "val_acc" in epoch and "val_acc0" not in epoch and "d_speed" not in epoch
    model = net()
    model.load_state_dict(load_checkpoint(straight.best_path)["model"])
    assert_close(evaluate(model, val)["acc"], straight.best["val_acc"])


def test_algorithms_refuse_the_wrong_network(tmp_path):
    uni = UniModalNet.from_two_branch(fresh_model(), 0)
    with pytest.raises(TypeError, match="trains a UniModalNet of modality 1"):
        Trainer(uni, ToyLoader(), make_cfg(tmp_path, algorithm="unimodal_m1"))
    with pytest.raises(TypeError, match="trains a UniModalNet of modality 0"):
        Trainer(fresh_model(), ToyLoader(), make_cfg(tmp_path, algorithm="unimodal_m0"))
    with pytest.raises(TypeError, match="two-branch model"):
        Trainer(uni, ToyLoader(), make_cfg(tmp_path, algorithm="vanilla"))
    with pytest.raises(ValueError, match="modality=2"):
        type("UniModalM2", (UniModal,), {"name": "unimodal_m2", "modality": 2})()
    with pytest.raises(ValueError, match="bias=3"):
        RUBi(RUBiSettings(rubi_bias=3))
    with pytest.raises(ValueError, match="rubi_bias='m3' is unknown; allowed: 'm0', 'm1'"):
        TrainConfig(algorithm="rubi", options={"rubi_bias": "m3"})


def test_evaluate_feeds_a_unimodal_network_its_own_modality():
    val = ToyLoader(24, seed=1, shuffle=False)
    net = UniModalNet.from_two_branch(fresh_model(), 1).eval()
    x1 = torch.cat([b[1] for b in val])
    y = torch.cat([b[2] for b in val])
    with torch.no_grad():
        logits = net(x1)
    ev = evaluate(net, val)
    assert_close(ev["acc"], (logits.argmax(1) == y).double().mean().item())
    assert_close(ev["loss"], F.cross_entropy(logits, y).item(), rtol=1e-5, atol=1e-6)
    x0 = torch.cat([b[0] for b in val])
    with torch.no_grad():
        assert abs(F.cross_entropy(net(x0), y).item() - ev["loss"]) > 1e-5  # the check can tell x0 from x1
