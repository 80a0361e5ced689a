"""The training loop: logs, stop rules, fused evaluation, checkpoints, exact and settings-aware resume, mixed
precision, and the CLS and schedules as the trainer applies them, checked against hand computations (SPEC Sec. 4-6).
"""
import copy
import io
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import greedymm.training.trainer as train_module
from conftest import ToyLoader, fresh_model, read_jsonl
from greedymm.config import DataConfig, TrainConfig
from greedymm.measures import CLS_GROUPS, CLSTracker, evaluate
from greedymm.methods import StepContext
from greedymm.methods.guided import Guided, GuidedSettings
from greedymm.models import MMTM, FusionMode, mmtm_convnet
from greedymm.plots import plot_d_speed
from greedymm.runtime import amp_dtype
from greedymm.training import NonFiniteLossError, RunSettingsError, Trainer, load_checkpoint, read_steps, train
from greedymm.training.trainer import full_acc_steps


def make_cfg(tmp_path, options=None, **kw):
    base = dict(lr=0.05, max_epochs=3, progress=False, log_dir=str(tmp_path / "logging"),
                ckpt_dir=str(tmp_path / "checkpoints"), run_name="run")
    return TrainConfig(**{**base, **kw}, options={"warmup_epochs": 1, "epsilon": 0.0, "window": 2, **(options or {})})


def hand_mu(params):
    """sum ||grad||^2 / sum ||p||^2 with plain Python loops (grad None counts as 0)."""
    g = sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None)
    w = sum(float((p.detach().double() ** 2).sum()) for p in params)
    return g / w


def strip_time(history):
    return [{k: v for k, v in e.items() if k != "time"} for e in history]


# ---------------------------------------------------------------------------------------------- logs and rules
def test_logs_config_and_checkpoints(tmp_path, toy_loaders):
    train_l, val, test = toy_loaders
    res = train(fresh_model(), train_l, make_cfg(tmp_path, algorithm="guided"), val, test,
                extra_config={"data": {"dataset": "toy"}}, identity={"data": {"n": 48}})
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    epochs = read_jsonl(res.log_dir / "epochs.jsonl")
    assert len(steps) == res.steps == 3 * len(train_l)  # one CLS record per step
    assert [s["step"] for s in steps] == list(range(1, res.steps + 1))
    for key in ("mode", "loss", "loss0", "loss1", "acc", "acc0", "acc1", "mu_m0", "mu_m1", "mu_m0_prime",
                "mu_m1_prime", "s_m1_m0", "s_m0_m1", "d_speed", "lr", "epoch", "skipped"):
        assert key in steps[0]
    assert_close(steps[0]["loss"], steps[0]["loss0"] + steps[0]["loss1"])
    assert {s["mode"] for s in steps[:len(train_l)]} == {"fused"}  # warm-up epoch
    assert {"rebalance_m0", "rebalance_m1"} & {s["mode"] for s in steps}  # eps = 0: guided re-balances
    assert len(epochs) == 3 and epochs == res.history
    for key in ("train_acc", "train_acc0", "train_acc1", "val_acc", "val_acc0", "val_acc1", "test_acc",
                "test_acc0", "test_acc1", "train_loss", "train_loss0", "train_loss1", "val_loss", "val_loss0",
                "val_loss1", "val_loss_fused", "lr", "time", "rebalance_m0", "d_speed", "skipped_steps"):
        assert key in epochs[-1], key
    n_rebal = sum(e["rebalance_m0"] + e["rebalance_m1"] for e in epochs)
    assert n_rebal == sum(s["mode"] != "fused" for s in steps)
    assert epochs[-1]["d_speed"] == steps[-1]["d_speed"]
    # the epoch's training figures are the sample-weighted means of its steps (all batches have 8 samples)
    last = [s for s in steps if s["epoch"] == 3]
    assert_close(epochs[-1]["train_loss0"], sum(s["loss0"] for s in last) / len(last))
    assert_close(epochs[-1]["train_acc1"], sum(s["acc1"] for s in last) / len(last))
    config = json.loads((res.log_dir / "config.json").read_text())
    assert config["train"]["algorithm"] == "guided" and config["data"] == {"dataset": "toy"}
    assert config["identity"]["data"] == {"n": 48} and config["identity"]["train"]["epsilon"] == 0.0
    assert config["segments"] == [{"from_step": 0, "device": "cpu", "amp_dtype": "float32"}]
    best = load_checkpoint(res.best_path)
    assert best["history"][-1]["val_acc"] == res.best["val_acc"] == max(e["val_acc"] for e in epochs)
    assert load_checkpoint(res.last_path)["step"] == res.steps
    assert not list(res.ckpt_dir.glob("*.tmp"))


