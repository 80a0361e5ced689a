"""The paper's studies as data (paper Sec. 6.2-6.3, Appendix B; SPEC Sec. 11): the ModelNet40 grids (the
defaults) and presets for the colored digits. Where the paper's extracted text lost an interval, ours is named so.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from ..config import TrainConfig
from ..data.registry import get_dataset
from ..methods.base import methods
from .grid import PAIR_KINDS, Grid, Study, log_space

# The grids come by dataset family (a dataset spec's `family`): "renders" (ModelNet40 and the embedded stand-in) and
# "digits" (colored MNIST and the scikit-learn digits).
# Learning rates of the greedy-learner study (Sec. 6.2). ModelNet40: 9 log-spaced values; the paper's interval was
# lost in extraction, 1e-3..1 is ours. Colored MNIST: 20 values (the paper samples them at random on a log scale;
# we space them evenly) over our interval 1e-3..1e-1 around its preset 0.01.
GREEDY_LRS = {"renders": log_space(1e-3, 1.0, 9), "digits": log_space(1e-3, 1e-1, 20)}
GREEDY_SEEDS = {"renders": (0, 1, 2), "digits": (0, 1, 2, 3)}
# L1 strengths of the regularization study (Sec. 6.3): ten log-spaced values; the interval 1e-6..1e-3 is ours
# (at 1e-6 the penalty barely moves ResNet18's 22M weights in 300 epochs of lr 0.1; at 1e-3 it zeroes most).
REGULARIZATION_L1S = log_space(1e-6, 1e-3, 10)
# The paper's optimizer for the regularization study (Sec. 6.3), on every dataset: SGD lr 0.1, no momentum, batch 8.
PAPER_REG_LR = 0.1
PAPER_REG_DATA = {"batch_size": 8}
PAPER_REG_TRAIN = {"momentum": 0.0}
# Sparsity threshold tau: rho = share of parameters with |theta| < tau (the paper's value was lost; ours).
TAU = 1e-3
# The sensitivity study's grids are the methods' own (`Method.sweeps`): guided's epsilon and W (Fig. 9), OGM-GE's alpha
# and Gradient Blending's n (SPEC Sec. 12; not in the paper).

EXPECTATIONS = {
    "greedy_learner": "Identical pairs give d_util distributed symmetrically around 0 (mean ≈ 0); distinct pairs "
                      "give an asymmetric distribution (|mean| ≈ 0.1 on ModelNet40, 0.3 on colored MNIST), and "
                      "d_speed's distribution mirrors d_util's: the conditional learning speed predicts the "
                      "conditional utilization rate.",
    "regularization": "The sparsity rho grows with lambda, and so does |d_util| (with d_speed following the same "
                      "trend): strong regularization encourages greediness. A lambda that zeroes the fusion leaves "
                      "d_util undefined (nothing is left to cut), not 0.",
    "sensitivity": "Fig. 9 shows guided training's test accuracy and d_util over a range of epsilon and of W; the "
                   "paper states no trend in its text, and uses epsilon = 0.01, W = 5 on ModelNet40. The balancers' "
                   "alpha (OGM-GE) and n (Gradient Blending) are not in the paper.",
}


def greedy_learner(dataset: str = "modelnet40", lrs: Optional[Sequence[float]] = None,
                   seeds: Optional[Sequence[int]] = None, pairs: Sequence[Any] = PAIR_KINDS,
                   name: Optional[str] = None, **shared: Any) -> Study:
    """The greedy-learner study (Sec. 6.2, Fig. 2): vanilla over learning rates x seeds x {distinct, identical}.

    Args:
        dataset: DataConfig.dataset.
        lrs, seeds: the grid (None: the paper's for the dataset, GREEDY_LRS and GREEDY_SEEDS).
        pairs: pair kinds or explicit views.
        name: the study's name (default "greedy_learner_<dataset>").
        shared: further Study fields (data, train, tau).
    Returns:
        The Study, drawing the "pairs" and "cls_cur" figures.
    """
    family = get_dataset(dataset).family
    grid = Grid(datasets=(dataset,), pairs=tuple(pairs), algorithms=("vanilla",),
                lrs=tuple(lrs if lrs is not None else GREEDY_LRS[family]),
                seeds=tuple(seeds if seeds is not None else GREEDY_SEEDS[family]))
    return Study(name or f"greedy_learner_{dataset}", (grid,), figures=("pairs", "cls_cur"),
                 expectation=EXPECTATIONS["greedy_learner"], **{"tau": TAU, **shared})


def regularization(dataset: str = "modelnet40", l1s: Optional[Sequence[float]] = None,
                   seeds: Sequence[int] = (0, 1, 2), lr: Optional[float] = None, pairs: Sequence[Any] = ("distinct",),
                   name: Optional[str] = None, **shared: Any) -> Study:
    """The regularization study (Sec. 6.3, Figs. 4 and 8): vanilla with an L1 penalty over lambda x seeds, under the
    paper's optimizer on every dataset (SPEC Sec. 11): SGD lr 0.1, no momentum, batch 8 — these win over the
    shared settings of the other studies (`shared`'s data and train), so pass `lr` to change the learning rate.

    Args:
        dataset: DataConfig.dataset.
        l1s: the lambdas (None: REGULARIZATION_L1S; the grid should reach a lambda that collapses the fusion).
        seeds: the seeds (at least 3 for a mean +- std).
        lr: the learning rate (None: the paper's 0.1).
        pairs: pair kinds or explicit views.
        name: the study's name (default "regularization_<dataset>").
        shared: further Study fields (data, train, tau).
    Returns:
        The Study, drawing the "regularization" figure (CLS vs. CUR is tested on unregularized runs only:
        `greedymm.study.stats.cls_cur_population`).
    """
    shared = {**shared, "data": {**shared.get("data", {}), **PAPER_REG_DATA},
              "train": {**shared.get("train", {}), **PAPER_REG_TRAIN}}
    grid = Grid(datasets=(dataset,), pairs=tuple(pairs), algorithms=("vanilla",),
                lrs=(lr if lr is not None else PAPER_REG_LR,), seeds=tuple(seeds),
                l1s=tuple(l1s if l1s is not None else REGULARIZATION_L1S))
    return Study(name or f"regularization_{dataset}", (grid,), figures=("regularization",),
                 expectation=EXPECTATIONS["regularization"], **{"tau": TAU, **shared})


def sensitivity(dataset: str = "modelnet40", sweeps: Optional[Mapping[str, Optional[Sequence[Any]]]] = None,
                seeds: Sequence[int] = (0, 1, 2), held: Optional[Mapping[str, Any]] = None,
                name: Optional[str] = None, **shared: Any) -> Study:
    """The sensitivity study (Fig. 9) of every registered method's `sweeps`: guided over epsilon at a fixed W and
    over W at a fixed epsilon; the balancers' analogues (SPEC Sec. 12): OGM-GE over alpha, Gradient Blending over n.

    Args:
        dataset: DataConfig.dataset.
        sweeps: setting -> values replacing a method's default grid (None: the default; an empty list drops a sweep
            of its own, e.g. {"ogm_alpha": []} runs no OGM-GE).
        seeds: the seeds.
        held: setting -> the value a paired sweep holds fixed (None: the dataset's preset, SPEC Sec. 6 and 10).
        name: the study's name (default "sensitivity_<dataset>").
        shared: further Study fields (data, train, tau).
    Returns:
        The Study (one grid per sweep), drawing the "sensitivity" figure.
    """
    family = get_dataset(dataset).family
    preset = TrainConfig.for_dataset(dataset)
    sweeps, held = dict(sweeps or {}), dict(held or {})
    common = dict(datasets=(dataset,), seeds=tuple(seeds))
    grids = []
    for method_name, method in methods().items():
        for sweep in method.sweeps:
            given = sweeps.get(sweep.setting)
            values = tuple(given) if given is not None else sweep.grid(family)
            options = {sweep.setting: values}
            if sweep.hold is not None:  # a pair of sweeps: the other setting at its preset
                options[sweep.hold] = (held[sweep.hold] if held.get(sweep.hold) is not None
                                       else preset.option(sweep.hold),)
            elif not values:
                continue
            grids.append(Grid(algorithms=(method_name,), options=options, **common))
    return Study(name or f"sensitivity_{dataset}", tuple(grids), figures=("sensitivity",),
                 expectation=EXPECTATIONS["sensitivity"], **{"tau": TAU, **shared})


def paper_studies(dataset: str = "modelnet40", **shared: Any) -> Dict[str, Study]:
    """The three studies of the paper with their default grids for a dataset.

    Args:
        dataset: DataConfig.dataset ("modelnet40" for the paper's grids).
        shared: Study fields for all three (data, train, tau).
    Returns:
        {"greedy_learner": ..., "regularization": ..., "sensitivity": ...}.
    """
    return {"greedy_learner": greedy_learner(dataset, **shared), "regularization": regularization(dataset, **shared),
            "sensitivity": sensitivity(dataset, **shared)}
