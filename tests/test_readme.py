"""The user's manual stays true: the own-model example (docs/own_model.md) runs as written, and every number between
`<!-- generated -->` markers in README.md and docs/*.md equals what its committed results file renders."""
from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
OWN_MODEL = README.parent / "docs" / "own_model.md"


def example_code(marker: str) -> str:
    """The ```python block that follows `<!-- example: {marker} -->` in docs/own_model.md."""
    text = OWN_MODEL.read_text()
    match = re.search(rf"<!-- example: {re.escape(marker)} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/own_model.md has no python block after <!-- example: {marker} -->"
    return match.group(1)


def test_the_readmes_own_data_example_trains_logs_and_measures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example_code("own data"), str(OWN_MODEL), "exec"), namespace)
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


# ------------------------------------------------------------------------- numbers generated from the results files
def readme_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_tool", README.parent / "tools" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_block_matches_its_results_file():
    """`make readme` on a clean checkout changes nothing: each block equals what its results file renders."""
    tool = readme_tool()
    for page in tool.pages():
        text = page.read_text()
        for match in tool.BLOCK.finditer(text):
            assert match["name"] in tool.BLOCKS, f"{page.name}: block {match['name']!r} has no renderer"
            expected = tool.BLOCKS[match["name"]]().strip("\n")
            assert match["body"].rstrip("\n") == expected, f"{page.name}: block {match['name']!r} is stale: run `make readme`"


def test_a_block_follows_its_results_file(tmp_path, monkeypatch):
    tool = readme_tool()
    monkeypatch.setattr(tool, "RESULTS", tmp_path)
    row = lambda mean, std: [mean, std, 3]  # noqa: E731
    summary = {alg: {"runs": 3, "failed": [], "undefined": 0, **{k: row(0.5, 0.1) for k in
                                                                 ("acc0", "acc1", "u_m1_m0", "u_m0_m1", "d_speed")},
                     "acc": row(acc, 0.01), "d_util": row(d, 0.05)} for alg, acc, d in
               (("vanilla", 0.80, -0.6), ("guided", 0.95, -0.1))}
    runs = [{"algorithm": alg, "status": "ok", "acc": acc, "d_util": d, "seed": s} for s in range(3)
            for alg, acc, d in (("vanilla", 0.80 + 0.01 * s, -0.6), ("guided", 0.95, -0.1 - 0.01 * s))]
    (tmp_path / "embedded.json").write_text(json.dumps({"summary": summary, "runs": runs, "seeds": [0, 1, 2]}))
    page = "intro\n<!-- generated: embedded-verdict -->\nold text\n<!-- /generated: embedded-verdict -->\nend\n"
    out = tool.render(page)
    assert "old text" not in out and out.startswith("intro\n") and out.endswith("end\n")
    assert "guided's mean |d_util| is 0.11 against vanilla's 0.60" in out and "larger than the seed spread" in out
    assert tool.render(out) == out  # rendering is idempotent
    text = out.replace("0.60", "0.61")  # a number typed by hand is overwritten
    assert tool.render(text) == out


def test_the_readme_is_a_short_manual_whose_links_resolve():
    text = README.read_text()
    assert len(text) <= 12_500, f"README.md has {len(text)} characters: move details to docs/ (about 12,000 at most)"
    for link in re.findall(r"\]\(((?:docs/)[^)#]+)", text):
        assert (README.parent / link).exists(), f"README links {link}, which does not exist"
    for page in sorted((README.parent / "docs").glob("*.md")):
        for link in re.findall(r"\]\(([\w./-]+\.(?:md|png))\)", page.read_text()):
            assert (page.parent / link).exists() or (README.parent / link).exists(), f"{page.name} links {link}"
