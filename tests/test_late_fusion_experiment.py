"""Late fusion in the notebooks, the command, the table, the figures and the studies (SPEC Sec. 13): the FUSION and
GREEDY_FUSIONS settings, the Shapley and probe columns, the robustness figure, and a small table on late_concat."""
import json
import math

import pytest
from matplotlib.figure import Figure

from greedymm.__main__ import _run_plan, parser
from greedymm.config import DataConfig, TrainConfig
from greedymm.experiment.params import experiment_plan, parameter_defaults, study_plan
from greedymm.experiment.runs import run_all
from greedymm.experiment.table import format_table, summarize
from greedymm.plots import plot_robustness
from greedymm.study.grid import expand
from greedymm.study.runner import study_table


def measured(alg, seed, shapley0=0.2, probe0=0.8):
    return {"algorithm": alg, "seed": seed, "status": "ok", "acc": 0.9, "acc0": 0.8, "acc1": 0.7, "u_m1_m0": 0.1,
            "u_m0_m1": 0.2, "d_util": -0.1, "d_speed": 0.0, "shapley0": shapley0, "shapley1": 0.3,
            "probe0": probe0, "probe1": 0.6, "robust_sigmas": [0.0, 0.25, 0.5, 1.0, 2.0, "cut"],
            "robust0": [0.9, 0.8, 0.7, 0.5, 0.3, 0.4], "robust1": [0.9, 0.9, 0.8, 0.8, 0.7, 0.6]}


def test_table_shows_shapley_and_probe_columns_only_when_the_runs_have_them():
    runs = [measured("vanilla", 0, 0.2, 0.8), measured("vanilla", 1, 0.4, 0.6)]
    table = summarize(runs)
    assert table["vanilla"]["shapley0"][:2] == pytest.approx((0.3, 0.1))
    text = format_table(table)
    head = text.splitlines()[0]
    assert "φ0 %" in head and "φ1 %" in head and "probe m0 %" in head and "probe m1 %" in head
    row = text.splitlines()[2].split(" | ")
    assert row[head.split(" | ").index("φ0 %")] == "30.00 ± 10.00"
    assert row[head.split(" | ").index("probe m0 %")] == "70.00 ± 10.00"
    old = [{k: v for k, v in r.items() if not k.startswith(("shapley", "probe", "robust"))} for r in runs]
    assert "φ0" not in format_table(summarize(old)) and "probe" not in format_table(summarize(old))


def test_robustness_figure_has_a_panel_per_row_and_a_curve_per_modality():
    fig = plot_robustness({"vanilla": [measured("vanilla", 0), measured("vanilla", 1)],
                           "guided": [measured("guided", 0)]})
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    ax = fig.axes[0]
    means = [line for line in ax.lines if line.get_linewidth() == 2]
    assert len(means) == 2 and list(means[0].get_ydata()) == [0.9, 0.8, 0.7, 0.5, 0.3, 0.4]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.25", "0.5", "1", "2", "cut"]


def test_fusion_setting_in_the_notebook_plan_and_the_command():
    values = dict(parameter_defaults(), DATASET="colored_digits", FUSION="late_sum")
    assert experiment_plan(values).train.fusion == "late_sum"
    assert experiment_plan(parameter_defaults()).train.fusion == "mmtm"
    with pytest.raises(ValueError, match="fusion='early' is unknown"):
        experiment_plan(dict(values, FUSION="early"))
    plan = _run_plan(parser().parse_args(["run", "--dataset", "colored_digits", "--fusion", "late_concat"]))
    assert plan.train.fusion == "late_concat"


def test_greedy_fusions_make_one_greedy_learner_study_per_fusion(tmp_path):
    values = dict(parameter_defaults(studies=True), DATASET="colored_digits", GREEDY_LRS=[0.01], GREEDY_SEEDS=[0],
                  GREEDY_FUSIONS=["mmtm", "late_concat"], REGULARIZATION=False, SENSITIVITY=False)
    plan = study_plan(values)
    assert list(plan.studies) == ["greedy_learner", "greedy_learner_late_concat"]
    mmtm, late = plan.studies["greedy_learner"], plan.studies["greedy_learner_late_concat"]
    assert mmtm.name == "greedy_learner_colored_digits" and "fusion" not in mmtm.train
    assert late.name == "greedy_learner_colored_digits_late_concat" and late.train["fusion"] == "late_concat"
    specs_m, specs_l = expand(mmtm, tmp_path), expand(late, tmp_path)
    assert [s.settings()["fusion"] for s in specs_m] == ["mmtm", "mmtm"]
    assert [s.settings()["fusion"] for s in specs_l] == ["late_concat", "late_concat"]
    assert not {s.run_name for s in specs_m} & {s.run_name for s in specs_l}
    assert study_table("greedy_learner_late_concat", []).startswith(study_table("greedy_learner", [])[:20])
    with pytest.raises(ValueError, match="GREEDY_FUSIONS"):
        study_plan(dict(values, GREEDY_FUSIONS=["early"]))


def test_a_small_late_fusion_table_records_fusion_and_measures(tmp_path):
    data = DataConfig.smoke()
    train = TrainConfig.smoke(fusion="late_concat", log_dir=str(tmp_path / "l"), ckpt_dir=str(tmp_path / "c"))
    trained, runs = run_all(data, train, ["vanilla", "unimodal_m0"], [0], device="cpu", progress=False)
    assert all(r["status"] == "ok" for r in runs), [r.get("error") for r in runs]
    late = runs[0]
    assert late["fusion"] == "late_concat" and late["run_name"] != trained[1]["run_name"]
    for k in ("shapley0", "shapley1", "probe0", "probe1", "u_m1_m0", "u_m0_m1"):
        assert math.isfinite(late[k]), k
    assert len(late["robust0"]) == 6 and late["robust_sigmas"][-1] == "cut"
    config = json.loads((tmp_path / "l" / late["run_name"] / "config.json").read_text())
    assert config["train"]["fusion"] == "late_concat" and config["identity"]["train"]["fusion"] == "late_concat"
    assert math.isnan(runs[1]["shapley0"])  # the uni-modal row: no modality measures


def test_the_docs_late_fusion_example_runs(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "late_fusion.md"
    code = re.search(r"<!-- example: late fusion -->\s*```python\n(.*?)```", doc.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(doc), "exec"), namespace)
    steps = [json.loads(line) for line in open(tmp_path / "logging" / "my_late_run" / "steps.jsonl")]
    assert len(steps) == 18 and all("d_speed" in s for s in steps)
    printed = capsys.readouterr().out
    for key in ("'u_m1_m0'", "'d_util'", "'shapley0'", "'probe1'", "'robust0'"):
        assert key in printed
    assert namespace["model"].fusion == "late_concat"


def test_the_command_lists_the_fusions(capsys):
    from greedymm.__main__ import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    block = out.split("fusions (--fusion, FUSION):\n")[1].split("datasets")[0]
    assert [line.split()[0] for line in block.strip().splitlines()] == ["mmtm", "late_concat", "late_sum"]
