"""The studies (SPEC Sec. 11): grid expansion and run names, runs.jsonl, skip / resume / retry, failure isolation,
the L1 term and the sparsity against hand computations, and the executors giving the same results."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from greedymm.config import DataConfig, TrainConfig, run_name
from greedymm.measures import sparsity
from greedymm.models import mmtm_convnet, model_factory
from greedymm.study import Grid, Study, expand, load_study, log_space, make_executor, run_study
from greedymm.study.executors import ProcessExecutor
from greedymm.study.grid import pair_views
from greedymm.study.presets import sensitivity
from greedymm.study.records import append_record, finished_keys, latest, read_records
from greedymm.training import train

TINY_DATA = dict(image_size=16, embedded_per_class=2, embedded_test_per_class=1, batch_size=8)
MODEL = "greedymm.models.zoo:mmtm_convnet"
# Figures a run's record carries that must not depend on where it ran.
RESULTS = ("acc", "acc0", "acc1", "acc0_cut", "acc1_cut", "u_m1_m0", "u_m0_m1", "d_util", "d_speed", "val_acc",
           "rho", "steps", "best_epoch")


def tiny_study(name: str, figures=("pairs", "cls_cur"), train=None, **grid) -> Study:
    """A study of embedded runs at 16 px with 2 objects per class and a small conv model: about a second a run."""
    return Study(name, (Grid(datasets=("embedded",), **grid),), data=dict(TINY_DATA),
                 train=dict(max_epochs=1, **(train or {})), model=MODEL, figures=figures)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return {"log_dir": root / "logging", "ckpt_dir": root / "checkpoints", "data_dir": root / "data"}


def same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


# ---------------------------------------------------------------------------------------------- grids and names
def test_log_space_hand_values():
    assert log_space(1e-3, 1.0, 4) == (0.001, 0.01, 0.1, 1.0)
    assert log_space(1e-6, 1e-3, 10)[1] == pytest.approx(2.154e-6)
    assert log_space(0.5, 0.5, 1) == (0.5,)
    with pytest.raises(ValueError, match="positive"):
        log_space(0.0, 1.0, 3)


def test_expand_names_runs_as_ordinary_runs(tmp_path):
    study = Study("names", (Grid(datasets=("embedded",), algorithms=("vanilla", "guided"), lrs=(0.1, 0.01),
                                 seeds=(0, 1), options={"epsilon": (0.01, 0.1)}),), data={"image_size": 32})
    specs = expand(study, tmp_path / "log", tmp_path / "ck")
    # vanilla has no epsilon: 2 lrs x 2 seeds; guided: 2 lrs x 2 epsilons x 2 seeds
    assert len(specs) == 4 + 8
    assert [s.algorithm for s in specs].count("guided") == 8
    assert all(s.epsilon is None and s.window is None for s in specs if s.algorithm == "vanilla")
    assert sorted({s.epsilon for s in specs if s.algorithm == "guided"}) == [0.01, 0.1]
    assert len({s.run_name for s in specs}) == 12
    g = next(s for s in specs if s.algorithm == "guided" and s.lr == 0.01 and s.epsilon == 0.1 and s.seed == 1)
    data = DataConfig(dataset="embedded", image_size=32)
    cfg = TrainConfig.for_dataset("embedded", lr=0.01, options={"epsilon": 0.1}, algorithm="guided", seed=1)
    assert g.run_name == run_name(data, cfg)  # the name of the same ordinary run
    assert g.train["log_dir"] == str((tmp_path / "log").absolute()) and g.train["run_name"] == g.run_name
    assert g.data_config().views == (0, 6) and g.pair == "distinct"
    # the folders do not change the name; a setting does
    assert [s.run_name for s in expand(study, "elsewhere", "other")] == [s.run_name for s in specs]
    v = next(s for s in specs if s.algorithm == "vanilla" and s.lr == 0.1 and s.seed == 0)
    assert v.run_name == run_name(data, TrainConfig.for_dataset("embedded", lr=0.1, algorithm="vanilla", seed=0))


def test_grids_union_runs_once():
    a = Grid(datasets=("embedded",), algorithms=("guided",), options={"epsilon": (0.01, 0.1), "window": (5,)})
    b = Grid(datasets=("embedded",), algorithms=("guided",), options={"window": (2, 5), "epsilon": (0.01,)})
    specs = expand(Study("union", (a, b)))
    assert sorted((s.epsilon, s.window) for s in specs) == [(0.01, 2), (0.01, 5), (0.1, 5)]


def test_sensitivity_sweeps_the_balancers_settings_only_for_their_algorithm(tmp_path):
    study = sensitivity("embedded", sweeps={"epsilon": (0.01, 0.1), "window": (5,), "ogm_alpha": (0.1, 0.8),
                                            "gblend_period": (2,), "mmpareto_gamma": (), "opm_q_base": (),
                                            "pmr_alpha": (), "agm_alpha": ()}, seeds=(0,), data={"image_size": 32})
    specs = expand(study, tmp_path / "log", tmp_path / "ck")
    by_alg = {a: [s for s in specs if s.algorithm == a] for a in ("guided", "ogm_ge", "gblend")}
    assert len(specs) == 2 + 2 + 1 and {len(v) for v in by_alg.values()} == {2, 1}
    assert sorted(s.ogm_alpha for s in by_alg["ogm_ge"]) == [0.1, 0.8]
    assert all(s.epsilon is None and s.window is None and s.gblend_period is None for s in by_alg["ogm_ge"])
    assert all(s.ogm_alpha is None and s.gblend_period is None for s in by_alg["guided"])
    (gb,) = by_alg["gblend"]
    assert gb.gblend_period == 2 and gb.train["options"]["gblend_period"] == 2 and gb.ogm_alpha is None
    o = next(s for s in by_alg["ogm_ge"] if s.ogm_alpha == 0.8)
    data = DataConfig(dataset="embedded", image_size=32)
    assert o.train["options"]["ogm_alpha"] == 0.8 and o.train_config().settings().ogm_alpha == 0.8
    assert o.run_name == run_name(data, TrainConfig.for_dataset("embedded", options={"ogm_alpha": 0.8},
                                                                algorithm="ogm_ge", seed=0))
    assert o.settings()["ogm_alpha"] == 0.8 and o.settings()["gblend_period"] is None
    # the preset grids: four alphas and four periods; an empty sweep drops that balancer
    assert [len(g.options["ogm_alpha"]) for g in sensitivity("embedded").grids if g.algorithms == ("ogm_ge",)] == [4]
    none = sensitivity("embedded", sweeps={"ogm_alpha": (), "gblend_period": (), "mmpareto_gamma": (),
                                           "opm_q_base": (), "pmr_alpha": (), "agm_alpha": ()})
    assert {a for g in none.grids for a in g.algorithms} == {"guided"}


def test_preset_lr_and_grid_order():
    specs = expand(Study("order", (Grid(datasets=("embedded",), lrs=(None, 0.2), seeds=(3, 1)),)))
    assert [(s.lr, s.seed) for s in specs] == [(0.05, 3), (0.05, 1), (0.2, 3), (0.2, 1)]  # embedded preset 0.05


def test_pair_views():
    assert pair_views("embedded", "distinct", (0, 6)) == ("distinct", (0, 6))
    assert pair_views("modelnet40", "identical", (0, 6)) == ("identical", (0, 0))  # the front view twice
    assert pair_views("colored_digits", "identical", (0, 1)) == ("identical", (1, 1))  # the gray digit twice
    assert pair_views("embedded", "0,3", (0, 6)) == ("views 0,3", (0, 3))
    assert pair_views("embedded", (2, 9), (0, 6)) == ("views 2,9", (2, 9))
    with pytest.raises(ValueError, match="'distinct', 'identical'"):
        pair_views("embedded", "same", (0, 6))


def test_identical_pairs_expand_and_name_apart():
    specs = expand(Study("pairs", (Grid(datasets=("embedded", "colored_digits"), pairs=("distinct", "identical")),)))
    views = {(s.dataset, s.pair): s.data_config().views for s in specs}
    assert views == {("embedded", "distinct"): (0, 6), ("embedded", "identical"): (0, 0),
                     ("colored_digits", "distinct"): (0, 1), ("colored_digits", "identical"): (1, 1)}
    assert len({s.run_name for s in specs}) == 4


def test_identical_pairs_give_identical_tensors(dirs):
    from greedymm.data import build_loaders

    spec = expand(tiny_study("identical", pairs=("identical",)), **dirs)[0]
    loaders = build_loaders(spec.data_config(), "cpu", seed=0, progress=False)
    flipped = False
    for x0, x1, _ in loaders.train:  # training batches: randomly flipped, the same flip for both
        torch.testing.assert_close(x0, x1, rtol=0, atol=0)
        flipped |= not torch.equal(x0, x0.flip(-1))
    assert flipped
    x0, x1, _ = next(iter(loaders.test))
    torch.testing.assert_close(x0, x1, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="a/b"), "folder name"),
    (dict(name="s", train={"lr": 0.1}), "set by the grid"),
    (dict(name="s", data={"views": (0, 1)}), "set by the grid"),
    (dict(name="s", figures=("nope",)), "allowed: pairs"),
    (dict(name="s", tau=0.0), "positive threshold"),
    (dict(name="s", model="not a path"), "module:function"),
    (dict(name="s", grids=(dict(seeds=()),)), "Grid.seeds is empty"),
    (dict(name="s", grids=(dict(algorithms=("sgd",)),)), "allowed: "),
    (dict(name="s", grids=(dict(lrs=0.1),)), "must be a list"),
    (dict(name="s", grids=(dict(options={"epsilon": 0.1}),)), "must be a list"),
    (dict(name="s", grids=(dict(options={"epsilon": ()}),)), "is empty"),
    (dict(name="s", grids=(dict(options={"epsilom": (0.1,)}),)), "which no method declares"),
    (dict(name="s", train={"options": {"epsilon": 0.1}}), "set by the grid"),
    (dict(name="s", train={"epsilon": 0.1}), "not TrainConfig fields .a method's setting goes in train\\['options'\\]"),
])
def test_study_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Study(**kwargs)


def test_a_model_named_by_its_old_module_is_the_same_model():
    # run names embed the study's model string: "greedymm.model:..." (before greedymm.models) still resolves
    assert model_factory("greedymm.model:mmtm_convnet") is model_factory(MODEL) is mmtm_convnet
    with pytest.raises(ValueError, match="model='greedymm.nowhere:f' cannot be loaded"):
        model_factory("greedymm.nowhere:f")


def test_study_round_trips_through_json():
    study = tiny_study("json", lrs=(0.1, 0.01), pairs=("distinct", (0, 3)))
    again = Study.from_dict(json.loads(json.dumps(study.to_dict())))
    assert [s.run_name for s in expand(again)] == [s.run_name for s in expand(study)]


# ------------------------------------------------------------------------------------------------- runs.jsonl
def test_records_whole_lines_and_torn_tail(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_record(path, {"key": "a", "status": "failed", "views": (0, 6), "x": math.nan})
    append_record(path, {"key": "b", "status": "ok"})
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "sta')  # a crash mid-write
    records = read_records(path)
    assert [r["key"] for r in records] == ["a", "b"]
    assert records[0]["views"] == [0, 6] and math.isnan(records[0]["x"])
    append_record(path, {"key": "a", "status": "ok"})  # the retry; the torn line is cut off first
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    assert finished_keys(read_records(path)) == {"a", "b"}
    assert latest(read_records(path))["a"]["status"] == "ok"
    assert read_records(tmp_path / "missing.jsonl") == []


# ---------------------------------------------------------------------------------- L1 term and sparsity by hand
def test_l1_term_in_the_training_loss(tiny_model, toy_loaders, tmp_path):
    lam, lr = 1e-3, 0.05
    theta0 = {k: p.detach().clone() for k, p in tiny_model.named_parameters()}
    plain = mmtm_convnet(4, widths=(4, 8, 8))
    plain.load_state_dict(tiny_model.state_dict())
    hand_l1 = sum(p.abs().sum().double() for p in theta0.values())

    def one_step(model, l1, name):
        cfg = TrainConfig.smoke(lr=lr, l1=l1, max_steps=1, max_epochs=1, run_name=name, log_dir=str(tmp_path / "log"),
                                ckpt_dir=str(tmp_path / "ck"))
        train(model, toy_loaders[0], cfg, device="cpu")
        return json.loads((tmp_path / "log" / name / "steps.jsonl").read_text().splitlines()[0])

    rec = one_step(tiny_model, lam, "l1")
    base = one_step(plain, 0.0, "plain")
    assert rec["l1"] == pytest.approx(float(hand_l1), rel=1e-6)  # sum |theta| of the weights before the step
    assert rec["loss"] - rec["loss0"] - rec["loss1"] == pytest.approx(lam * float(hand_l1), rel=1e-5)
    assert rec["loss0"] == pytest.approx(base["loss0"], rel=1e-6)  # the same first batch and weights
    # SGD: theta1 = theta0 - lr (grad CE + lam sign(theta0)); the CE part is the plain run's
    for (k, p), q in zip(tiny_model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.detach() - q.detach(), -lr * lam * torch.sign(theta0[k]), atol=2e-7, rtol=0)


def test_sparsity_counts_parameters_below_tau():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0005, -0.002], [0.0, 0.001]]))
        model[0].bias.copy_(torch.tensor([-0.0009, 0.5]))
        model[1].weight.fill_(1.0)
        model[1].bias.fill_(0.0)  # running_mean (buffers, zeros) must not count
    # |theta| < 1e-3: 0.0005, 0.0, -0.0009 and the two zero biases (0.001 is not below): 5 of 10 parameters
    assert sparsity(model, tau=1e-3) == 0.5
    assert sparsity(model, tau=1e-2) == 0.7  # and -0.002, 0.001
    with pytest.raises(ValueError, match="positive"):
        sparsity(model, tau=0.0)


# --------------------------------------------------------------------------------- running, skipping, resuming
@pytest.fixture(scope="module")
def finished(dirs):
    study = tiny_study("tiny", lrs=(0.05, 0.01), seeds=(0,))
    return study, run_study(study, "local", **dirs)


def test_records_carry_every_setting_and_figure(finished, dirs):
    study, result = finished
    assert result.ran == 2 and result.skipped == 0 and not result.failed
    lines = result.path.read_text().splitlines()
    assert result.path == dirs["log_dir"] / "studies" / "tiny" / "runs.jsonl" and len(lines) == 2
    for spec, r in zip(expand(study, **dirs), map(json.loads, lines)):
        assert r["run_name"] == spec.run_name and r["status"] == "ok"
        for k in ("dataset", "pair", "views", "algorithm", "lr", "seed", "l1", "tau", "batch_size", "model"):
            assert k in r, k
        assert (r["lr"], r["seed"], r["tau"], r["views"]) == (spec.lr, spec.seed, 1e-3, [0, 6])
        for k in ("acc", "acc0", "acc1", "acc0_cut", "acc1_cut", "val_acc", "rho"):
            assert 0.0 <= r[k] <= 1.0, k
        assert r["steps"] == 2 and r["epochs"] == 1 and r["wall_s"] > 0 and r["device"].startswith("cpu")
        assert math.isfinite(r["d_speed"])
        assert Path(r["log_dir"]) == dirs["log_dir"] / spec.run_name  # an ordinary run's folders
        assert (dirs["ckpt_dir"] / spec.run_name / "best.pt").exists()
    assert set(result.figure_paths) == {"pairs", "cls_cur"}
    assert all(p.stat().st_size > 5000 for p in result.figure_paths.values())


def test_record_rho_is_the_best_checkpoints_sparsity(finished, dirs):
    _, result = finished
    r = result.records[0]
    state = torch.load(r["best_path"], weights_only=True)["model"]
    names = {n for n, _ in mmtm_convnet(6).named_parameters()}  # parameters, not buffers
    small = sum(int((state[n].abs() < 1e-3).sum()) for n in names)
    assert r["rho"] == small / sum(state[n].numel() for n in names)


def test_rerun_trains_nothing_and_rebuilds_figures(finished, dirs):
    study, first = finished
    steps = {r["run_name"]: (Path(r["log_dir"]) / "steps.jsonl").stat().st_mtime_ns for r in first.records}
    first.figure_paths["pairs"].unlink()
    again = run_study(study, "local", **dirs)
    assert again.ran == 0 and again.skipped == 2
    assert len(again.path.read_text().splitlines()) == 2  # nothing appended
    assert {r["run_name"]: (Path(r["log_dir"]) / "steps.jsonl").stat().st_mtime_ns for r in again.records} == steps
    assert first.figure_paths["pairs"].exists()
    assert [r["d_util"] for r in again.records] == [r["d_util"] for r in first.records]
    loaded = load_study(study, **dirs)  # reads, never runs
    assert loaded.ran == 0 and loaded.records == again.records and set(loaded.figures) == {"pairs", "cls_cur"}


def test_unrecorded_run_is_measured_again_without_training(finished, dirs):
    study, first = finished
    path = first.path
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")  # its record was lost (e.g. a crash after training)
    again = run_study(study, "local", **dirs)
    assert again.ran == 1
    r = json.loads(path.read_text().splitlines()[-1])
    assert r["run_name"] == first.records[0]["run_name"] and r["steps_this_call"] == 0 and r["steps"] == 2
    assert all(same(r[k], first.records[0][k]) for k in RESULTS)


def test_larger_budget_resumes_the_runs(finished, dirs):
    study, first = finished
    longer = dataclasses.replace(study, train={"max_epochs": 2}, figures=())
    result = run_study(longer, "local", **dirs)
    assert result.ran == 2
    assert [r["run_name"] for r in result.records] == [r["run_name"] for r in first.records]  # the same runs
    assert all(r["steps"] == 4 and r["steps_this_call"] == 2 and r["epochs"] == 2 for r in result.records)


# Seeds whose model the factory below breaks (a NaN weight: a genuinely non-finite training loss).
PLANT_NAN = set()


def nan_for_planted_seeds(num_classes: int) -> nn.Module:
    model = mmtm_convnet(num_classes)
    if torch.initial_seed() in PLANT_NAN:  # experiment seeds torch with the run's seed right before this call
        with torch.no_grad():
            next(model.parameters()).fill_(math.nan)
    return model


def test_a_failure_is_recorded_and_retried(dirs, monkeypatch):
    study = Study("failing", tiny_study("x", seeds=(0, 1)).grids, data=dict(TINY_DATA), train={"max_epochs": 1},
                  model=f"{__name__}:nan_for_planted_seeds")
    monkeypatch.setattr(f"{__name__}.PLANT_NAN", {1})
    result = run_study(study, "local", **dirs)
    assert [r["status"] for r in result.records] == ["ok", "failed"]  # the first run's success is kept
    assert result.failed[0]["error"].startswith("NonFiniteLossError") and result.failed[0]["seed"] == 1
    monkeypatch.setattr(f"{__name__}.PLANT_NAN", set())
    again = run_study(study, "local", **dirs)
    assert again.ran == 1 and [r["status"] for r in again.records] == ["ok", "ok"]
    assert [json.loads(x)["status"] for x in again.path.read_text().splitlines()] == ["ok", "failed", "ok"]


# ----------------------------------------------------------------------------------------------- executors
@pytest.fixture(scope="module")
def local_pair(dirs, tmp_path_factory):
    """Two tiny runs by the local executor with one torch thread (the workers' setting)."""
    root = tmp_path_factory.mktemp("local")
    study = tiny_study("pair", figures=(), lrs=(0.05,), seeds=(0, 1))
    result = run_study(study, make_executor("local", threads=1), root / "log", root / "ck", dirs["data_dir"])
    assert not result.failed
    return study, result.records


@pytest.mark.slow
def test_processes_executor_matches_local(local_pair, dirs, tmp_path):
    study, local = local_pair
    result = run_study(study, ProcessExecutor(workers=2, threads=1), tmp_path / "log", tmp_path / "ck",
                       dirs["data_dir"])
    assert result.ran == 2 and not result.failed
    for a, b in zip(local, result.records):
        assert a["run_name"] == b["run_name"]
        assert {k: b[k] for k in RESULTS if not same(a[k], b[k])} == {}


def test_processes_executor_shares_out_devices():
    ex = ProcessExecutor(workers=2, gpus=[])
    assert ex.slots(5) == ["cpu", "cpu"] and ex.slots(1) == ["cpu"]
    gpu = ProcessExecutor(gpus=[0, 1], runs_per_gpu=2)
    assert gpu.slots(10) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"] and gpu.threads_per_worker(4) == 1
    with pytest.raises(ValueError, match="unknown"):
        make_executor("slurm")


@pytest.mark.slow
def test_ray_executor_matches_local(local_pair, dirs, tmp_path):
    pytest.importorskip("ray")
    study, local = local_pair
    ray_ex = make_executor("ray", num_cpus=2, cpus_per_run=1, gpus_per_run=0)
    result = run_study(study, ray_ex, tmp_path / "log", tmp_path / "ck", dirs["data_dir"])
    assert result.ran == 2 and not result.failed
    for a, b in zip(local, result.records):
        assert a["run_name"] == b["run_name"]
        assert {k: b[k] for k in RESULTS if not same(a[k], b[k])} == {}


def test_l1_term_pulls_every_weight_towards_zero():
    """The penalty is added, not subtracted: its gradient is +lambda * sign(theta), so a step with no data gradient
    shrinks every nonzero weight's magnitude by lr * lambda (issue 16: a flipped sign must fail a test)."""
    from greedymm.training.callbacks import L1Term

    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.25, 0.0], [-1.0, 2.0, 0.125]]))
        model[0].bias.copy_(torch.tensor([0.3, -0.7]))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    weighted, logged = L1Term(0.1)(model)
    assert logged.item() == pytest.approx(0.5 + 0.25 + 1.0 + 2.0 + 0.125 + 0.3 + 0.7)
    assert weighted.item() == pytest.approx(0.1 * logged.item()) and weighted.item() > 0
    weighted.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.1 * torch.sign(before[k]))
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    for k, p in model.named_parameters():
        nonzero = before[k] != 0
        assert (p.detach().abs() < before[k].abs())[nonzero].all()  # every nonzero weight moved towards 0
