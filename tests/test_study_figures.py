"""The studies' figures from a synthetic runs.jsonl (SPEC Sec. 11): the plotted numbers against hand values, and the
notebook's settings."""
from __future__ import annotations

import math

import numpy as np
import pytest

from greedymm.study import (cls_cur_correlations, cls_cur_population, plot_cls_cur, plot_pair_kinds,
                            plot_regularization, plot_sensitivity, spearman, summary_table)
from greedymm.study.figures import rank
from greedymm.study.records import append_record, read_records


def rec(**kw) -> dict:
    base = dict(status="ok", dataset="modelnet40", pair="distinct", algorithm="vanilla", seed=0, l1=0.0, tau=1e-3,
                epsilon=None, window=None, acc=0.9, d_util=0.0, d_speed=0.0, rho=0.0)
    return {**base, **kw}


@pytest.fixture
def records(tmp_path):
    """A runs.jsonl with hand-chosen figures, a failed run and a NaN, read back as the figures read it."""
    rows = [
        # greedy learner: distinct d_util 0.5, 0.3, -0.2 (mean 0.2); identical -0.1, 0.1 (mean 0)
        rec(pair="distinct", seed=0, d_util=0.5, d_speed=0.4), rec(pair="distinct", seed=1, d_util=0.3, d_speed=0.1),
        rec(pair="distinct", seed=2, d_util=-0.2, d_speed=-0.3),
        rec(pair="identical", seed=0, d_util=-0.1, d_speed=0.2), rec(pair="identical", seed=1, d_util=0.1,
                                                                     d_speed=math.nan),
        {"status": "failed", "dataset": "modelnet40", "pair": "distinct", "algorithm": "vanilla", "seed": 3,
         "error": "NonFiniteLossError: ..."},
    ]
    path = tmp_path / "runs.jsonl"
    for r in rows:
        append_record(path, r)
    return read_records(path)


def lines(ax, prefix):
    return {line.get_gid(): line for line in ax.get_lines() if (line.get_gid() or "").startswith(prefix)}


def test_rank_and_spearman_by_hand():
    np.testing.assert_array_equal(rank([10, 30, 20, 20]), [1, 4, 2.5, 2.5])
    # ranks x (1, 4, 2, 3), y (1, 3, 4, 2): d = (0, 1, -2, 1), rho = 1 - 6 * 6 / (4 * 15) = 0.4
    assert spearman([0.1, 0.4, 0.2, 0.3], [1, 3, 4, 2]) == pytest.approx(0.4)
    # ties: x ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([3, 2, 1], [1, 5, 9]) == pytest.approx(-1.0)  # monotone, not linear
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="paired"):
        spearman([1, 2], [1])


def test_pairs_figure_plots_every_run_and_the_means(records):
    fig = plot_pair_kinds(records)
    ax_util, ax_speed = fig.axes
    means = lines(ax_util, "mean:")
    assert means["mean:distinct"].get_ydata()[0] == pytest.approx(0.2)
    assert means["mean:identical"].get_ydata()[0] == pytest.approx(0.0)
    pts = {c.get_gid(): sorted(c.get_offsets()[:, 1]) for c in ax_util.collections if c.get_gid()}
    assert pts == {"points:distinct": pytest.approx([-0.2, 0.3, 0.5]), "points:identical": pytest.approx([-0.1, 0.1])}
    # d_speed: the NaN run is left out of the identical group
    speed = lines(ax_speed, "mean:")
    assert speed["mean:distinct"].get_ydata()[0] == pytest.approx(0.2 / 3)  # (0.4 + 0.1 - 0.3) / 3
    assert speed["mean:identical"].get_ydata()[0] == pytest.approx(0.2)
    assert [t.get_text() for t in ax_util.get_xticklabels()] == ["distinct", "identical"]