def test_evaluation_runs_in_fused_mode_whatever_the_schedule(tmp_path, toy_loaders, monkeypatch):
    eval_modes, train_modes = [], []
    original = MMTM.forward

    def spy(self, a, b, mode="fused"):
        (train_modes if self.training else eval_modes).append(str(getattr(mode, "value", mode)))
        return original(self, a, b, mode)

    monkeypatch.setattr(MMTM, "forward", spy)
    train_l, val, test = toy_loaders
    # window 7 > 6 batches per epoch: every epoch after warm-up ends inside a re-balancing window
    res = train(fresh_model(), train_l, make_cfg(tmp_path, algorithm="guided", options={"window": 7}), val, test)
    assert read_jsonl(res.log_dir / "steps.jsonl")[-1]["mode"] != "fused"
    assert set(eval_modes) == {"fused"} and "fused" not in set(train_modes[-3:])


def test_stops_after_full_training_accuracy_epochs(tmp_path):
    easy = ToyLoader(16, batch_size=8, signal1=3.0)
    res = train(fresh_model(), easy, make_cfg(tmp_path, lr=0.1, momentum=0.9, max_epochs=60, full_acc_epochs=2))
    assert res.stop_reason == "full_train_acc"
    assert sum(e["train_acc"] == 1.0 for e in res.history) == 2
    assert len(res.history) < 60 and res.history[-1]["train_acc"] == 1.0


def test_the_stop_rule_can_count_steps(tmp_path):
    """SPEC Sec. 10: with full_acc_steps, the epochs at 100% training accuracy must hold that many steps: 2 batches an
    epoch and 5 steps stop after 3 such epochs (6 steps), where full_acc_epochs=2 alone would stop after 2."""
    easy = ToyLoader(16, batch_size=8, signal1=3.0)
    res = train(fresh_model(), easy, make_cfg(tmp_path, lr=0.1, momentum=0.9, max_epochs=60, full_acc_epochs=2,
                                              full_acc_steps=5))
    assert res.stop_reason == "full_train_acc"
    full = [e for e in res.history if e["train_acc"] == 1.0]
    assert len(full) == 3 and res.history[-1]["train_acc"] == 1.0
    assert full_acc_steps(res.history) == 6
    assert full_acc_steps([{"step": 9, "train_acc": 1.0}, {"step": 18, "train_acc": 0.5},
                           {"step": 27, "train_acc": 1.0}]) == 18  # by hand: the first and the third epoch
    resumed = train(fresh_model(), easy, make_cfg(tmp_path, lr=0.1, momentum=0.9, max_epochs=60, full_acc_epochs=2,
                                                  full_acc_steps=5))
    assert resumed.steps_this_call == 0 and resumed.stop_reason == "full_train_acc"  # a finished run stays finished


def test_plateau_scheduler_lowers_the_lr(tmp_path, toy_loaders):
    res = train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, lr=1e-9, plateau_patience=0, max_epochs=3,
                                                        plateau_threshold=0.5))
    lrs = [e["lr"] for e in res.history]
    assert_close(lrs, [1e-9, 0.3e-9, 0.09e-9])


def test_plateau_scheduler_follows_the_training_loss_not_the_validation_loss(tmp_path, toy_loaders):
    train_l, val, _ = toy_loaders
    res = train(fresh_model(), train_l, make_cfg(tmp_path, max_epochs=3), val)

    def replay(losses, threshold=1e-3):  # ReduceLROnPlateau's "min" / "rel" rule for what counts as the best
        best = math.inf
        for x in losses:
            best = x if x < best * (1 - threshold) else best
        return best

    scheduler = load_checkpoint(res.last_path)["scheduler"]
    assert scheduler["best"] == replay([e["train_loss"] for e in res.history])
    assert replay([e["val_loss"] for e in res.history]) != scheduler["best"]  # the check can tell them apart


