"""The notebook top to bottom with papermill on a tiny embedded setting, twice: the second run resumes."""
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(DATASET="embedded", IMAGE_SIZE=32, BATCH_SIZE=16, LR=0.05, MOMENTUM=0.9, MAX_EPOCHS=2, SEEDS=[0],
            ALGORITHMS=["vanilla", "random", "guided"], EMBEDDED_PER_CLASS=16, EMBEDDED_TEST_PER_CLASS=4, NUM_WORKERS=0, PROGRESS=False)


def execute(tmp_path: Path, out_name: str) -> dict:
    import papermill as pm

    params = dict(TINY, DATA_DIR=str(tmp_path / "data"), LOG_DIR=str(tmp_path / "logging"),
                  CKPT_DIR=str(tmp_path / "checkpoints"))
    pm.execute_notebook(str(ROOT / "greedy_multimodal.ipynb"), str(tmp_path / out_name), parameters=params,
                        cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    return json.loads((tmp_path / "logging" / "results.json").read_text())


@pytest.mark.slow
def test_notebook_runs_and_resumes(tmp_path):
    pytest.importorskip("papermill")
    results = execute(tmp_path, "first.ipynb")
    runs = results["runs"]
    assert sorted(r["algorithm"] for r in runs) == ["guided", "random", "vanilla"]
    for r in runs:
        for k in ("acc", "acc0", "acc1", "acc0_cut", "acc1_cut"):
            assert 0.0 <= r[k] <= 1.0, (r["algorithm"], k, r[k])
        assert math.isnan(r["d_util"]) or -1.0 <= r["d_util"] <= 1.0
        steps = (Path(r["log_dir"]) / "steps.jsonl").read_text().splitlines()
        assert len(steps) == r["steps"] > 0  # one CLS record per training step
        assert all("d_speed" in json.loads(line) for line in steps[:3])
    assert set(results["summary"]) == {"vanilla", "random", "guided"}
    assert len(results["figures"]) == 4
    for fig in results["figures"]:
        assert Path(fig).stat().st_size > 5000  # a real PNG, not an empty canvas
    executed = json.loads((tmp_path / "first.ipynb").read_text())
    assert not any(o.get("output_type") == "error" for c in executed["cells"] for o in c.get("outputs", []))

    again = execute(tmp_path, "second.ipynb")  # same settings: every run resumes from its checkpoint
    assert again["steps_this_call"] == 0
    assert [r["steps"] for r in again["runs"]] == [r["steps"] for r in runs]
    assert [r["d_util"] for r in again["runs"]] == pytest.approx([r["d_util"] for r in runs], nan_ok=True)