def test_cls_cur_figure_prints_spearman(records):
    fig = plot_cls_cur(records)
    ax = fig.axes[0]
    text = next(t for t in ax.texts if t.get_gid() == "spearman").get_text()
    # the 4 runs with both figures: d_util (0.5, 0.3, -0.2, -0.1), d_speed (0.4, 0.1, -0.3, 0.2)
    # ranks (4, 3, 1, 2) and (4, 2, 1, 3): d = (0, 1, 0, -1), rho = 1 - 6 * 2 / (4 * 15) = 0.8
    # within distinct: d_util (0.5, 0.3, -0.2) and d_speed (0.4, 0.1, -0.3) have the same order: +1; identical has 1
    assert text == "Spearman all: ρ = +0.80 (n = 4)\ndistinct: ρ = +1.00 (n = 3)\nidentical: ρ = +nan (n = 1)"
    xy = np.concatenate([c.get_offsets() for c in ax.collections if c.get_gid()])
    assert sorted(map(tuple, np.round(xy, 6))) == [(-0.2, -0.3), (-0.1, 0.2), (0.3, 0.1), (0.5, 0.4)]


def test_the_cls_cur_population_is_unregularized_vanilla_with_a_defined_d_util(records):
    extra = [rec(l1=1e-3, d_util=-0.9, d_speed=0.9),  # regularized: out
             rec(algorithm="guided", d_util=0.9, d_speed=-0.9),  # guided steers its own speeds: out
             rec(d_util=math.nan, d_speed=0.5, d_util_undefined="branch 1 at chance: ..."),  # undefined: out
             rec(d_util=0.0, d_speed=-0.5, d_util_undefined="fusion collapsed: ...")]  # marked: out even if 0
    population = cls_cur_population(records + extra)
    assert len(population) == 4 and all(r["algorithm"] == "vanilla" and not r["l1"] for r in population)
    correlations = cls_cur_correlations(records + extra)
    assert correlations["all"] == (pytest.approx(0.8), 4) and correlations["distinct"] == (pytest.approx(1.0), 3)
    text = next(t for t in plot_cls_cur(records + extra).axes[0].texts if t.get_gid() == "spearman").get_text()
    assert text.endswith("(2 with d_util undefined left out)")


def test_regularization_figure_means_and_stds_over_seeds():
    records = [rec(l1=lam, seed=s, rho=rho, d_util=du, d_speed=0.1 * s)
               for lam, s, rho, du in [(0.0, 0, 0.10, 0.0), (0.0, 1, 0.20, 0.2),
                                       (1e-4, 0, 0.30, -0.1), (1e-4, 1, 0.50, -0.5),
                                       (1e-3, 0, 0.90, -0.9), (1e-3, 1, 0.70, -0.7)]]
    records.append(rec(l1=1e-3, seed=2, rho=math.nan, d_util=math.nan, status="failed"))
    fig = plot_regularization(records)
    ax_rho, ax_util, ax_speed = fig.axes
    rho = lines(ax_rho, "rho:")["rho:modelnet40:distinct"]
    np.testing.assert_allclose(rho.get_xdata(), [0.0, 1e-4, 1e-3])
    np.testing.assert_allclose(rho.get_ydata(), [0.15, 0.40, 0.80])
    util = lines(ax_util, "d_util:")["d_util:modelnet40:distinct"]
    np.testing.assert_allclose(util.get_ydata(), [0.1, -0.3, -0.8])
    # the error bars: mean +- population std over the seeds (0.1, 0.2, 0.1 for d_util)
    caps = sorted(y for line in ax_util.get_lines() if line.get_marker() == "_" for y in line.get_ydata())
    np.testing.assert_allclose(caps, sorted([0.0, 0.2, -0.1, -0.5, -0.9, -0.7]), atol=1e-12)
    assert ax_rho.get_xscale() == "symlog"  # lambda = 0 is on the axis
    assert "τ = 0.001" in ax_rho.get_title()