def test_best_checkpoint_is_the_best_validation_epoch_not_the_last(tmp_path, toy_loaders, monkeypatch):
    """A validation curve that drops at the end: best.pt must hold the earlier epoch's weights."""
    train_l, val, _ = toy_loaders
    real = train_module.evaluate
    scripted = iter([0.3, 0.9, 0.5])  # val_acc of epochs 1, 2, 3

    def fake_evaluate(model, loader, *args, **kwargs):
        res = real(model, loader, *args, **kwargs)
        return {**res, "acc": next(scripted)} if loader is val else res

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    res = train(fresh_model(), train_l, make_cfg(tmp_path, max_epochs=3), val)
    assert [e["val_acc"] for e in res.history] == [0.3, 0.9, 0.5]
    assert res.best["epoch"] == 2
    best = load_checkpoint(res.best_path)
    assert best["epoch"] == 2 and best["history"][-1]["epoch"] == 2
    monkeypatch.setattr(train_module, "evaluate", real)
    two = train(fresh_model(), train_l, make_cfg(tmp_path / "two", max_epochs=2), val)  # the same run, 2 epochs
    last_of_two = load_checkpoint(two.last_path)["model"]
    for k, v in best["model"].items():
        assert torch.equal(v, last_of_two[k]), k


def test_max_steps_on_an_epoch_boundary_evaluates_that_epoch(tmp_path, toy_loaders):
    train_l, val, _ = toy_loaders
    res = train(fresh_model(), train_l, make_cfg(tmp_path, max_steps=len(train_l), max_epochs=5), val)
    assert res.stop_reason == "max_steps" and res.steps == len(train_l)
    assert len(res.history) == 1 and "val_acc" in res.history[0]  # the epoch was evaluated
    assert load_checkpoint(res.best_path)["epoch"] == 1
    more = train(fresh_model(), train_l, make_cfg(tmp_path, max_steps=2 * len(train_l), max_epochs=5), val)
    straight = train(fresh_model(), train_l, make_cfg(tmp_path / "b", max_epochs=2), val)
    assert more.resumed_from_step == len(train_l) and len(more.history) == 2
    assert strip_time(more.history) == strip_time(straight.history)


# ------------------------------------------------------------------------------- CLS and schedules, by hand
def test_logged_mu_of_the_first_step_is_mu_of_the_initial_weights(tmp_path):
    loader = ToyLoader()
    model = fresh_model()
    initial = copy.deepcopy(model)
    res = train(model, loader, make_cfg(tmp_path, max_steps=1, max_epochs=1))
    logged = read_jsonl(res.log_dir / "steps.jsonl")[0]
    loader.set_epoch(0, 0)
    x0, x1, y = next(iter(loader))
    initial.train()
    y0, y1 = initial(x0, x1)
    (F.cross_entropy(y0, y) + F.cross_entropy(y1, y)).backward()
    groups = initial.cls_groups()
    for g in CLS_GROUPS:
        assert_close(logged[f"mu_{g}"], hand_mu(groups[g]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("algorithm", ["random", "guided"])
def test_speeds_are_rebuilt_from_the_logged_mu_of_regular_steps_only(tmp_path, toy_loaders, algorithm):
    res = train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, algorithm=algorithm, max_epochs=4))
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    assert sum(s["mode"] != "fused" for s in steps) >= 3  # re-balancing steps happened
    sums = dict.fromkeys(CLS_GROUPS, 0.0)
    for s in steps:
        if s["mode"] == "fused" and not s["skipped"]:
            sums = {g: sums[g] + s[f"mu_{g}"] for g in CLS_GROUPS}
        s10 = math.log10(sums["m0_prime"] / sums["m0"])
        s01 = math.log10(sums["m1_prime"] / sums["m1"])
        assert_close((s["s_m1_m0"], s["s_m0_m1"], s["d_speed"]), (s10, s01, s10 - s01), rtol=1e-9, atol=1e-12)


