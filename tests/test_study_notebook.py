"""paper_studies.ipynb top to bottom with papermill on a tiny grid (SPEC Sec. 11): every study runs, records its
runs, writes and displays its figures."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(DATASET="embedded", IMAGE_SIZE=16, BATCH_SIZE=8, MAX_EPOCHS=1, EMBEDDED_PER_CLASS=2,
            EMBEDDED_TEST_PER_CLASS=1, MODEL="greedymm.models.zoo:mmtm_convnet", GREEDY_LRS=[0.05], GREEDY_SEEDS=[0],
            GREEDY_PAIRS=["distinct", "identical"],
            REG_L1S=[0.0, 0.001], REG_SEEDS=[0], SENS_EPSILONS=[0.01, 1.0], SENS_WINDOWS=[5], SENS_ALPHAS=[0.5],
            SENS_PERIODS=[1], SENS_GAMMAS=[1.5], SENS_Q_BASES=[0.5], SENS_PMR_ALPHAS=[1.0], SENS_AGM_ALPHAS=[0.1],
            SENS_SEEDS=[0], EXECUTOR="local")


@pytest.mark.slow
def test_studies_notebook_runs(tmp_path):
    pm = pytest.importorskip("papermill")
    params = dict(TINY, DATA_DIR=str(tmp_path / "data"), LOG_DIR=str(tmp_path / "logging"),
                  CKPT_DIR=str(tmp_path / "checkpoints"))
    pm.execute_notebook(str(ROOT / "paper_studies.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                        cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    summary = json.loads((tmp_path / "logging" / "studies" / "summary.json").read_text())["studies"]
    assert {k: (v["runs"], v["ran"], v["failed"]) for k, v in summary.items()} == {
        "greedy_learner": (2, 2, 0),
        "regularization": (2, 2, 0), "sensitivity": (8, 8, 0)}
    for study in summary.values():
        lines = Path(study["runs_jsonl"]).read_text().splitlines()
        assert len(lines) == study["runs"] and all(json.loads(x)["status"] == "ok" for x in lines)
    figures = [Path(p) for s in summary.values() for p in s["figures"].values()]
    assert sorted(p.stem for p in figures) == ["cls_cur", "pairs", "regularization", "sensitivity"]
    cls_cur = json.loads((tmp_path / "logging" / "studies" / "summary.json").read_text())["cls_cur"]
    figures.append(Path(cls_cur["figure"]))  # the pooled population's CLS -> CUR figure
    assert cls_cur["all"]["n"] <= 3 and set(cls_cur) >= {"figure", "all"}  # 2 greedy + the lambda = 0 run
    assert all(p.stat().st_size > 5000 for p in figures)
    executed = json.loads((tmp_path / "out.ipynb").read_text())
    outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(figures)  # every figure shown inline
