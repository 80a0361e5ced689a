"""The training loop: logs, stop rules, fused evaluation, checkpoints and exact resume (SPEC Sec. 4-6)."""
import io
import json
import math
import warnings

import pytest
import torch
from torch.testing import assert_close

from conftest import ToyLoader
from greedymm.config import DataConfig, TrainConfig
from greedymm.mmtm import MMTM
from greedymm.model import mmtm_convnet
from greedymm.mmtm import FusionMode
from greedymm.train import NonFiniteLossError, Trainer, evaluate, load_checkpoint, train


def make_cfg(tmp_path, **kw):
    base = dict(lr=0.05, max_epochs=3, progress=False, log_dir=str(tmp_path / "logging"),
                ckpt_dir=str(tmp_path / "checkpoints"), run_name="run", warmup_epochs=1, epsilon=0.0, window=2)
    return TrainConfig(**{**base, **kw})


def fresh_model():
    torch.manual_seed(0)
    return mmtm_convnet(4, widths=(4, 8, 8))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logs_config_and_checkpoints(tmp_path, toy_loaders):
    train_l, val, test = toy_loaders
    res = train(fresh_model(), train_l, make_cfg(tmp_path, algorithm="guided"), val, test,
                extra_config={"data": {"dataset": "toy"}})
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    epochs = read_jsonl(res.log_dir / "epochs.jsonl")
    assert len(steps) == res.steps == 3 * len(train_l)  # one CLS record per step
    assert [s["step"] for s in steps] == list(range(1, res.steps + 1))
    for key in ("mode", "loss", "loss0", "loss1", "acc", "acc0", "acc1", "mu_m0", "mu_m1", "mu_m0_prime",
                "mu_m1_prime", "s_m1_m0", "s_m0_m1", "d_speed", "lr", "epoch"):
        assert key in steps[0]
    assert_close(steps[0]["loss"], steps[0]["loss0"] + steps[0]["loss1"])
    assert {s["mode"] for s in steps[:len(train_l)]} == {"fused"}  # warm-up epoch
    assert {"rebalance_m0", "rebalance_m1"} & {s["mode"] for s in steps}  # eps = 0: guided re-balances
    assert len(epochs) == 3 and epochs == res.history
    for key in ("train_acc", "train_acc0", "train_acc1", "val_acc", "val_acc0", "val_acc1", "test_acc",
                "test_acc0", "test_acc1", "train_loss", "val_loss", "lr", "time", "rebalance_m0", "d_speed"):
        assert key in epochs[-1]
    n_rebal = sum(e["rebalance_m0"] + e["rebalance_m1"] for e in epochs)
    assert n_rebal == sum(s["mode"] != "fused" for s in steps)
    assert epochs[-1]["d_speed"] == steps[-1]["d_speed"]
    config = json.loads((res.log_dir / "config.json").read_text())
    assert config["train"]["algorithm"] == "guided" and config["data"] == {"dataset": "toy"}
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
    res = train(fresh_model(), train_l, make_cfg(tmp_path, algorithm="guided", window=7), val, test)
    assert read_jsonl(res.log_dir / "steps.jsonl")[-1]["mode"] != "fused"
    assert set(eval_modes) == {"fused"} and "fused" not in set(train_modes[-3:])


def test_stops_after_full_training_accuracy_epochs(tmp_path):
    easy = ToyLoader(16, batch_size=8, signal1=3.0)
    res = train(fresh_model(), easy, make_cfg(tmp_path, lr=0.1, momentum=0.9, max_epochs=60, full_acc_epochs=2))
    assert res.stop_reason == "full_train_acc"
    assert sum(e["train_acc"] == 1.0 for e in res.history) == 2
    assert len(res.history) < 60 and res.history[-1]["train_acc"] == 1.0


def test_plateau_scheduler_lowers_the_lr(tmp_path, toy_loaders):
    res = train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, lr=1e-9, plateau_patience=0, max_epochs=3,
                                                        plateau_threshold=0.5))
    lrs = [e["lr"] for e in res.history]
    assert_close(lrs, [1e-9, 0.3e-9, 0.09e-9])


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
    strip = lambda h: [{k: v for k, v in e.items() if k != "time"} for e in h]
    assert strip(res_a.history) == strip(res_b.history)
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