def replay_guided(steps, epsilon, window, warmup_epochs, key="d_speed"):
    """Algorithm 1 written out again, fed by the logged values: the mode each step should have had."""
    modes, remaining, window_mode, pending = [], 0, "fused", None
    for s in steps:
        if remaining:
            remaining -= 1
            mode = window_mode
        elif s["epoch"] > warmup_epochs and pending is not None and abs(pending) > epsilon:
            window_mode = "rebalance_m0" if pending > 0 else "rebalance_m1"
            remaining, pending, mode = window - 1, None, window_mode
        else:
            mode = "fused"
        modes.append(mode)
        if mode == "fused":
            pending = s[key]
    return modes


def test_guided_modes_replay_from_the_logged_d_speed(tmp_path, toy_loaders):
    cfg = make_cfg(tmp_path, algorithm="guided", max_epochs=5, options={"epsilon": 0.02, "window": 3})
    res = train(fresh_model(), toy_loaders[0], cfg, toy_loaders[1])
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    logged = [s["mode"] for s in steps]
    assert logged == replay_guided(steps, 0.02, 3, 1)
    assert {"rebalance_m0", "rebalance_m1"} <= set(logged) or "fused" in logged[len(toy_loaders[0]):]
    # the check can fail: fed s(m1|m0) instead of d_speed, Algorithm 1 would have chosen other modes here
    assert replay_guided(steps, 0.02, 3, 1, key="s_m1_m0") != logged


# ------------------------------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16), ((6, 1), torch.float16)])
def test_auto_precision_picks_bf16_from_ampere_on(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers by default
    assert amp_dtype(torch.device("cuda"), "auto") is dtype


def test_precision_settings():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "auto") is None and amp_dtype(cpu, "fp32") is None
    assert amp_dtype(cpu, "bf16") is torch.bfloat16 and amp_dtype(cpu, "fp16") is torch.float16
    with pytest.raises(ValueError, match="precision='fp8' is unknown"):
        amp_dtype(cpu, "fp8")


def test_tracker_adds_nothing_for_a_skipped_step(tiny_model, toy_loaders):
    tracker = CLSTracker(tiny_model.cls_groups())
    tracker.sums += torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    nan_mu = torch.full((4,), float("nan"), dtype=torch.float64)
    speeds = tracker.update(nan_mu, regular=True, skipped=torch.tensor(1.0))
    assert_close(tracker.sums, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    assert torch.isfinite(speeds).all()
    tracker.update(torch.ones(4, dtype=torch.float64), regular=True, skipped=torch.tensor(0.0))
    assert_close(tracker.sums, torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64))


def test_guided_does_not_check_after_a_skipped_step():
    s = Guided(GuidedSettings(epsilon=0.1, window=2, warmup_epochs=0))
    step = StepContext(epoch=0, step=1, batch=0, mode=FusionMode.FUSED, steps_per_epoch=None)
    assert s.next_mode(step) is FusionMode.FUSED
    s.observe(step, {"d_speed": 5.0, "skipped": True})
    assert s.next_mode(step) is FusionMode.FUSED  # the skipped step's d_speed is not a new check
    s.observe(step, {"d_speed": 5.0, "skipped": False})
    assert s.next_mode(step) is FusionMode.REBALANCE_M0


