"""The registries (issue 17): a method and a dataset defined in this file alone register themselves and run through
the notebook's plan, the table and `python -m greedymm run`; the checks that keep a registration consistent."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F
from matplotlib.colors import to_rgb

from greedymm.__main__ import main
from greedymm.config import DataConfig, TrainConfig, run_name
from greedymm.data import DatasetSpec, InputFormat, dataset_names, get_dataset, register_dataset, unregister_dataset
from greedymm.data.cache import write_cache
from greedymm.experiment.params import experiment_plan, parameter_defaults, parameter_spec
from greedymm.experiment.pipeline import run_table
from greedymm.experiment.table import format_table, summarize
from greedymm.methods import (Method, MethodSettings, get_method, method_names, register, setting,
                              unregister)
from greedymm.plots import plot_d_util


@dataclass
class ScaledSettings(MethodSettings):
    """The toy method's setting."""

    loss_scale: float = setting(0.5, param="LOSS_SCALE")  # multiplies vanilla's loss

    def validate(self) -> None:
        if not self.loss_scale > 0:
            raise ValueError(f"loss_scale={self.loss_scale} must be positive")


class ScaledVanilla(Method):
    """Vanilla with its loss scaled: a method defined outside the package."""

    name = "scaled_vanilla"
    label = "scaled vanilla"
    color = "tab:green"
    Settings = ScaledSettings

    def loss(self, out, y, ctx):
        loss0, loss1 = F.cross_entropy(out["y0"].float(), y), F.cross_entropy(out["y1"].float(), y)
        return self.settings.loss_scale * (loss0 + loss1), {"loss0": loss0, "loss1": loss1}


def build_toy_cache(cfg: DataConfig, cache_dir: Path, force: bool = False, progress: bool = True) -> Path:
    """Three classes of 8 px two-view objects, the class a bright patch in view 0 and a fainter one in view 1."""
    rng = np.random.default_rng(cfg.split_seed)
    splits = {}
    for split, n in (("train", 30), ("test", 12)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 60, (n, 2, 1, cfg.image_size, cfg.image_size)).astype(np.uint8)
        for v, level in ((0, 200), (1, 120)):
            images[np.arange(n), v, 0, labels * 2, :] = level
        splits[split] = (images, labels, [f"toy_{split}_{i}" for i in range(n)])
    return write_cache(cache_dir, splits, ["a", "b", "c"], {"kind": "toy"})


TOY = DatasetSpec(name="toy", num_views=2, default_views=(0, 1), image_size=8, val_fraction=0.25,
                  input_format=InputFormat(None, (0.2,), (0.3,), flip=False), cache_builder=build_toy_cache,
                  default_model="convnet", family="renders", identical_view=0,
                  train_preset=dict(lr=0.05, momentum=0.9, max_epochs=2))


@pytest.fixture
def toy():
    register(ScaledVanilla)
    register_dataset(TOY)
    yield
    unregister("scaled_vanilla")
    unregister_dataset("toy")


def test_a_method_and_a_dataset_from_outside_the_package_register(toy):
    assert method_names()[-1] == "scaled_vanilla" and get_method("scaled_vanilla") is ScaledVanilla
    assert dataset_names()[-1] == "toy" and get_dataset("toy") is TOY
    cfg = TrainConfig.for_dataset("toy", algorithm="scaled_vanilla", options={"loss_scale": 0.25, "epsilon": 0.3})
    assert cfg.identity()["loss_scale"] == 0.25 and "epsilon" not in cfg.identity() and cfg.lr == 0.05
    with pytest.raises(ValueError, match="loss_scale=0 must be positive"):
        TrainConfig(algorithm="vanilla", options={"loss_scale": 0})  # checked whichever method runs
    assert DataConfig(dataset="toy").image_size == 8 and DataConfig.for_dataset("toy").views == (0, 1)
    assert parameter_spec()["LOSS_SCALE"] == ("float", True) and parameter_defaults()["LOSS_SCALE"] is None
    assert plot_d_util({"scaled_vanilla": [0.1]}).axes[0].patches[0].get_facecolor()[:3] == to_rgb("tab:green")


def test_a_registered_method_runs_through_the_table_and_the_command(toy, tmp_path, capsys):
    settings = dict(DATASET="toy", ALGORITHMS=["vanilla", "scaled_vanilla"], UNIMODAL=False, SEEDS=[0],
                    LOSS_SCALE=0.25, DATA_DIR=str(tmp_path / "data"), LOG_DIR=str(tmp_path / "logging"),
                    CKPT_DIR=str(tmp_path / "checkpoints"), NUM_WORKERS=0, EVAL_TEST=False, PROGRESS=False)
    plan = experiment_plan({**parameter_defaults(), **settings})
    assert plan.algorithms == ["vanilla", "scaled_vanilla"] and plan.train.options == {"loss_scale": 0.25}
    exp, table, failures = run_table(plan, "cpu")
    assert failures == [] and [line.split(" | ")[0] for line in table.splitlines()[2:]] == [
        "| vanilla", "| scaled_vanilla"]
    scaled = next(r for r in exp.runs if r["algorithm"] == "scaled_vanilla")
    assert scaled["run_name"] == run_name(plan.data, dataclasses.replace(plan.train, algorithm="scaled_vanilla"))
    steps = [json.loads(line) for line in (Path(scaled["log_dir"]) / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(0.25 * (steps[0]["loss0"] + steps[0]["loss1"]), rel=1e-6)
    assert "d_speed" in steps[0]  # a two-branch method: the CLS is logged
    results = json.loads(exp.results_path.read_text())
    assert results["rows"] == plan.algorithms and len(results["figures"]) == 5  # + robustness
    # the command: the same table from the same runs (resumed), and the same results file
    capsys.readouterr()
    args = ["run", "--dataset", "toy", "--methods", "vanilla", "scaled_vanilla", "--seeds", "0"]
    args += [f"--set={k}={json.dumps(v)}" for k, v in settings.items() if k not in ("DATASET", "ALGORITHMS",
                                                                                       "UNIMODAL", "SEEDS")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert table in out and "results: " in out
    again = json.loads(exp.results_path.read_text())
    assert again["steps_this_call"] == 0 and again["summary"] == results["summary"]
    assert format_table(summarize(again["runs"])) == table


@pytest.mark.parametrize("change, message", [
    (dict(name=""), "must be a Method subclass with a name"),
    (dict(Settings=int), "Settings must be a dataclass derived from MethodSettings"),
    (dict(Settings=dataclasses.make_dataclass("S", [("epsilon", float, dataclasses.field(default=0.5))],
                                              bases=(MethodSettings,))), "differs from guided's"),
    (dict(name="vanilla"), "already registered"),
])
def test_inconsistent_registrations_are_refused(change, message):
    bad = type("Bad", (ScaledVanilla,), {"name": "bad", **change})
    with pytest.raises((TypeError, ValueError), match=message):
        register(bad)
    assert "bad" not in method_names()
