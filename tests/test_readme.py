"""The README's own-data example runs as written: the user's manual must stay true to the package's API."""
from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def example_code(marker: str) -> str:
    """The ```python block that follows `<!-- example: {marker} -->` in the README."""
    text = README.read_text()
    match = re.search(rf"<!-- example: {re.escape(marker)} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no python block after <!-- example: {marker} -->"
    return match.group(1)


def test_the_readmes_own_data_example_trains_logs_and_measures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example_code("own data"), "README.md", "exec"), namespace)
    out = namespace["result"]
    steps = [json.loads(line) for line in open(tmp_path / "logging" / "my_run" / "steps.jsonl")]
    assert len(steps) == 3 * 6 and steps[-1]["step"] == 18  # 3 epochs of 6 batches, CLS every step
    assert {"mode", "d_speed", "s_m1_m0", "s_m0_m1"} <= set(steps[-1])
    assert steps[-1]["mode"] in ("fused", "rebalance_m0", "rebalance_m1")
    assert out.best_path.is_file() and (tmp_path / "checkpoints" / "my_run" / "last.pt").is_file()
    printed = capsys.readouterr().out
    for key in ("acc0_cut", "u_m1_m0", "u_m0_m1", "d_util"):
        assert f"'{key}'" in printed
    d_util = float(re.search(r"'d_util': (nan|-?[\d.e-]+)", printed).group(1))
    undefined = re.search(r"'d_util_undefined': '([^']*)'", printed).group(1)
    assert -1.0 <= d_util <= 1.0 if not undefined else (d_util != d_util and "at chance" in undefined)
    assert namespace["model"].mmtms["stage1"].fc_squeeze.in_features == 12 + 20  # C_A + C_B, inferred