def test_fp16_overflow_skips_steps_without_poisoning_the_cls(tmp_path):
    """GradScaler('cpu') with a huge initial scale: the first steps overflow in fp16 and are skipped."""
    cfg = make_cfg(tmp_path, algorithm="guided", precision="fp16", max_epochs=5, options={"epsilon": 0.0})
    trainer = Trainer(fresh_model(), ToyLoader(), cfg, device="cpu")
    assert trainer.amp_dtype is torch.float16 and trainer.scaler is not None
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    res = trainer.fit()
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    skipped = [s["step"] for s in steps if s["skipped"]]
    assert skipped[:4] == [1, 2, 3, 4]  # until the scale has come down to what fp16 holds
    assert not math.isfinite(steps[0]["mu_m0"])  # their gradients overflowed
    first_taken = next(i for i, s in enumerate(steps) if not s["skipped"])
    assert all(math.isfinite(s["d_speed"]) for s in steps[first_taken:])  # the CLS is not poisoned
    assert {"rebalance_m0", "rebalance_m1"} & {s["mode"] for s in steps}  # guided still re-balances
    assert sum(e["skipped_steps"] for e in res.history) == len(skipped)
    sums = dict.fromkeys(CLS_GROUPS, 0.0)
    for s in steps:
        if s["mode"] == "fused" and not s["skipped"]:
            sums = {g: sums[g] + s[f"mu_{g}"] for g in CLS_GROUPS}
    s10 = math.log10(sums["m0_prime"] / sums["m0"])
    assert_close(steps[-1]["s_m1_m0"], s10, rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("algorithm", ["guided", "random"])
def test_resume_mid_epoch_is_exact(tmp_path, algorithm):
    n_steps = 20  # 6 batches per epoch: the stop at 10 is mid-epoch 2, the run crosses epoch ends
    straight = make_cfg(tmp_path / "a", algorithm=algorithm, max_steps=n_steps, max_epochs=10)
    res_a = train(fresh_model(), ToyLoader(), straight, ToyLoader(24, seed=1), ToyLoader(24, seed=2))
    model_a = load_checkpoint(res_a.last_path)["model"]

    # The interrupted run: stops at step 10 from its periodic checkpoint; then one call resumes it.
    part = make_cfg(tmp_path / "b", algorithm=algorithm, max_steps=n_steps // 2, max_epochs=10, ckpt_every_steps=5)
    first = train(fresh_model(), ToyLoader(), part, ToyLoader(24, seed=1), ToyLoader(24, seed=2))
    assert first.steps == 10 and first.stop_reason == "max_steps"
    torch.manual_seed(123)  # a fresh process would have other global RNG state; the checkpoint restores it
    resumed_cfg = make_cfg(tmp_path / "b", algorithm=algorithm, max_steps=n_steps, max_epochs=10)
    res_b = train(mmtm_convnet(4, widths=(4, 8, 8)), ToyLoader(), resumed_cfg, ToyLoader(24, seed=1),
                  ToyLoader(24, seed=2))
    assert res_b.resumed_from_step == 10 and res_b.steps_this_call == 10
    model_b = load_checkpoint(res_b.last_path)["model"]
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k  # bitwise
    assert (res_a.log_dir / "steps.jsonl").read_text() == (res_b.log_dir / "steps.jsonl").read_text()
    assert strip_time(res_a.history) == strip_time(res_b.history)
    if algorithm == "random":
        assert {s["mode"] for s in read_jsonl(res_b.log_dir / "steps.jsonl")[10:]} > {"fused"}


def test_resume_replays_logs_written_after_the_checkpoint(tmp_path, toy_loaders):
    train_l, val, _ = toy_loaders
    reference = train(fresh_model(), train_l, make_cfg(tmp_path / "ref", max_epochs=2), val)
    train(fresh_model(), train_l, make_cfg(tmp_path, max_epochs=1), val)  # last.pt at the end of epoch 1
    steps_file = tmp_path / "logging" / "run" / "steps.jsonl"
    with open(steps_file, "a") as f:  # a crash after the checkpoint left lines beyond its position
        f.write('{"step": 999, "garbage": true}\n')
    res = train(fresh_model(), train_l, make_cfg(tmp_path, max_epochs=2), val)  # a larger budget continues
    assert res.resumed_from_step == len(train_l) and res.steps_this_call == len(train_l)
    assert steps_file.read_text() == (reference.log_dir / "steps.jsonl").read_text()


@pytest.mark.parametrize("loss", ["folder", "steps_half"])
def test_resume_after_losing_the_logs_never_pads(tmp_path, toy_loaders, loss):
    """Checkpoints kept (e.g. on Drive), logs lost: the epoch log is rebuilt, the step log marks its gap."""
    train_l, val, _ = toy_loaders
    reference = train(fresh_model(), train_l, make_cfg(tmp_path / "ref", max_epochs=2), val)
    train(fresh_model(), train_l, make_cfg(tmp_path, max_epochs=1), val)
    log_dir = tmp_path / "logging" / "run"
    kept = 0
    if loss == "folder":
        for f in log_dir.iterdir():
            f.unlink()
        log_dir.rmdir()
    else:  # the step log lost its second half (and ends in a torn line)
        lines = (log_dir / "steps.jsonl").read_text().splitlines(keepends=True)
        kept = len(lines) // 2
        (log_dir / "steps.jsonl").write_text("".join(lines[:kept]) + lines[kept][:10])
    res = train(fresh_model(), train_l, make_cfg(tmp_path, max_epochs=2), val)
    assert res.resumed_from_step == len(train_l)
    for name in ("steps.jsonl", "epochs.jsonl"):
        assert "\x00" not in (log_dir / name).read_text()
    epochs = read_jsonl(log_dir / "epochs.jsonl")
    assert strip_time(epochs) == strip_time(reference.history)
    raw = read_jsonl(log_dir / "steps.jsonl")
    ref_steps = read_jsonl(reference.log_dir / "steps.jsonl")
    assert raw[:kept] == ref_steps[:kept]
    assert raw[kept] == {"gap": [kept + 1, len(train_l)]}
    assert raw[kept + 1:] == ref_steps[len(train_l):]
    steps = read_steps(log_dir)  # what the notebook's plot cell reads
    assert [s["step"] for s in steps] == list(range(1, kept + 1)) + list(range(len(train_l) + 1, 2 * len(train_l) + 1))
    plot_d_speed({"run": steps})


def test_resuming_a_finished_run_takes_no_step(tmp_path, toy_loaders):
    cfg = make_cfg(tmp_path, max_epochs=1)
    train(fresh_model(), toy_loaders[0], cfg)
    again = train(fresh_model(), toy_loaders[0], cfg)
    assert again.steps_this_call == 0 and again.stop_reason == "max_epochs" and len(again.history) == 1


@pytest.mark.parametrize("change, message", [
    (dict(cfg=dict(algorithm="random")), "train.algorithm: 'vanilla' -> 'random'"),
    (dict(cfg=dict(lr=0.1)), "train.lr: 0.05 -> 0.1"),
    (dict(cfg=dict(momentum=0.9)), "train.momentum: 0.0 -> 0.9"),
    (dict(loader=dict(batch_size=12)), "batches_per_epoch: 6 -> 4"),
    (dict(identity={"data": {"image_size": 64}}), "data.image_size: 32 -> 64"),
    (dict(model=lambda: mmtm_convnet(4, widths=(4, 8, 16))), "model:"),
])
def test_resume_refuses_changed_settings_and_keeps_the_config(tmp_path, change, message):
    train(fresh_model(), ToyLoader(), make_cfg(tmp_path, max_epochs=1), identity={"data": {"image_size": 32}})
    config_before = (tmp_path / "logging" / "run" / "config.json").read_text()
    cfg = make_cfg(tmp_path, max_epochs=2, **change.get("cfg", {}))
    model = change.get("model", fresh_model)()
    with pytest.raises(RunSettingsError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        train(model, ToyLoader(**change.get("loader", {})), cfg, identity=change.get("identity",
                                                                                    {"data": {"image_size": 32}}))
    assert "run_name" in str(err.value) and "resume=False" in str(err.value)
    assert (tmp_path / "logging" / "run" / "config.json").read_text() == config_before  # never the unused values
    # the ways out work: resume=False starts the run over with the new settings
    res = train(model, ToyLoader(**change.get("loader", {})), cfg, resume=False,
                identity=change.get("identity", {"data": {"image_size": 32}}))
    assert res.resumed_from_step == 0 and len(res.history) == 2
    assert json.loads((res.log_dir / "config.json").read_text())["train"]["lr"] == cfg.lr


def test_a_larger_budget_is_not_a_new_run(tmp_path, toy_loaders):
    train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, max_epochs=1))
    res = train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, max_epochs=2, eval_test=False, progress=False))
    assert res.resumed_from_step == len(toy_loaders[0]) and len(res.history) == 2


