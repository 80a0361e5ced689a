"""Write the README's (and docs pages') generated blocks from the committed results files: every number and table
between `<!-- generated: NAME -->` and `<!-- /generated: NAME -->` comes from docs/results/*.json or bench/results.json
through the package's own table code, so nothing is typed by hand and nothing goes stale.

    python tools/readme.py            rewrite the blocks of README.md and docs/*.md (`make readme`)
    python tools/readme.py --check    exit 1, naming the file, when a block differs from its results file
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from greedymm.experiment.table import format_table, paper_column, table_order  # noqa: E402
from greedymm.study.figures import summary_table  # noqa: E402
from greedymm.study.runner import study_table  # noqa: E402
from greedymm.study.stats import cls_cur_correlations, mean_std  # noqa: E402

RESULTS = ROOT / "docs" / "results"
BENCH = ROOT / "bench" / "results.json"
PAGES = ("README.md", "docs/*.md")
# a block's body holds whole lines (none, when it was never rendered)
BLOCK = re.compile(r"<!-- generated: (?P<name>[\w-]+) -->\n(?P<body>(?:.*?\n)??)<!-- /generated: (?P=name) -->", re.S)
Renderer = Callable[[], str]
BLOCKS: Dict[str, Renderer] = {}


def block(name: str) -> Callable[[Renderer], Renderer]:
    """Register the renderer of the blocks called `name`."""
    def register(fn: Renderer) -> Renderer:
        BLOCKS[name] = fn
        return fn
    return register


def load(name: str) -> dict:
    """docs/results/<name>.json."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def bench() -> dict:
    return json.loads(BENCH.read_text())


def stats(values: Sequence[float]) -> tuple:
    """(mean, population std, n) over the finite values (greedymm.study.stats.mean_std); NaN mean when none."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return (*mean_std(vals), len(vals)) if vals else (math.nan, math.nan, 0)


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """"mean ± std" (population std over seeds) of the finite values."""
    mean, std, n = stats(values)
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}" if n else "n/a"


def runs_of(results: dict, algorithm: str, key: str, absolute: bool = False) -> List[float]:
    vals = [r.get(key, math.nan) for r in results["runs"] if r["algorithm"] == algorithm and r["status"] == "ok"]
    return [abs(v) for v in vals] if absolute else vals


def protocol_line(results: dict) -> str:
    """The run's settings in one line: seeds, size, epochs, model, device, date, wall time."""
    s = results.get("settings", {})
    data, train = s.get("data", {}), s.get("train", {})
    model = s.get("model") or "the dataset's model"
    return (f"{len(results['seeds'])} seeds; {data.get('image_size')} px, batch {data.get('batch_size')}, "
            f"SGD lr {train.get('lr')}, momentum {train.get('momentum')}, at most {s.get('max_epochs')} epochs; "
            f"model `{model}`; {results.get('device_name', results.get('device'))}, torch {results.get('torch')}, "
            f"{results.get('date')}, {results.get('wall_s', 0) / 60:.1f} min for the notebook")


# ------------------------------------------------------------------------------------------------ make run (embedded)
@block("embedded-table")
def embedded_table() -> str:
    results = load("embedded")
    return format_table(results["summary"], paper_column("embedded")) + "\n\n" + protocol_line(results) + "."


def compact_table(results: dict, paper: Optional[dict] = None) -> str:
    """The README's short table: per row, seeds, fused accuracy, the two rates and d_util (mean ± std over seeds),
    and beside them the paper's accuracy and our distance to it; the full table is on docs/results.md."""
    table = results["summary"]
    cols = ["row", "seeds", "acc %", "u(m1\\|m0)", "u(m0\\|m1)", "d_util"] + (["paper acc %", "ours − paper"] if paper else [])
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for alg in table_order(list(table)):
        row = table[alg]
        cell = lambda k, scale=1.0, digits=3: (f"{scale * row[k][0]:.{digits}f} ± {scale * row[k][1]:.{digits}f}"  # noqa: E731
                                               if k in row and row[k][2] > 0 else "n/a")
        d = cell("d_util") + (f" ({row['undefined']} undef.)" if row.get("undefined") else "")
        best = alg.startswith("unimodal") and alg == max((a for a in table if a.startswith("unimodal")),
                                                         key=lambda a: table[a]["acc"][0])
        name = f"{alg} (best)" if best else alg
        line = f"| {name} | {row['acc'][2]} | {cell('acc', 100, 1)} | {cell('u_m1_m0')} | {cell('u_m0_m1')} | {d} |"
        if paper:
            ref = paper.get("unimodal" if best else alg, {}) if (best or not alg.startswith("unimodal")) else {}
            line += (f" {ref['acc'][0]:.1f} | {100 * row['acc'][0] - ref['acc'][0]:+.1f} |" if "acc" in ref else " | |")
        lines.append(line)
    return "\n".join(lines)


