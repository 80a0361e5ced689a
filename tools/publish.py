"""Copy what `make run`, `make run-digits`, `make studies` and `make balancers` left under logging/ into the committed
results files (docs/results/*.json) and figures (docs/figures/), from which `make readme` writes the README's numbers.

Only what a reader needs is kept: settings, summaries and per-run figures, no local paths or tracebacks. A source that
is missing is skipped with a note (publish what you ran).

    python tools/publish.py [--log-dir logging] [embedded colored_digits studies balancers]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from greedymm.io import read_jsonl, write_text  # noqa: E402

RESULTS = ROOT / "docs" / "results"
FIGURES = ROOT / "docs" / "figures"
# Record fields a reader does not need (local paths, machine names, errors' stack traces, nested identities).
DROPPED = ("log_dir", "best_path", "traceback", "host", "history", "data", "train", "key")
TABLES = ("embedded", "colored_digits")  # the notebook's results_<dataset>.json files
BALANCER_FIGURES = ("d_util", "robustness")  # the figures of make balancers' tables that the docs show


def slim(record: Dict[str, Any]) -> Dict[str, Any]:
    """A record without the fields in DROPPED, floats rounded to 6 digits (NaN kept: JSON writes NaN)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isfinite(v):
            return round(v, 6)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    return {k: clean(v) for k, v in record.items() if k not in DROPPED}


def dump(obj: Any, path: Path) -> Path:
    """Write JSON (sorted keys, indented) atomically."""
    return write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", path)


def copy_figure(src: Path, name: str) -> str:
    """Copy a figure into docs/figures/ under `name`; the path the README links."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, FIGURES / name)
    return f"docs/figures/{name}"


def publish_table(log_dir: Path, name: str) -> Path:
    """logging/results_<name>.json (the notebook's, or the command's) -> docs/results/<name>.json and its figures."""
    results = json.loads((log_dir / f"results_{name}.json").read_text())
    figures = [copy_figure(Path(f), Path(f).name) for f in results.get("figures", []) if Path(f).exists()]
    out = {**{k: v for k, v in results.items() if k not in ("runs", "figures")},
           "runs": [slim(r) for r in results["runs"]], "figures": figures}
    return dump(out, RESULTS / f"{name}.json")


def publish_balancers(log_dir: Path) -> Path:
    """logging/balancers/<fusion>/results_<dataset>.json (make balancers) -> docs/results/balancers.json, one table per
    dataset and fusion."""
    tables = {}
    for path in sorted((log_dir / "balancers").glob("*/results_*.json")):
        results = json.loads(path.read_text())
        key = f"{path.stem[len('results_'):]}/{path.parent.name}"
        figures = [copy_figure(Path(f), f"balancers_{path.parent.name}_{Path(f).name}")
                   for f in results.get("figures", []) if Path(f).exists() and Path(f).stem.endswith(BALANCER_FIGURES)]
        tables[key] = {**{k: v for k, v in results.items() if k not in ("runs", "figures")},
                       "runs": [slim(r) for r in results["runs"]], "figures": figures}
    if not tables:
        raise FileNotFoundError(2, "no results", str(log_dir / "balancers" / "<fusion>" / "results_<dataset>.json"))
    return dump({"tables": tables}, RESULTS / "balancers.json")


def publish_studies(log_dir: Path) -> Path:
    """logging/studies/summary.json and each study's runs.jsonl -> docs/results/studies.json and the figures."""
    summary = json.loads((log_dir / "studies" / "summary.json").read_text())
    studies: Dict[str, Any] = {}
    for key, study in summary["studies"].items():
        records: List[dict] = read_jsonl(study["runs_jsonl"], missing_ok=True)
        figures = [copy_figure(Path(p), f"studies_{key}_{Path(p).name}") for p in study["figures"].values()
                   if Path(p).exists()]
        studies[key] = {**{k: v for k, v in study.items() if k not in ("runs_jsonl", "figures")},
                        "records": [slim(r) for r in records], "figures": figures}
    cls_cur = dict(summary.get("cls_cur", {}))
    if cls_cur.get("figure") and Path(cls_cur["figure"]).exists():
        cls_cur["figure"] = copy_figure(Path(cls_cur["figure"]), "studies_cls_cur_population.png")
    out = {**{k: v for k, v in summary.items() if k not in ("studies", "cls_cur")}, "studies": studies,
           "cls_cur": cls_cur}
    return dump(out, RESULTS / "studies.json")


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", default="logging", help="where the make targets wrote their results")
    parser.add_argument("what", nargs="*", default=[*TABLES, "studies", "balancers"], help="what to publish")
    args = parser.parse_args(argv)
    log_dir = Path(args.log_dir)
    for what in args.what:
        try:
            publisher = {"studies": publish_studies, "balancers": publish_balancers}.get(what)
            path = publisher(log_dir) if publisher else publish_table(log_dir, what)
        except FileNotFoundError as err:
            print(f"{what}: not published ({err.filename} is missing: run its make target first)")
            continue
        print(f"{what}: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