class PoisonedLoader(ToyLoader):
    """Yields NaN inputs from batch `at` of epoch `epoch` on."""

    def __init__(self, epoch, at):
        super().__init__()
        self.poison = (epoch, at)

    def __iter__(self):
        for b, (x0, x1, y) in enumerate(super().__iter__(), start=self.start):
            if (self.epoch, b) >= self.poison:
                x0 = torch.full_like(x0, float("nan"))
            yield x0, x1, y


def test_non_finite_loss_stops_keeps_last_good_checkpoint_and_advises_a_new_run(tmp_path):
    cfg = make_cfg(tmp_path, max_epochs=5)
    loader = PoisonedLoader(epoch=1, at=2)
    loader.start = 0
    with pytest.raises(NonFiniteLossError, match=r"at step 9 \(epoch 2, batch 3") as err:
        train(fresh_model(), loader, cfg)
    assert "lower learning rate" in str(err.value) and "new run" in str(err.value)
    last = load_checkpoint(tmp_path / "checkpoints" / "run" / "last.pt")
    assert last["step"] == 6 and last["epoch"] == 1  # the end of epoch 1, before the bad step
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert len(read_jsonl(tmp_path / "logging" / "run" / "epochs.jsonl")) == 1
    # the advice works: a lower learning rate is refused as a resume of this run, and runs as a new one
    with pytest.raises(RunSettingsError, match="train.lr"):
        train(fresh_model(), ToyLoader(), make_cfg(tmp_path, max_epochs=2, lr=0.01))
    res = train(fresh_model(), ToyLoader(), make_cfg(tmp_path, max_epochs=2, lr=0.01, run_name="lower_lr"))
    assert len(res.history) == 2