@block("embedded-compact")
def embedded_compact() -> str:
    results = load("embedded")
    return compact_table(results) + "\n\n" + protocol_line(results) + "."


@block("digits-compact")
def digits_compact() -> str:
    results = load("colored_digits")
    return compact_table(results, paper_column("colored_digits")) + "\n\n" + protocol_line(results) + "."


@block("embedded-verdict")
def embedded_verdict() -> str:
    results = load("embedded")
    d_v, d_g = stats(runs_of(results, "vanilla", "d_util", True)), stats(runs_of(results, "guided", "d_util", True))
    a_v, a_g = stats(runs_of(results, "vanilla", "acc")), stats(runs_of(results, "guided", "acc"))
    d_margin, a_margin = d_v[0] - d_g[0], a_g[0] - a_v[0]

    def versus(margin: float, spread: float) -> str:
        return "larger than" if margin > spread else "within"

    return (f"Over {d_v[2]} seeds guided's mean |d_util| is {d_g[0]:.2f} against vanilla's {d_v[0]:.2f}: a margin of "
            f"{d_margin:.2f}, {versus(d_margin, max(d_v[1], d_g[1]))} the seed spread (std up to "
            f"{max(d_v[1], d_g[1]):.2f}). Its mean fused test accuracy is {100 * a_g[0]:.1f}% against vanilla's "
            f"{100 * a_v[0]:.1f}%: a margin of {100 * a_margin:+.1f} points, {versus(a_margin, max(a_v[1], a_g[1]))} "
            f"the seed spread (std up to {100 * max(a_v[1], a_g[1]):.1f} points).")


@block("robustness")
def robustness() -> str:
    b = bench()
    names = {"threads2": "2 threads (reference)", "threads1": "1 thread", "perturbed": "weights + 1e-7·N(0, 1)"}
    lines = ["| numerics | vanilla acc % | guided acc % | vanilla \\|d_util\\| | guided \\|d_util\\| | guided ≥ vanilla "
             "in acc | guided < vanilla in \\|d_util\\| |", "|---|---|---|---|---|---|---|"]
    for cond, label in names.items():
        k = f"robustness.{cond}."
        if k + "acc_margin" not in b:
            continue

        def cell(m: str, what: str, scale: float = 1.0, digits: int = 2) -> str:
            return f"{scale * b[k + m + '_' + what + '_mean']:.{digits}f} ± {scale * b[k + m + '_' + what + '_std']:.{digits}f}"

        def verdict(holds: str, over: str, margin: str, scale: float, unit: str) -> str:
            return (("yes" if b[k + holds] else "**no**") + f", margin {scale * b[k + margin]:+.2f}{unit}"
                    + (" > spread" if b[k + over] else " ≤ spread"))

        lines.append(f"| {label} | {cell('vanilla', 'acc', 100, 1)} | {cell('guided', 'acc', 100, 1)} | "
                     f"{cell('vanilla', 'abs_d_util')} | {cell('guided', 'abs_d_util')} | "
                     f"{verdict('acc_holds', 'acc_margin_over_spread', 'acc_margin', 100, ' pts')} | "
                     f"{verdict('abs_d_util_holds', 'abs_d_util_margin_over_spread', 'abs_d_util_margin', 1, '')} |")
    seeds = b.get("robustness.threads2.seeds")
    return "\n".join(lines) + f"\n\n`make bench` (bench/bench_robustness.py), {seeds} seeds per method and condition."


# ------------------------------------------------------------------------------------------ make run-digits (digits)
@block("digits-table")
def digits_table() -> str:
    results = load("colored_digits")
    return format_table(results["summary"], paper_column("colored_digits")) + "\n\n" + protocol_line(results) + "."