def test_regularization_figure_draws_the_last_checkpoint_and_leaves_undefined_runs_out():
    records = [rec(l1=lam, seed=s, d_util=du, d_util_last=dl, d_util_undefined=why)
               for lam, s, du, dl, why in [(0.0, 0, -0.4, -0.2, ""), (0.0, 1, -0.6, -0.4, ""),
                                           (1e-3, 0, -0.8, -0.6, ""), (1e-3, 1, math.nan, 0.0, "branch 1 at chance"),
                                           (3e-3, 0, math.nan, math.nan, "fusion collapsed"),
                                           (3e-3, 1, math.nan, math.nan, "fusion collapsed")]]
    ax_util = plot_regularization(records).axes[1]
    best = lines(ax_util, "d_util:")["d_util:modelnet40:distinct"]
    np.testing.assert_allclose(best.get_xdata(), [0.0, 1e-3])  # 3e-3 has no defined d_util
    np.testing.assert_allclose(best.get_ydata(), [-0.5, -0.8])  # the undefined seed of 1e-3 is left out, not 0
    last = lines(ax_util, "d_util_last:")["d_util_last:modelnet40:distinct"]
    np.testing.assert_allclose(last.get_ydata(), [-0.3, -0.3])  # (-0.6 + 0.0) / 2 at 1e-3: no reason recorded
    marks = {t.get_gid(): t.get_text() for t in ax_util.texts if (t.get_gid() or "").startswith("undefined:")}
    assert marks == {"undefined:d_util:0.001": "1 undef.", "undefined:d_util:0.003": "2 undef."}
    table = summary_table(records, ("l1",), ("d_util",))
    assert "| 0.003 | n/a, 2 undefined |" in table and "| 0.001 | -0.800 ± 0.000 (1), 1 undefined |" in table


def test_sensitivity_figure_sweeps(records):
    guided = [rec(algorithm="guided", epsilon=e, window=w, seed=s, acc=a, d_util=du)
              for e, w, s, a, du in [(0.001, 5, 0, 0.80, 0.3), (0.001, 5, 1, 0.90, 0.1),
                                     (0.01, 5, 0, 0.85, 0.0), (0.1, 5, 0, 0.70, -0.2),
                                     (0.01, 1, 0, 0.60, 0.4), (0.01, 20, 0, 0.65, 0.2)]]
    fig = plot_sensitivity(guided + records)  # the vanilla records are left out
    (ax_eps_acc, ax_eps_util), (ax_w_acc, ax_w_util) = np.array(fig.axes).reshape(2, 2)
    eps = lines(ax_eps_acc, "acc:")
    assert list(eps) == ["acc:epsilon:modelnet40:distinct:window=5"]  # W = 1 and W = 20 have one epsilon each
    np.testing.assert_allclose(eps["acc:epsilon:modelnet40:distinct:window=5"].get_xdata(), [0.001, 0.01, 0.1])
    np.testing.assert_allclose(eps["acc:epsilon:modelnet40:distinct:window=5"].get_ydata(), [0.85, 0.85, 0.70])
    w = lines(ax_w_util, "d_util:")["d_util:window:modelnet40:distinct:epsilon=0.01"]
    np.testing.assert_allclose(w.get_xdata(), [1, 5, 20])
    np.testing.assert_allclose(w.get_ydata(), [0.4, 0.0, 0.2])
    assert ax_eps_acc.get_xscale() == "log"