def test_plain_iterables_train_and_evaluate(tmp_path):
    loader = ToyLoader()
    batches = list(loader)  # a list: no set_epoch, resumed by skipping batches
    res = train(fresh_model(), batches, make_cfg(tmp_path, max_epochs=1), val_loader=batches)
    assert res.steps == len(batches)
    ev = evaluate(fresh_model(), batches)
    assert 0 <= ev["acc"] <= 1 and ev["n"] == 48 and math.isfinite(ev["loss"])
    assert_close(ev["loss"], ev["loss0"] + ev["loss1"])


def test_evaluate_against_a_hand_evaluation(toy_loaders):
    model = fresh_model().eval()
    loader = toy_loaders[2]
    ev = evaluate(model, loader)
    x0 = torch.cat([b[0] for b in loader])
    x1 = torch.cat([b[1] for b in loader])
    y = torch.cat([b[2] for b in loader])
    with torch.no_grad():
        y0, y1 = model(x0, x1)
    fused = (y0 + y1) / 2
    acc = lambda out: (out.argmax(1) == y).float().mean().item()
    assert_close((ev["acc"], ev["acc0"], ev["acc1"]), (acc(fused), acc(y0), acc(y1)))
    assert_close(ev["loss0"], F.cross_entropy(y0, y).item(), rtol=1e-5, atol=1e-6)
    assert_close(ev["loss_fused"], F.cross_entropy(fused, y).item(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_cuda_mixed_precision_and_channels_last(tmp_path, toy_loaders, precision):
    train_l, val, test = toy_loaders
    res = train(fresh_model(), train_l, make_cfg(tmp_path, precision=precision, algorithm="guided"), val, test,
                device="cuda")
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    assert all(math.isfinite(s["mu_m0"]) and s["mu_m0"] > 0 for s in steps if not s["skipped"])
    assert 0 <= res.history[-1]["val_acc"] <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", list(FusionMode)[:3])
def test_cuda_training_step_synchronises_once(tmp_path, toy_loaders, mode):
    trainer = Trainer(fresh_model(), toy_loaders[0], make_cfg(tmp_path), device="cuda")
    trainer.logs.files = {"steps": io.StringIO()}
    batches = [tuple(t.cuda() for t in b) for b in toy_loaders[0]]
    trainer._train_step(*batches[0])  # a regular step: running means exist, kernels are warm
    trainer.method.next_mode = lambda ctx: mode
    trainer._train_step(*batches[1])  # the first step of a mode may build cached indices once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer._train_step(*batches[2])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("kwargs, message", [
    (dict(algorithm="greedy"), "algorithm='greedy' is unknown; allowed: unimodal_m0, unimodal_m1, vanilla, rubi, "
                               "random, guided"),
    (dict(options={"epsilon": -0.1}), "epsilon=-0.1 must be a finite number >= 0"),
    (dict(options={"window": 0}), "window=0 must be at least 1"),
    (dict(lr=0), "lr=0 must be a positive"),
    (dict(momentum=1.0), "momentum=1.0 must be in"),
    (dict(max_epochs=0), "max_epochs=0 must be at least 1"),
    (dict(max_steps=0), "max_steps=0 must be at least 1"),
    (dict(options={"warmup_epochs": -1}), "warmup_epochs=-1"),
    (dict(algorithm="random", options={"warmup_epochs": 0}), "random needs at least 1 warm-up epoch"),
    (dict(algorithm="guided", options={"warmup_epochs": 0}), "guided needs at least 1 warm-up epoch"),
    (dict(plateau_factor=1.5), "plateau_factor=1.5"),
    (dict(run_name="a/b"), "run_name='a/b'"),
    (dict(ckpt_every_steps=0), "ckpt_every_steps=0"),
    (dict(precision="half"), "precision='half' is unknown; allowed: auto, fp32, bf16, fp16"),
    (dict(l1=-1.0), "l1=-1.0 must be a finite number >= 0"),
    (dict(options={"rubi_bias": "m2"}), "rubi_bias='m2' is unknown"),
    (dict(options={"epsilom": 0.1}), "which no method declares; allowed: rubi_bias, rubi_bias_input, warmup_epochs, epsilon"),
    (dict(options=[("epsilon", 0.1)]), "must be a dict of method settings"),
])
def test_bad_train_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**kwargs)