@block("digits-gap")
def digits_gap() -> str:
    results, paper = load("colored_digits"), paper_column("colored_digits")
    table = results["summary"]
    best = max((r for r in ("unimodal_m0", "unimodal_m1") if r in table), key=lambda r: table[r]["acc"][0])
    lines = ["| row | ours, acc % | paper, acc % | ours − paper |", "|---|---|---|---|"]
    for alg, ref in ((best, paper["unimodal"]), *((a, paper[a]) for a in ("vanilla", "rubi", "random", "guided"))):
        if alg not in table:
            continue
        mean, std, n = table[alg]["acc"]
        label = f"uni-modal (best: {alg})" if alg == best else alg
        lines.append(f"| {label} | {100 * mean:.2f} ± {100 * std:.2f} | {ref['acc'][0]:.2f} ± {ref['acc'][1]:.2f} | "
                     f"{100 * mean - ref['acc'][0]:+.2f} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- make studies (studies)
def study_records(key: str) -> List[dict]:
    return load("studies")["studies"][key]["records"]


@block("studies-greedy")
def studies_greedy() -> str:
    return study_table("greedy_learner", study_records("greedy_learner"))


@block("studies-cls-cur")
def studies_cls_cur() -> str:
    cls_cur = load("studies")["cls_cur"]
    return "\n".join(f"- {'all runs of the population' if k == 'all' else k + ' pairs'}: Spearman "
                     f"{v['spearman']:+.2f} over {v['n']} runs" for k, v in cls_cur.items() if k != "figure")


def late_greedy_studies() -> Dict[str, List[dict]]:
    """The greedy-learner studies on late fusion (GREEDY_FUSIONS): {fusion: records}."""
    studies = load("studies")["studies"]
    return {k[len("greedy_learner_"):]: v["records"] for k, v in studies.items() if k.startswith("greedy_learner_")}


@block("studies-greedy-late")
def studies_greedy_late() -> str:
    """The greedy-learner table and CLS -> CUR correlations of each late-fusion study (SPEC Sec. 13)."""
    parts = []
    for fusion, records in late_greedy_studies().items():
        corr = cls_cur_correlations(records)
        parts.append(f"**{fusion}**:\n\n" + study_table("greedy_learner", records) + "\n\nCLS -> CUR on " + fusion
                     + ": " + "; ".join(f"{'all runs' if k == 'all' else k + ' pairs'}: Spearman {rho:+.2f} over "
                                        f"{n} runs" for k, (rho, n) in corr.items()) + ".")
    return "\n\n".join(parts) or "(no late-fusion study in the results file)"


@block("studies-regularization")
def studies_regularization() -> str:
    return study_table("regularization", study_records("regularization"))


@block("studies-sensitivity")
def studies_sensitivity() -> str:
    return study_table("sensitivity", study_records("sensitivity"))


@block("studies-time")
def studies_time() -> str:
    s = load("studies")
    parts = [f"{k.replace('_', ' ')} {v['runs']} runs in {v['wall_s'] / 60:.1f} min" for k, v in s["studies"].items()]
    return f"With the `{s['executor']}` executor: " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------- make balancers (balancers)
@block("balancers-tables")
def balancers_tables() -> str:
    """One table per dataset and fusion (every method over its seeds), then which methods beat vanilla by more than
    the seed spread on the weak modality's use (|d_util|) and on accuracy."""
    tables = load("balancers")["tables"]
    parts = []
    for key in sorted(tables):
        results = tables[key]
        dataset, fusion = key.split("/")
        parts.append(f"**{dataset}, {fusion}** ({len(results['seeds'])} seeds):\n\n"
                     + format_table(results["summary"], paper_column(dataset) if fusion == "mmtm" else None))
        parts.append(balancer_verdict(results))
    return "\n\n".join(parts)


@block("balancers-summary")
def balancers_summary() -> str:
    """One compact table: per method, mean fused accuracy and mean |d_util| for each dataset and fusion."""
    tables = load("balancers")["tables"]
    keys = sorted(tables)
    methods: List[str] = []
    for key in keys:
        methods += [m for m in tables[key]["summary"] if m not in methods]
    methods = table_order(methods)
    head = "| method | " + " | ".join(k.replace("/", ", ") for k in keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]
    for method in methods:
        cells = []
        for key in keys:
            results = tables[key]
            acc = runs_of(results, method, "acc")
            d = [v for v in runs_of(results, method, "d_util", True) if math.isfinite(v)]
            cells.append(f"{pm(acc, 100, 1)} / {pm(d) if d else 'undef.'}" if acc else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    seeds = sorted({len(tables[k]["seeds"]) for k in keys})
    return "\n".join(lines) + f"\n\nEach cell: fused test accuracy % / \\|d_util\\|, mean ± std over {'/'.join(map(str, seeds))} seeds."


def balancer_verdict(results: dict) -> str:
    """Per method against vanilla: lower mean |d_util| and higher mean accuracy, each by more than the larger std."""
    if not runs_of(results, "vanilla", "acc"):
        return "(no vanilla row to compare with)"
    d_v, a_v = stats(runs_of(results, "vanilla", "d_util", True)), stats(runs_of(results, "vanilla", "acc"))
    use, acc_only, neither = [], [], []
    for method in table_order(list(results["summary"])):
        d_vals = runs_of(results, method, "d_util", True)
        if method == "vanilla" or not [v for v in d_vals if math.isfinite(v)]:
            continue
        d, a = stats(d_vals), stats(runs_of(results, method, "acc"))
        balances = d_v[0] - d[0] > max(d_v[1], d[1])
        more_acc = a[0] - a_v[0] > max(a_v[1], a[1])
        (use if balances else acc_only if more_acc else neither).append(
            f"{method} (|d_util| {d[0]:.2f} vs {d_v[0]:.2f}, acc {100 * a[0]:.1f}% vs {100 * a_v[0]:.1f}%)")
    said = lambda xs: "; ".join(xs) if xs else "none"  # noqa: E731
    return (f"Against vanilla, by more than the seed spread. Lower |d_util| (the modalities used more evenly): "
            f"{said(use)}. Higher accuracy only: {said(acc_only)}. Neither: {said(neither)}.")


# ------------------------------------------------------------------------------------------------ make bench (bench)
# (what the figure is, the reference to compare it with): the value column comes from bench/results.json.
BENCH_ROWS = (
    ("data.loader_samples_per_s_224", "two views, batch 8, float output, no workers (samples/s)",
     "authors' loader ≈ 370 (unpickles all 12 views, PIL per image); target ≥ 1,500"),
    ("data.loader_uint8_samples_per_s_224", "the same, uint8 as shipped to a GPU (samples/s)", "target ≥ 7,500"),
    ("data.cache_build_objects_per_s", "cache build, 224 px, 12 views, PNG tree, both cores, forkserver (objects/s)",
     "authors' build ≈ 60 (one process); target ≥ 100"),
    ("data.cache_build_objects_per_s_fork", "the same with fork workers (objects/s)", ""),
    ("data.workers2_first_batch_s_forkserver", "two loader workers, first batch, forkserver (s)", ""),
    ("data.workers2_first_batch_s_fork", "the same with fork (s)", ""),
    ("data.embedded_build_s", "the embedded dataset's build, `DataConfig.quick()` (s)", ""),
    ("data.colored_digits_build_s", "the scikit-learn digits at 28 px, painted and cached (s)", ""),
    ("data.colored_loader_samples_per_s", "digit loader, batch 128, float (samples/s)", ""),
    ("train.step_ms_vanilla_224_b8", "a vanilla step, ResNet18 pair, batch 8, 224², CLS off (ms)", ""),
    ("train.step_ms_rubi_224_b8", "RUBi's step, with its uni-modal bias pass (ms)", "target ≤ 1.05 × vanilla"),
    ("train.step_ms_ogm_ge_224_b8", "OGM-GE's step (ms)", "target ≤ 1.05 × vanilla"),
    ("train.step_ms_gblend_224_b8", "Gradient Blending's step (ms)", "target ≤ 1.05 × vanilla"),
    ("train.step_ms_unimodal_224_b8", "a uni-modal network's step (ms)", ""),
    ("train.ogm_ge_hook_ms_224_b8", "OGM-GE's modulation and noise alone (ms)", ""),
    ("train.cls_ms_224_b8", "μ of the four groups and the speeds, timed alone (ms)", "authors' ≈ 16 ms"),
    ("train.cls_overhead_pct", "the CLS's share of a step (%)", "authors' 1.8 %; target ≤ 1 %"),
    ("study.runs_per_hour_local", "study runs per hour, `local` executor", ""),
    ("study.runs_per_hour_processes", "the same, `processes`", ""),
    ("study.runs_per_hour_ray", "the same, `ray`", ""),
)


def number(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


@block("bench-table")
def bench_table() -> str:
    b = bench()
    lines = ["| figure | what | this machine | reference |", "|---|---|---|---|"]
    for key, what, ref in BENCH_ROWS:
        if key in b:
            lines.append(f"| `{key}` | {what} | {number(b[key])} | {ref} |")
    return "\n".join(lines) + f"\n\nDevice: {b.get('train.device', 'cpu')}; study setup: {b.get('study.bench_setup', '')}."


@block("methods-cost")
def methods_cost() -> str:
    """Each method's training step beside vanilla's, per fusion (bench/bench_methods.py)."""
    b = bench()
    ratios = {k[len("methods.ratio_"):]: v for k, v in b.items() if k.startswith("methods.ratio_")}
    fusions = sorted({k.rsplit("_", 2)[-2] + "_" + k.rsplit("_", 1)[-1] if k.endswith("_concat") or k.endswith("_sum")
                      else k.rsplit("_", 1)[-1] for k in ratios})
    methods = []
    for k in ratios:
        m = next(k[: -len(f) - 1] for f in fusions if k.endswith("_" + f))
        methods += [m] if m not in methods else []
    lines = ["| method | " + " | ".join(f"step vs vanilla, {f}" for f in fusions) + " |", "|---|" + "---|" * len(fusions)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{ratios[f'{m}_{f}']:.2f}×" if f"{m}_{f}" in ratios else ""
                                              for f in fusions) + " |")
    return "\n".join(lines) + f"\n\n`bench/bench_methods.py` on {b.get('methods.device', 'cpu')}; medians, side by side."


# --------------------------------------------------------------------------------------- the make targets' wall times
@block("targets")
def targets() -> str:
    def minutes(name: str) -> str:
        try:
            return f"{load(name)['wall_s'] / 60:.0f} min"
        except (FileNotFoundError, KeyError):
            return "n/a"

    try:
        studies = load("studies")
        study_min = f"{sum(v['wall_s'] for v in studies['studies'].values()) / 60:.0f} min"
    except (FileNotFoundError, KeyError):
        study_min = "n/a"
    return "\n".join([
        "| command | what it runs | measured here (2 CPU cores) |", "|---|---|---|",
        f"| `make run` | the notebook on the generated embedded dataset (`notebook_embedded.yaml`) | "
        f"{minutes('embedded')} + install |",
        f"| `make run-digits` | the notebook on the colored scikit-learn digits (`notebook_digits.yaml`) | "
        f"{minutes('colored_digits')} |",
        f"| `make studies` | `paper_studies.ipynb`, the paper's three studies (`studies_embedded.yaml`) | {study_min} |",
        "| `make balancers` | every registered method, 3 seeds, colored digits and embedded | see docs/balancers.md |",
        "| `make bench` | the benchmarks, into `bench/results.json` | |",
        "| `make publish`, `make readme` | copy results into `docs/results/`, rewrite the README's numbers | seconds |"])


def render(text: str, where: str = "README.md") -> str:
    """`text` with every generated block rewritten by its renderer."""
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"{where}: block {name!r} has no renderer; known: {', '.join(sorted(BLOCKS))}")
        return f"<!-- generated: {name} -->\n{BLOCKS[name]().strip(chr(10))}\n<!-- /generated: {name} -->"
    return BLOCK.sub(fill, text)


def pages() -> List[Path]:
    return [p for pattern in PAGES for p in sorted(ROOT.glob(pattern))]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text, str(page.relative_to(ROOT)))
        if new != text:
            stale.append(str(page.relative_to(ROOT)))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"stale generated blocks in {', '.join(stale)}: run `make readme`")
        return 1
    print(("rewrote " if stale else "up to date: ") + ", ".join(stale or [str(p.relative_to(ROOT)) for p in pages()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