def test_sensitivity_figure_adds_a_row_per_balancer_sweep(records):
    guided = [rec(algorithm="guided", epsilon=0.01, window=5, acc=0.8, d_util=0.1)]
    ogm = [rec(algorithm="ogm_ge", ogm_alpha=a, seed=s, acc=acc, d_util=du)
           for a, s, acc, du in [(0.1, 0, 0.70, -0.4), (0.1, 1, 0.80, -0.2), (0.8, 0, 0.90, 0.1)]]
    blend = [rec(algorithm="gblend", gblend_period=n, acc=acc, d_util=du) for n, acc, du in [(1, 0.5, -0.5),
                                                                                             (3, 0.6, -0.3)]]
    fig = plot_sensitivity(guided + ogm + blend + records)
    axes = np.array(fig.axes).reshape(4, 2)
    alpha = lines(axes[2, 0], "acc:")["acc:ogm_alpha:modelnet40:distinct"]
    np.testing.assert_allclose(alpha.get_xdata(), [0.1, 0.8])
    np.testing.assert_allclose(alpha.get_ydata(), [0.75, 0.90])  # the mean over seeds 0 and 1 at alpha 0.1
    period = lines(axes[3, 1], "d_util:")["d_util:gblend_period:modelnet40:distinct"]
    np.testing.assert_allclose(period.get_xdata(), [1, 3])
    np.testing.assert_allclose(period.get_ydata(), [-0.5, -0.3])
    assert "ogm_ge" in axes[2, 1].get_title() and "gblend" in axes[3, 0].get_title()
    assert len(plot_sensitivity(guided + blend).axes) == 6  # no OGM-GE runs: no OGM-GE row


def test_figures_without_runs_say_so():
    for plot in (plot_pair_kinds, plot_cls_cur, plot_regularization, plot_sensitivity):
        fig = plot([{"status": "failed", "dataset": "embedded", "pair": "distinct", "seed": 0}])
        assert any("no finished run" in t.get_text() for ax in fig.axes for t in ax.texts), plot.__name__


def test_summary_table(records):
    table = summary_table(records, ("pair",), ("d_util", "d_speed"))
    rows = table.splitlines()
    assert rows[0] == "| pair | d_util | d_speed |"
    # distinct d_util: mean 0.2, population std sqrt(((0.3)^2 + 0.1^2 + 0.4^2) / 3)
    speed_std = np.std([0.4, 0.1, -0.3])
    assert rows[2] == f"| distinct | +0.200 ± {math.sqrt(0.26 / 3):.3f} (3) | +0.067 ± {speed_std:.3f} (3) |"
    assert rows[3] == "| identical | +0.000 ± 0.100 (2) | +0.200 ± 0.000 (1) |"


# ----------------------------------------------------------------------------------------- notebook settings
NOTEBOOK = dict(DATASET="modelnet40", DATA_DIR=None, IMAGE_SIZE=None, BATCH_SIZE=None, MAX_EPOCHS=None,
                EMBEDDED_PER_CLASS=None, EMBEDDED_TEST_PER_CLASS=None, MODEL="", GREEDY=True, GREEDY_LRS=None,
                GREEDY_SEEDS=None, GREEDY_PAIRS=["distinct", "identical"], REGULARIZATION=True, REG_L1S=None,
                REG_LR=None, REG_SEEDS=[0, 1, 2], TAU=0.001, SENSITIVITY=True, SENS_EPSILONS=None,
                SENS_WINDOWS=None, SENS_ALPHAS=None, SENS_PERIODS=None, SENS_GAMMAS=None, SENS_Q_BASES=None,
                SENS_PMR_ALPHAS=None, SENS_AGM_ALPHAS=None, SENS_SEEDS=[0, 1, 2], EXECUTOR="local",
                WORKERS=None, THREADS=None,
                RUNS_PER_GPU=1, RAY_ADDRESS=None, RAY_CPUS_PER_RUN=1, RAY_GPUS_PER_RUN=None, LOG_DIR="logging",
                CKPT_DIR="checkpoints")


