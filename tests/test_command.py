"""The command (issue 17): `python -m greedymm list | run | study`, called in-process through `main(argv)`; the
settings are the notebooks' parameters, checked with the notebooks' messages (exit status 2)."""
from __future__ import annotations

import json

import pytest

from greedymm.__main__ import main
from greedymm.data import dataset_names
from test_registry import toy  # noqa: F401  (the fixture: a toy dataset small enough for a quick table)
from greedymm.experiment.params import check_parameters, experiment_plan, parameter_defaults
from greedymm.experiment.table import format_table, paper_column, summarize
from greedymm.methods import methods

TINY = dict(DATASET="embedded", IMAGE_SIZE=16, BATCH_SIZE=8, MAX_EPOCHS=1, EMBEDDED_PER_CLASS=2,
            EMBEDDED_TEST_PER_CLASS=1, NUM_WORKERS=0, EVAL_TEST=False, PROGRESS=False)


def test_list_names_every_method_and_dataset(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, method in methods().items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert method.label in line and ("paper's Table 1" in line) == method.paper_row
    assert "epsilon=0.01 (EPSILON)" in out and "ogm_alpha=0.1 (OGM_ALPHA)" in out
    for name in dataset_names():
        assert f"\n  {name} " in out


@pytest.mark.parametrize("args, values", [
    (["--set", "SEEDS=[0, '1']"], dict(SEEDS=[0, "1"])),
    (["--set", "LR='0.1'"], dict(LR="0.1")),
    (["--set", "ALGORITHMS=[greedy]"], dict(ALGORITHMS=["greedy"])),
    (["--methods", "greedy"], dict(ALGORITHMS=["greedy"], UNIMODAL=False)),
    (["--dataset", "cifar"], dict(DATASET="cifar")),
    (["--seeds"], None),
])
def test_bad_settings_print_the_notebooks_message_and_exit_2(args, values, capsys):
    if values is None:  # argparse's own refusal
        with pytest.raises(SystemExit) as exit_:
            main(["run", *args])
        assert exit_.value.code == 2
        return
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    with pytest.raises((TypeError, ValueError)) as notebook:  # what the notebook says for the same settings
        check_parameters({**parameter_defaults(), **values})
        experiment_plan({**parameter_defaults(), **values})
    assert err.strip() == f"error: {notebook.value}"


def test_settings_the_notebook_does_not_have_are_refused(tmp_path, capsys):
    config = tmp_path / "settings.yaml"
    config.write_text("DATASET: embedded\nLEARNING_RATE: 0.1\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "['LEARNING_RATE'] are not settings of the notebook; allowed: DATASET" in capsys.readouterr().err
    assert main(["run", "--set", "LR"]) == 2
    assert "must be NAME=VALUE" in capsys.readouterr().err
    assert main(["study", "--set", "EXECUTOR=slurm"]) == 2
    assert "EXECUTOR='slurm' is unknown" in capsys.readouterr().err
    assert main(["study", "--only", "fig9"]) == 2
    assert "the plan's studies are greedy_learner, regularization, sensitivity" in capsys.readouterr().err


def test_run_prints_the_table_and_writes_the_results_file(toy, tmp_path, capsys):
    dirs = dict(DATA_DIR=str(tmp_path / "data"), LOG_DIR=str(tmp_path / "logging"), CKPT_DIR=str(tmp_path / "ck"))
    config = tmp_path / "tiny.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**TINY, "DATASET": "toy", **dirs}.items()))
    assert main(["run", "--config", str(config), "--methods", "unimodal_m1", "vanilla", "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "logging" / "results_toy.json").read_text())
    assert results["rows"] == ["unimodal_m1", "vanilla"] and results["seeds"] == [0]
    assert set(results) == {"dataset", "fusion", "views", "device", "seeds", "rows", "runs", "summary", "figures",
                            "steps_this_call", "settings", "device_name", "torch", "date", "wall_s"}
    assert results["fusion"] == "mmtm"
    assert results["settings"]["data"]["dataset"] == "toy" and results["wall_s"] > 0
    assert len(results["figures"]) == 5 and all(r["status"] == "ok" for r in results["runs"])  # + robustness
    table = format_table(summarize(results["runs"]), paper_column("toy"))
    assert table in out and out.count("toy_vanilla_s0_") == 1  # the report line of the run
    assert "| unimodal_m1 (best) | 1 |" in table


def test_study_runs_the_notebooks_plan(tmp_path, capsys):
    config = tmp_path / "studies.yaml"
    settings = dict(TINY, DATA_DIR=str(tmp_path / "data"), LOG_DIR=str(tmp_path / "logging"),
                    CKPT_DIR=str(tmp_path / "ck"), MODEL="greedymm.models.zoo:mmtm_convnet", REG_L1S=[0.0, 0.001],
                    REG_SEEDS=[0], EXECUTOR="local")
    for k in ("NUM_WORKERS", "EVAL_TEST", "PROGRESS"):  # the main notebook's, not the studies'
        settings.pop(k)
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    assert main(["study", "--config", str(config), "--only", "regularization"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "logging" / "studies" / "summary.json").read_text())
    assert list(summary["studies"]) == ["regularization"] and summary["studies"]["regularization"]["ran"] == 2
    assert "| l1 | rho | d_util | d_util_last | d_speed | acc |" in out and "regularization_embedded: 2 runs recorded" in out


def test_methods_all_means_every_registered_two_branch_method():
    from greedymm.__main__ import _run_plan, parser

    plan = _run_plan(parser().parse_args(["run", "--dataset", "colored_digits", "--methods", "all"]))
    two_branch = [n for n, m in methods().items() if m.multimodal]
    assert list(plan.algorithms) == two_branch and "vanilla" in two_branch and "unimodal_m0" not in two_branch