def test_warmup_zero_is_fine_where_nothing_re_balances(tmp_path, toy_loaders):
    res = train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, options={"warmup_epochs": 0}, max_epochs=1))
    assert res.steps == len(toy_loaders[0])


def test_identity_leaves_out_what_does_not_change_a_run():
    a = TrainConfig(algorithm="vanilla", options={"epsilon": 0.01}, run_name="x", max_epochs=3, progress=False)
    b = TrainConfig(algorithm="vanilla", options={"epsilon": 0.5}, run_name="y", max_epochs=9, log_dir="elsewhere")
    assert a.identity() == b.identity()  # epsilon is guided's; names, folders and budgets are not settings
    assert TrainConfig(algorithm="guided", options={"epsilon": 0.01}).identity() != TrainConfig(
        algorithm="guided", options={"epsilon": 0.5}).identity()
    assert TrainConfig(lr=0.1).identity() != TrainConfig(lr=0.2).identity()
    assert DataConfig(batch_size=8).identity() != DataConfig(batch_size=16).identity()
    assert DataConfig(num_workers=0).identity() == DataConfig(num_workers=4, data_dir="x").identity()


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="cifar"), "dataset='cifar' is unknown; allowed: modelnet40, embedded"),
    (dict(views=(0, 12)), "each view index must be in 0..11"),
    (dict(views=(1, 2, 3)), "exactly two view indices"),
    (dict(batch_size=0), "batch_size=0 must be at least 1"),
    (dict(val_fraction=1.0), "val_fraction=1.0 must be strictly between 0 and 1"),
    (dict(image_size=4), "image_size=4 must be between 8 and 1024"),
    (dict(num_workers=-1), "num_workers=-1 must be 0 or more"),
])
def test_bad_data_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DataConfig(**kwargs)


def test_presets():
    paper = TrainConfig.paper()
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.max_epochs) == (0.1, 0.0, 0.0, 300)
    assert (paper.plateau_factor, paper.plateau_patience, paper.plateau_threshold, paper.min_lr) == (
        0.3, 10, 1e-3, 1e-6)
    assert (paper.option("epsilon"), paper.option("window"), paper.full_acc_epochs) == (0.01, 5, 5)
    assert paper.options == {} and TrainConfig.for_dataset("colored_digits").options == {"epsilon": 0.1, "window": 5}
    data = DataConfig.paper()
    assert (data.dataset, data.views, data.batch_size, data.val_fraction, data.image_size) == (
        "modelnet40", (0, 6), 8, 0.2, 224)
    assert DataConfig.smoke().dataset == DataConfig.quick().dataset == "embedded"
    assert TrainConfig.smoke(algorithm="guided").algorithm == "guided"
