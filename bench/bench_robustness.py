"""Does `make run`'s conclusion survive changed numerics? (issue 16; paper Table 1's claim on the embedded dataset)

The protocol of `make run` (notebook_embedded.yaml), vanilla and guided over its seeds, trained three times in one
invocation: with 2 CPU threads (the reference), with 1 thread (other reduction orders in the kernels, as another CPU
gives), and with every initial weight perturbed by 1e-7 * N(0, 1). For each: mean and std over the seeds of the
fused test accuracy and of |d_util|, and whether the conclusion holds with a margin larger than the seed spread:
guided's mean |d_util| below vanilla's and guided's mean accuracy at least vanilla's.

Writes robustness.<condition>.<figure> to bench/results.json. About 15 minutes on 2 cores.
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import update_results  # noqa: E402
from greedymm.experiment.params import experiment_plan, parameter_defaults  # noqa: E402
from greedymm.experiment.runs import run_all  # noqa: E402
from greedymm.models.zoo import model_factory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("vanilla", "guided")
PERTURBATION = 1e-7  # std of the Gaussian added to every initial weight


def perturbed(factory, scale: float, seed: int = 0):
    """A model factory whose models get `scale` * N(0, 1) added to every parameter (a generator of their own)."""
    def build(num_classes: int):
        model = factory(num_classes)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=generator))
        return model
    return build


def conclusion(runs: list) -> dict:
    """Means, stds and margins of one condition's runs (failed or undefined runs counted, left out of the means)."""
    out = {}
    stats = {}
    for method in METHODS:
        rs = [r for r in runs if r["algorithm"] == method and r["status"] == "ok"]
        acc = np.array([r["acc"] for r in rs])
        d = np.array([abs(r["d_util"]) for r in rs])
        d = d[np.isfinite(d)]
        stats[method] = (acc.mean(), acc.std(), d.mean(), d.std())
        out.update({f"{method}_acc_mean": round(float(acc.mean()), 4), f"{method}_acc_std": round(float(acc.std()), 4),
                    f"{method}_abs_d_util_mean": round(float(d.mean()), 4),
                    f"{method}_abs_d_util_std": round(float(d.std()), 4), f"{method}_runs": len(rs),
                    f"{method}_d_util_defined": int(len(d))})
    v, g = stats["vanilla"], stats["guided"]
    acc_margin, d_margin = g[0] - v[0], v[2] - g[2]
    out.update(acc_margin=round(float(acc_margin), 4), abs_d_util_margin=round(float(d_margin), 4),
               acc_holds=bool(acc_margin >= 0), abs_d_util_holds=bool(d_margin > 0),
               acc_margin_over_spread=bool(acc_margin > max(v[1], g[1])),
               abs_d_util_margin_over_spread=bool(d_margin > max(v[3], g[3])))
    return out


def main() -> None:
    values = {**parameter_defaults(), **yaml.safe_load((ROOT / "notebook_embedded.yaml").read_text())}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for condition, threads, scale in (("threads2", 2, 0.0), ("threads1", 1, 0.0), ("perturbed", 2, PERTURBATION)):
            plan = experiment_plan({**values, "LOG_DIR": str(root / condition / "logging"),
                                    "CKPT_DIR": str(root / condition / "checkpoints"), "DATA_DIR": str(root / "data"),
                                    "PROGRESS": False})
            factory = model_factory(plan.model)
            if scale:
                factory, name = perturbed(factory, scale), f"{plan.model}+perturbed{scale:g}"
            else:
                name = plan.model
            torch.set_num_threads(threads)
            start = time.perf_counter()
            _, runs = run_all(plan.data, plan.train, METHODS, plan.seeds, "cpu", model_fn=factory, model_name=name,
                              progress=False)
            result = conclusion(runs)
            result.update(threads=threads, perturbation=scale, seeds=len(plan.seeds),
                          wall_s=round(time.perf_counter() - start, 1))
            figures.update({f"robustness.{condition}.{k}": v for k, v in result.items()})
            print(condition, result, flush=True)
    figures["robustness.protocol"] = "notebook_embedded.yaml (make run): vanilla and guided over its seeds, CPU"
    update_results(figures)


if __name__ == "__main__":
    main()