def test_notebook_defaults_are_the_papers_grids():
    from greedymm.experiment.params import study_plan

    plan = study_plan(NOTEBOOK)
    greedy = plan.studies["greedy_learner"].grids[0]
    assert len(greedy.lrs) == 9 and greedy.lrs[0] == 1e-3 and greedy.lrs[-1] == 1.0 and greedy.seeds == (0, 1, 2)
    assert greedy.pairs == ("distinct", "identical") and greedy.algorithms == ("vanilla",)
    reg = plan.studies["regularization"]
    assert len(reg.grids[0].l1s) == 10 and reg.grids[0].lrs == (0.1,) and reg.data["batch_size"] == 8
    assert reg.train["momentum"] == 0.0 and reg.grids[0].pairs == ("distinct",)
    sens = plan.studies["sensitivity"]
    guided = [g for g in sens.grids if g.algorithms == ("guided",)]
    assert {(len(g.options["epsilon"]), len(g.options["window"])) for g in guided} == {(5, 1), (1, 5)}
    assert [g.options["epsilon"] for g in guided] == [(0.001, 0.003, 0.01, 0.03, 0.1), (0.01,)]
    assert [g.options["window"] for g in guided] == [(5,), (1, 2, 5, 10, 20)]
    assert len(sens.grids[0].seeds) == 3 and sens.grids[0].algorithms == ("guided",)
    assert [(g.algorithms, {k: len(v) for k, v in g.options.items()}) for g in sens.grids[2:]] == [
        (("ogm_ge",), {"ogm_alpha": 4}), (("gblend",), {"gblend_period": 4}), (("mmpareto",), {"mmpareto_gamma": 3}),
        (("opm",), {"opm_q_base": 4}), (("pmr",), {"pmr_alpha": 3}), (("agm",), {"agm_alpha": 4})]
    digits = study_plan({**NOTEBOOK, "DATASET": "colored_mnist"}).studies["sensitivity"].grids
    assert [g.options["epsilon"] for g in digits[:2]] == [(0.01, 0.03, 0.1, 0.3, 1.0), (0.1,)]
    assert plan.executor.name == "local"


def test_notebook_settings_are_checked():
    from greedymm.experiment.params import study_plan as plan_from_parameters

    with pytest.raises(TypeError, match="GREEDY_LRS='0.1' is a str; it must be a list\\[float\\] or None.*YAML"):
        plan_from_parameters({**NOTEBOOK, "GREEDY_LRS": "0.1"})
    with pytest.raises(TypeError, match="WORKERS=2.5 is a float"):
        plan_from_parameters({**NOTEBOOK, "WORKERS": 2.5})
    with pytest.raises(ValueError, match="EXECUTOR='slurm' is unknown"):
        plan_from_parameters({**NOTEBOOK, "EXECUTOR": "slurm"})
    plan = plan_from_parameters({**NOTEBOOK, "DATASET": "embedded", "IMAGE_SIZE": 32, "EMBEDDED_PER_CLASS": 4,
                                 "GREEDY": False, "SENSITIVITY": False, "REG_L1S": [0, 0.001], "REG_LR": 0.05,
                                 "EXECUTOR": "processes", "WORKERS": 2})
    assert list(plan.studies) == ["regularization"]
    reg = plan.studies["regularization"]
    # the paper's optimizer on every dataset: batch 8 (the other studies' batch size does not reach it), no momentum
    assert reg.data == {"image_size": 32, "embedded_per_class": 4, "batch_size": 8} and reg.grids[0].l1s == (0, 0.001)
    assert reg.train["momentum"] == 0.0 and reg.grids[0].lrs == (0.05,)
    sized = plan_from_parameters({**NOTEBOOK, "DATASET": "embedded", "IMAGE_SIZE": 32, "BATCH_SIZE": 16,
                                  "EMBEDDED_PER_CLASS": 40, "MAX_EPOCHS": 12, "REG_IMAGE_SIZE": 48,
                                  "REG_EMBEDDED_PER_CLASS": 120, "REG_MAX_EPOCHS": 20})
    reg, greedy = sized.studies["regularization"], sized.studies["greedy_learner"]
    assert reg.data == {"image_size": 48, "batch_size": 8, "embedded_per_class": 120}
    assert reg.train == {"max_epochs": 20, "momentum": 0.0} and reg.grids[0].lrs == (0.1,)
    assert greedy.data == {"image_size": 32, "batch_size": 16, "embedded_per_class": 40}
    assert plan.executor.name == "processes" and plan.executor.workers == 2
