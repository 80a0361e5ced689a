"""The command beside the notebooks (paper Table 1, Sec. 6; SPEC Sec. 6-12): `python -m greedymm list | run | study`;
`run` trains and prints one table as greedy_multimodal.ipynb does, `study` runs paper_studies.ipynb's studies, both
with the notebooks' parameters (a YAML file, `--set NAME=VALUE`), checks and messages; bad settings exit with 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .config import option_defaults
from .data.registry import datasets
from .experiment.params import (experiment_plan, notebook_setup, parameter_defaults, parameter_spec,
                                study_plan)
from .experiment.pipeline import report_line, run_table
from .methods.base import methods
from .registry import FUSIONS
from .study.runner import (POOLED, pooled_cls_cur, record_line, result_line, result_summary, run_study,
                           study_table, write_summary)


class SettingsError(ValueError):
    """Settings the command cannot use: reported on stderr, exit status 2."""


def list_lines() -> List[str]:
    """The registered methods (label, paper row, settings and defaults), fusions and datasets (views, model,
    presets)."""
    defaults = option_defaults()
    lines = ["methods (--methods; a setting by --set NAME=VALUE, its notebook parameter):"]
    for name, m in methods().items():
        settings = ", ".join(f"{f.name}={defaults[f.name]!r}" + (f" ({f.metadata['param']})"
                                                                  if f.metadata.get("param") else "")
                             for f in dataclasses.fields(m.Settings)) or "no settings"
        where = "paper's Table 1" if m.paper_row else "not in the paper"
        lines.append(f"  {name:<12} {m.label} ({where}{'' if m.multimodal else ', uni-modal'}): {settings}")
    lines.append("fusions (--fusion, FUSION):")
    lines += [f"  {name:<12} {spec.label}: {spec.description}" for name, spec in FUSIONS.items()]
    lines.append("datasets (--dataset):")
    for name, spec in datasets().items():
        preset = {**spec.data_preset, **spec.train_preset}
        lines.append(f"  {name:<15} {spec.num_views} views, m0/m1 = views {spec.default_views}, {spec.image_size} "
                     f"px, model {spec.default_model}; preset {preset or 'the paper protocol (SPEC Sec. 6)'}")
    return lines


def _settings(config: Optional[str], sets: Sequence[str], studies: bool) -> Dict[str, Any]:
    """The notebook's defaults, then the YAML file's settings, then the --set ones (values read as YAML)."""
    import yaml

    values = parameter_defaults(studies)
    known = parameter_spec(studies)
    given: Dict[str, Any] = {}
    if config:
        with open(config) as f:
            given.update(yaml.safe_load(f) or {})
    for item in sets:
        name, sep, text = item.partition("=")
        if not sep:
            raise SettingsError(f"--set {item!r} must be NAME=VALUE, e.g. --set LR=0.05 or --set 'SEEDS=[0, 1]'")
        given[name.strip()] = yaml.safe_load(text)
    unknown = [k for k in given if k not in known]
    if unknown:
        raise SettingsError(f"{unknown} are not settings of the {'studies ' if studies else ''}notebook; allowed: "
                            f"{', '.join(known)}")
    return {**values, **given}


def _run_plan(args: argparse.Namespace) -> Any:
    values = _settings(args.config, args.set, studies=False)
    if args.dataset is not None:
        values["DATASET"] = args.dataset
    if args.methods is not None:  # exactly these rows; "all": every registered two-branch method
        rows = [n for n, m in methods().items() if m.multimodal] if args.methods == ["all"] else list(args.methods)
        values.update(ALGORITHMS=rows, UNIMODAL=False)
    if args.seeds is not None:
        values["SEEDS"] = list(args.seeds)
    if args.fusion is not None:
        values["FUSION"] = args.fusion
    return experiment_plan(values)


def _run(plan: Any) -> int:
    device, version = notebook_setup()
    print(version)
    print(f"dataset {plan.data.dataset}: views {plan.data.views}, {plan.data.image_size} px, batch "
          f"{plan.data.batch_size}; rows: {', '.join(plan.algorithms)}; seeds {plan.seeds}")
    exp, table, failures = run_table(plan, device, report=lambda run: print(report_line(run), flush=True))
    print(table)
    for line in failures:
        print(line)
    print(f"results: {exp.results_path}; figures: {', '.join(exp.figures)}")
    return 0


def _study_plan(args: argparse.Namespace) -> Any:
    values = _settings(args.config, args.set, studies=True)
    plan = study_plan(values)
    unknown = [k for k in args.only or () if k not in plan.studies]
    if unknown:
        raise SettingsError(f"--only {unknown}: the plan's studies are {', '.join(plan.studies)}")
    return values["DATASET"], plan


def _study(args: argparse.Namespace, dataset: str, plan: Any) -> int:
    _, version = notebook_setup(studies=True)
    print(version)
    results, pooled = {}, []
    for key, study in plan.studies.items():
        if args.only and key not in args.only:
            continue
        print(f"{study.name}: {study.size()} runs", flush=True)
        start = time.perf_counter()
        result = run_study(study, plan.executor, plan.log_dir, plan.ckpt_dir, plan.data_dir,
                           callback=lambda record: print(record_line(record), flush=True))
        wall = time.perf_counter() - start
        print(result_line(result, wall, plan.executor.name))
        results[key] = result_summary(result, wall)
        print(study_table(key, result.records))
        if key in POOLED:
            pooled += result.records
    cls_cur, _ = pooled_cls_cur(pooled, plan.log_dir)
    for k, v in cls_cur.items():
        if k != "figure":
            print(f"CLS -> CUR, {k}: Spearman {v['spearman']:+.2f} over {v['n']} runs")
    print(f"summary: {write_summary(plan.log_dir, dataset, plan.executor.name, results, cls_cur=cls_cur)}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(prog="python -m greedymm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registered methods and datasets")
    run = sub.add_parser("run", help="train and measure one table, as greedy_multimodal.ipynb")
    run.add_argument("--dataset", help="DATASET (default: the YAML file's, else modelnet40)")
    run.add_argument("--methods", nargs="+", metavar="M", help="exactly these rows (ALGORITHMS, UNIMODAL off); all: every registered two-branch method")
    run.add_argument("--seeds", nargs="+", type=int, metavar="S", help="SEEDS")
    run.add_argument("--fusion", help="FUSION: mmtm (default), late_concat or late_sum")
    study = sub.add_parser("study", help="run the studies of paper_studies.ipynb")
    study.add_argument("--only", nargs="+", metavar="STUDY",
                       help="greedy_learner (greedy_learner_<fusion> with GREEDY_FUSIONS), regularization, sensitivity")
    for s in (run, study):
        s.add_argument("--config", metavar="FILE.yaml", help="notebook parameters (a papermill -f file)")
        s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="a notebook parameter, its value read as YAML (repeatable)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command with `argv` (sys.argv[1:] when None); returns the exit status."""
    args = parser().parse_args(argv)
    if args.command == "list":
        print("\n".join(list_lines()))
        return 0
    try:  # the settings: their errors carry the notebooks' messages
        plan = _run_plan(args) if args.command == "run" else _study_plan(args)
    except (SettingsError, TypeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _run(plan) if args.command == "run" else _study(args, *plan)


if __name__ == "__main__":
    sys.exit(main())
