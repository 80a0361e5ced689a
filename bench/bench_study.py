"""Benchmark of the study executors (SPEC Sec. 11): the same tiny study run by `local`, `processes` and `ray` in one
invocation, so their throughputs compare side by side.

Writes study.runs_per_hour_local, study.runs_per_hour_processes, study.runs_per_hour_ray (absent without Ray) and
study.bench_setup to bench/results.json. Each executor trains the study from scratch in its own folders (the data
cache is shared and built first); the time includes starting its workers. Local runs use torch's default threads,
the workers one thread each, one worker per core.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import update_results  # noqa: E402
from greedymm.data import prepare_data  # noqa: E402
from greedymm.study import Grid, Study, expand, make_executor, run_study  # noqa: E402

RUNS = 8  # 2 learning rates x 4 seeds
# Runs the size of `make studies`' (its data, model and batch; 6 epochs instead of 12): with much smaller runs the
# workers' start-up would be all that is measured.
STUDY = Study("bench", (Grid(datasets=("embedded",), lrs=(0.05, 0.01), seeds=(0, 1, 2, 3)),),
              data=dict(image_size=32, embedded_per_class=40, embedded_test_per_class=20, batch_size=16),
              train=dict(max_epochs=6), model="greedymm.models.zoo:mmtm_convnet")


def runs_per_hour(executor, root: Path, data_dir: Path) -> float:
    start = time.perf_counter()
    result = run_study(STUDY, executor, root / "logging", root / "checkpoints", data_dir, save=False)
    wall = time.perf_counter() - start
    if result.ran != RUNS or result.failed:
        raise RuntimeError(f"{executor.name}: {result.ran} runs, {len(result.failed)} failed")
    return RUNS / wall * 3600


def main() -> None:
    cores = os.cpu_count() or 1
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_data(expand(STUDY, data_dir=root / "data")[0].data_config(), progress=False)
        executors = {"local": make_executor("local"), "processes": make_executor("processes", workers=cores, threads=1)}
        try:
            import ray  # noqa: F401

            executors["ray"] = make_executor("ray", num_cpus=cores, cpus_per_run=1, gpus_per_run=0)
        except ImportError:
            print("ray is not installed: study.runs_per_hour_ray skipped")
        for name, executor in executors.items():
            figures[f"study.runs_per_hour_{name}"] = round(runs_per_hour(executor, root / name, root / "data"), 1)
            print(f"{name}: {figures[f'study.runs_per_hour_{name}']} runs/hour")
    figures["study.bench_setup"] = (f"{RUNS} runs (embedded 32 px, 240 objects, 6 epochs, mmtm_convnet), {cores} "
                                    "cores, CPU")
    update_results(figures)


if __name__ == "__main__":
    main()