def test_resuming_a_finished_run_takes_no_step(tmp_path, toy_loaders):
    cfg = make_cfg(tmp_path, max_epochs=1)
    train(fresh_model(), toy_loaders[0], cfg)
    again = train(fresh_model(), toy_loaders[0], cfg)
    assert again.steps_this_call == 0 and again.stop_reason == "max_epochs" and len(again.history) == 1


def test_resume_refuses_a_checkpoint_of_another_algorithm(tmp_path, toy_loaders):
    train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, max_epochs=1))
    with pytest.raises(ValueError, match="algorithm"):
        train(fresh_model(), toy_loaders[0], make_cfg(tmp_path, max_epochs=2, algorithm="random"))


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


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, max_epochs=5)
    loader = PoisonedLoader(epoch=1, at=2)
    loader.start = 0
    with pytest.raises(NonFiniteLossError, match=r"at step 9 \(epoch 2, batch 3"):
        train(fresh_model(), loader, cfg)
    last = load_checkpoint(tmp_path / "checkpoints" / "run" / "last.pt")
    assert last["step"] == 6 and last["epoch"] == 1  # the end of epoch 1, before the bad step
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert len(read_jsonl(tmp_path / "logging" / "run" / "epochs.jsonl")) == 1


def test_plain_iterables_train_and_evaluate(tmp_path):
    loader = ToyLoader()
    batches = list(loader)  # a list: no set_epoch, resumed by skipping batches
    res = train(fresh_model(), batches, make_cfg(tmp_path, max_epochs=1), val_loader=batches)
    assert res.steps == len(batches)
    ev = evaluate(fresh_model(), batches)
    assert 0 <= ev["acc"] <= 1 and ev["n"] == 48 and math.isfinite(ev["loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [True, False])
def test_cuda_mixed_precision_and_channels_last(tmp_path, toy_loaders, amp):
    train_l, val, test = toy_loaders
    res = train(fresh_model(), train_l, make_cfg(tmp_path, amp=amp, algorithm="guided"), val, test, device="cuda")
    steps = read_jsonl(res.log_dir / "steps.jsonl")
    assert all(math.isfinite(s["mu_m0"]) and s["mu_m0"] > 0 for s in steps)
    assert 0 <= res.history[-1]["val_acc"] <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", list(FusionMode)[:3])
def test_cuda_training_step_synchronises_once(tmp_path, toy_loaders, mode):
    trainer = Trainer(fresh_model(), toy_loaders[0], make_cfg(tmp_path), device="cuda")
    trainer._logs = {"steps": io.StringIO()}
    batches = [tuple(t.cuda() for t in b) for b in toy_loaders[0]]
    trainer._train_step(*batches[0])  # a regular step: running means exist, kernels are warm
    trainer.schedule.next_mode = lambda epoch: mode
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
    (dict(algorithm="greedy"), "algorithm='greedy' is unknown; allowed: vanilla, guided, random"),
    (dict(epsilon=-0.1), "epsilon=-0.1 must be a finite number >= 0"),
    (dict(window=0), "window=0 must be at least 1"),
    (dict(lr=0), "lr=0 must be a positive"),
    (dict(momentum=1.0), "momentum=1.0 must be in"),
    (dict(max_epochs=0), "max_epochs=0 must be at least 1"),
    (dict(max_steps=0), "max_steps=0 must be at least 1"),
    (dict(warmup_epochs=-1), "warmup_epochs=-1"),
    (dict(plateau_factor=1.5), "plateau_factor=1.5"),
    (dict(run_name="a/b"), "run_name='a/b'"),
    (dict(ckpt_every_steps=0), "ckpt_every_steps=0"),
])
def test_bad_train_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**kwargs)


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
    assert (paper.plateau_factor, paper.plateau_patience, paper.plateau_threshold, paper.min_lr) == (0.3, 10, 1e-3, 1e-6)
    assert (paper.epsilon, paper.window, paper.full_acc_epochs) == (0.01, 5, 5)
    data = DataConfig.paper()
    assert (data.dataset, data.views, data.batch_size, data.val_fraction, data.image_size) == (
        "modelnet40", (0, 6), 8, 0.2, 224)
    assert DataConfig.smoke().dataset == DataConfig.quick().dataset == "embedded"
    assert TrainConfig.smoke(algorithm="guided").algorithm == "guided"
