"""Runs named by their settings, the CUR of the best checkpoint, failures recorded, the Table-1 summary and the
figures (paper Sec. 6.4; SPEC Sec. 6-9)."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle
from torch.testing import assert_close

import greedymm.experiment.runs as runs_module
import greedymm.training.trainer as train_module
from greedymm.config import DataConfig, TrainConfig, run_name
from greedymm.data import build_loaders
from greedymm.experiment.runs import Run, run_all
from greedymm.experiment.table import (PAPER_MODELNET40, PAPER_TABLE1, best_unimodal, format_table, paper_column,
                                       summarize)
from greedymm.measures import compute_squeeze_means
from greedymm.models import FusionMode, mmtm_convnet
from greedymm.plots import _mode_spans, pick_examples, plot_d_speed, plot_d_util, plot_learning_curves, plot_views
from greedymm.training import load_checkpoint, read_epochs, read_steps


def fake_run(alg, seed, acc, d_util, status="ok"):
    return {"algorithm": alg, "seed": seed, "acc": acc, "acc0": acc - 0.1, "acc1": acc - 0.2, "u_m1_m0": 0.1,
            "u_m0_m1": 0.1 - d_util, "d_util": d_util, "d_speed": -0.05 * seed, "status": status}


def test_summarize_mean_and_std_over_seeds():
    runs = [fake_run("vanilla", 0, 0.90, -0.4), fake_run("vanilla", 1, 0.80, -0.2), fake_run("guided", 0, 0.95, 0.0)]
    table = summarize(runs)
    assert list(table) == ["vanilla", "guided"]
    mean, std, n = table["vanilla"]["acc"]
    assert_close((mean, std, n), (0.85, 0.05, 2))  # population std over the seeds
    assert_close(table["vanilla"]["d_util"][:2], (-0.3, 0.1))
    assert table["guided"]["acc"] == (0.95, 0.0, 1)


def test_summarize_counts_only_valid_seeds_and_names_failures():
    runs = [fake_run("vanilla", 0, 0.9, -0.3), fake_run("vanilla", 1, 0.8, math.nan),
            {"algorithm": "vanilla", "seed": 2, "status": "failed", "error": "NonFiniteLossError: nan"}]
    row = summarize(runs)["vanilla"]
    assert row["runs"] == 3 and row["failed"] == [2]
    assert row["d_util"] == (-0.3, 0.0, 1)  # one valid seed, not "3 seeds, std 0"
    assert_close(row["acc"][:2], (0.85, 0.05)) and row["acc"][2] == 2
    text = format_table({"vanilla": row})
    assert "| vanilla | 2 of 3 (failed: s2) |" in text
    only_failed = summarize([{"algorithm": "guided", "seed": 0, "status": "failed", "error": "x"}])["guided"]
    assert only_failed["acc"] == (0.0, 0.0, 0) or only_failed["acc"][2] == 0
    assert "n/a" in format_table({"guided": only_failed})


def test_undefined_d_util_is_counted_not_averaged():
    undefined = dict(fake_run("vanilla", 1, 0.5, math.nan), d_util_undefined="branch 1 at chance: ...")
    row = summarize([fake_run("vanilla", 0, 0.9, -0.3), undefined])["vanilla"]
    assert row["undefined"] == 1 and row["d_util"] == (-0.3, 0.0, 1)
    assert "| -0.300 (1 undefined) |" in format_table({"vanilla": row})
    assert "undefined" not in format_table(summarize([fake_run("vanilla", 0, 0.9, -0.3)]))


def test_table_rows_in_the_papers_order_with_the_best_unimodal_marked():
    runs = [fake_run(a, 0, acc, 0.0) for a, acc in
            [("guided", 0.91), ("vanilla", 0.90), ("unimodal_m1", 0.88), ("rubi", 0.9), ("unimodal_m0", 0.89),
             ("random", 0.91)]]
    for r in runs:
        if r["algorithm"].startswith("unimodal"):
            r.update(acc0=math.nan, acc1=math.nan, d_util=math.nan, u_m1_m0=math.nan, u_m0_m1=math.nan,
                     d_speed=math.nan)
    table = summarize(runs)
    assert list(table) == ["unimodal_m0", "unimodal_m1", "vanilla", "rubi", "random", "guided"]
    assert best_unimodal(table) == "unimodal_m0"
    lines = format_table(table, PAPER_MODELNET40).splitlines()
    assert lines[2].startswith("| unimodal_m0 (best) | 1 | 89.00 | n/a | n/a |")
    assert "89.34 ± 0.39" in lines[2] and "89.34" not in lines[3]
    assert "90.45 ± 0.58" in lines[5] and "≈ -0.1" in lines[4]
    assert paper_column("colored_digits") is PAPER_TABLE1["colored_mnist"] and paper_column("embedded") is None


def test_format_table_with_the_papers_numbers():
    text = format_table(summarize([fake_run("vanilla", 0, 0.9009, -0.1)]), PAPER_MODELNET40)
    header, rule, row = text.splitlines()
    assert "paper acc %" in header and rule.count("---") == 11
    assert "| vanilla | 1 | 90.09 |" in row and "90.09 ± 0.58" in row and "≈ -0.1" in row
    assert PAPER_MODELNET40["guided"]["acc"] == (91.37, 0.28)
    two = format_table(summarize([fake_run("vanilla", 0, 0.90, -0.1), fake_run("vanilla", 1, 0.92, -0.3)]))
    assert "| vanilla | 2 | 91.00 ± 1.00 |" in two and "-0.200 ± 0.100" in two


def named(data, cfg, algorithm, seed, model=""):
    """The run name of `cfg` trained with `algorithm` and `seed`."""
    return run_name(data, dataclasses.replace(cfg, algorithm=algorithm, seed=seed), model)


def test_run_names_carry_every_setting_that_changes_a_run():
    data, cfg = DataConfig.paper(), TrainConfig.paper()
    name = named(data, cfg, "guided", 2)
    assert name.startswith("modelnet40_guided_s2_") and len(name.split("_")[-1]) == 8
    assert named(data, cfg, "guided", 2) == name  # deterministic
    changed = [named(data, dataclasses.replace(cfg, lr=0.05), "guided", 2),
               named(dataclasses.replace(data, batch_size=16), cfg, "guided", 2),
               named(dataclasses.replace(data, val_fraction=0.1), cfg, "guided", 2),
               named(DataConfig.quick(embedded_per_class=60), cfg, "guided", 2),
               named(data, dataclasses.replace(cfg, options={"epsilon": 0.1}), "guided", 2),
               named(data, cfg, "guided", 2, model="my_model")]
    assert len(set(changed + [name])) == len(changed) + 1
    # settings that do not change a run keep its name: folders, workers, budgets, another algorithm's settings
    same = [named(dataclasses.replace(data, num_workers=4, data_dir="x"), cfg, "guided", 2),
            named(data, dataclasses.replace(cfg, max_epochs=10, log_dir="y"), "guided", 2)]
    assert set(same) == {name}
    assert named(data, dataclasses.replace(cfg, options={"epsilon": 0.1}), "vanilla", 2) == named(data, cfg,
                                                                                                 "vanilla", 2)


# --------------------------------------------------------------------------- end to end on the embedded data
def small_model(num_classes):
    return mmtm_convnet(num_classes, widths=(4, 8, 8))


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    return DataConfig.smoke(data_dir=str(tmp_path_factory.mktemp("data")), batch_size=16)


def test_train_run_and_cur_come_from_the_best_checkpoint_on_the_test_set(tmp_path, smoke_data, monkeypatch):
    """Validation peaks at epoch 2 of 3: d_speed and the CUR must come from that epoch's best.pt, on the test set."""
    real = train_module.evaluate
    scripted = iter([0.3, 0.9, 0.5])

    def fake_evaluate(model, loader, *args, **kwargs):
        res = real(model, loader, *args, **kwargs)
        return {**res, "acc": next(scripted)} if loader is current["val"] else res

    current = {}
    real_build = train_module.Trainer.__init__

    def spy_init(self, model, train_loader, cfg, val_loader=None, *args, **kwargs):
        current["val"] = val_loader
        real_build(self, model, train_loader, cfg, val_loader, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    monkeypatch.setattr(train_module.Trainer, "__init__", spy_init)
    cfg = TrainConfig.smoke(max_epochs=3, log_dir=str(tmp_path / "logging"), ckpt_dir=str(tmp_path / "ckpt"),
                            eval_test=True)
    the_run = Run(smoke_data, dataclasses.replace(cfg, algorithm="vanilla", seed=0), small_model, "small", "cpu",
                  progress=False)
    run = the_run.train()
    monkeypatch.setattr(train_module, "evaluate", real)
    epochs = read_epochs(run["log_dir"])
    assert run["best_epoch"] == 2 and run["d_speed"] == epochs[1]["d_speed"] != epochs[2]["d_speed"]
    loaded = []
    monkeypatch.setattr(runs_module, "load_checkpoint", lambda path, **kw: loaded.append(str(path)) or
                        load_checkpoint(path, **kw))
    out = the_run.utilization(run)
    assert [p.split("/")[-1] for p in loaded] == ["best.pt"]

    # by hand: best.pt's weights, squeeze means over D_train, then the test set in fused and cut mode
    loaders = build_loaders(smoke_data, "cpu", 0, progress=False)
    model = small_model(len(loaders.classes))
    best = load_checkpoint(run["best_path"])
    assert best["epoch"] == 2
    model.load_state_dict(best["model"])
    compute_squeeze_means(model, loaders.train_eval)
    model.eval()

    def accuracies(loader):
        x0 = torch.cat([b[0] for b in loader])
        x1 = torch.cat([b[1] for b in loader])
        y = torch.cat([b[2] for b in loader])
        with torch.no_grad():
            f0, f1 = model(x0, x1, FusionMode.FUSED)
            c0, c1 = model(x0, x1, FusionMode.CUT)
        acc = lambda out: (out.argmax(1) == y).double().mean().item()
        return acc((f0 + f1) / 2), acc(f0), acc(f1), acc(c0), acc(c1)

    test = accuracies(loaders.test)
    assert_close((out["acc"], out["acc0"], out["acc1"], out["acc0_cut"], out["acc1_cut"]), test)
    u10, u01 = (test[1] - test[3]) / test[1], (test[2] - test[4]) / test[2]
    assert_close((out["u_m1_m0"], out["u_m0_m1"]), (u10, u01))
    if out["d_util_undefined"]:  # a smoke-sized run may leave a head at chance: then d_util is marked, not 0
        assert math.isnan(out["d_util"]) and "at chance" in out["d_util_undefined"]
    else:
        assert_close(out["d_util"], u10 - u01)
    assert accuracies(loaders.val) != test  # the check can tell the test set from the validation set
    last = load_checkpoint(tmp_path / "ckpt" / run["run_name"] / "last.pt")
    assert any(not torch.equal(v, best["model"][k]) for k, v in last["model"].items())  # last.pt would differ
    saved = json.loads((tmp_path / "logging" / run["run_name"] / "cur.json").read_text())
    assert saved["u_m1_m0"] == out["u_m1_m0"] and saved["d_util_undefined"] == out["d_util_undefined"]
    assert saved["d_util"] == out["d_util"] or (math.isnan(saved["d_util"]) and math.isnan(out["d_util"]))


def test_run_one_records_a_failure_and_the_next_run_goes_on(tmp_path, smoke_data, monkeypatch):
    cfg = TrainConfig.smoke(max_epochs=1, log_dir=str(tmp_path / "logging"), ckpt_dir=str(tmp_path / "ckpt"))

    def exploding(num_classes):
        raise RuntimeError("boom")

    trained, failed = Run(smoke_data, dataclasses.replace(cfg, algorithm="vanilla", seed=0), exploding, "x", "cpu",
                          progress=False).measure()
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom" and "boom" in failed["traceback"]
    assert trained is failed  # a training failure is also the measured record
    trained, ok = Run(smoke_data, dataclasses.replace(cfg, algorithm="vanilla", seed=1), small_model, "small", "cpu",
                      progress=False).measure()
    assert ok["status"] == "ok" and 0 <= ok["acc"] <= 1 and len(trained["history"]) == 1 and "history" not in ok
    row = summarize([failed, ok])["vanilla"]
    assert row["failed"] == [0] and row["acc"][2] == 1


# ------------------------------------------------------------------------------------------------- figures
def test_mode_spans():
    modes = ["fused", "rebalance_m0", "rebalance_m0", "fused", "rebalance_m1", "rebalance_m0"]
    assert _mode_spans(modes) == [("rebalance_m0", 2, 3), ("rebalance_m1", 5, 5), ("rebalance_m0", 6, 6)]
    assert _mode_spans(["fused"] * 3) == []


def test_pick_examples_uses_the_classes_present():
    labels = np.array([0, 0, 2, 2, 3, 5, 5])  # classes 1 and 4 have no objects (their folders were missing)
    assert pick_examples(labels, 4) == [0, 2, 4, 5]
    assert pick_examples(labels, 10) == [0, 2, 4, 5]
    assert pick_examples(np.array([3, 3]), 4) == [0]


def test_plots_draw_what_they_are_given():
    steps = [{"step": i + 1, "d_speed": 0.01 * i, "mode": m}
             for i, m in enumerate(["fused", "rebalance_m0", "rebalance_m0", "fused", "rebalance_m1"])]
    fig = plot_d_speed({"vanilla": steps[:1], "guided": steps}, epsilon=0.01)
    ax_v, ax_g = fig.axes
    spans = lambda ax: [p for p in ax.patches if isinstance(p, Rectangle) and p.get_alpha() == 0.25]
    assert len(spans(ax_v)) == 0 and len(spans(ax_g)) == 2
    np.testing.assert_allclose(ax_g.lines[0].get_ydata(), [0, 0.01, 0.02, 0.03, 0.04])

    hist = [{"epoch": e, "train_loss": 1 / e, "val_loss": 2 / e, "val_acc": 0.1 * e, "val_acc0": 0.05 * e,
             "val_acc1": 0.02 * e} for e in (1, 2, 3)]
    uni = [{"epoch": e, "train_loss": 1 / e, "val_loss": 2 / e, "val_acc": 0.2 * e} for e in (1, 2, 3)]
    fig = plot_learning_curves({"vanilla": hist, "unimodal_m0": uni})
    assert len(fig.axes) == 3 and fig.axes[0].get_yscale() == "log"
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(fig.axes[1].lines[1].get_ydata(), [0.2, 0.4, 0.6])
    assert len(fig.axes[2].lines) == 2  # branch accuracies exist for the two-branch run only

    fig = plot_d_util({"vanilla": [-0.4, -0.2], "guided": [0.0]}, {"vanilla": -0.1})
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights[:2], [-0.3, 0.0])

    images = np.zeros((2, 12, 1, 8, 8), np.uint8)
    fig = plot_views(images, ["a_0001", "b_0001"], ["a", "b"], views=(0, 6))
    assert len(fig.axes) == 24 and fig.axes[0].get_title() == "view 0 (m0)" and fig.axes[6].get_title() == "view 6 (m1)"


def test_read_steps_skips_gap_records(tmp_path):
    (tmp_path / "steps.jsonl").write_text('{"gap": [1, 4]}\n{"step": 5, "d_speed": 0.1}\n')
    assert read_steps(tmp_path) == [{"step": 5, "d_speed": 0.1}]


def test_colored_digits_vanilla_falls_for_the_color_shortcut(tmp_path):
    """SPEC Sec. 10: the color predicts the label in training only; after a few epochs the vanilla two-branch model's
    fused test accuracy is far below the gray uni-modal network's (the direction of the paper's Table 1)."""
    data = DataConfig.smoke_digits(data_dir=str(tmp_path / "data"))
    cfg = TrainConfig.for_dataset("colored_digits", max_epochs=2, progress=False, eval_test=False,
                                  log_dir=str(tmp_path / "logging"), ckpt_dir=str(tmp_path / "ckpt"))
    _, runs = run_all(data, cfg, ["unimodal_m1", "vanilla"], [0], device="cpu", progress=False)
    gray, vanilla = (r["acc"] for r in runs)
    assert all(r["status"] == "ok" for r in runs)
    assert vanilla < gray - 0.2, (vanilla, gray)
    assert runs[1]["acc1"] > vanilla  # its gray branch alone does better than the color-led fused prediction


def test_format_table_orders_rows_as_the_paper_whatever_the_mapping_order():
    row = {"runs": 1, "failed": [], **{k: (0.5, 0.0, 1) for k in ("acc", "acc0", "acc1", "u_m1_m0", "u_m0_m1",
                                                                   "d_util", "d_speed")}}
    table = {name: row for name in ("guided", "random", "rubi", "unimodal_m1", "vanilla")}  # sorted, as in JSON
    rows = [line.split(" | ")[0].strip("| ").split(" (")[0] for line in format_table(table).splitlines()[2:]]
    assert rows == ["unimodal_m1", "vanilla", "rubi", "random", "guided"]
