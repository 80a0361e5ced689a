"""The summary table, the paper's numbers and the figures (paper Sec. 5; SPEC Sec. 8)."""

import numpy as np
from matplotlib.patches import Rectangle
from torch.testing import assert_close

from greedymm.experiment import PAPER_MODELNET40, format_table, run_name, summarize
from greedymm.config import DataConfig
from greedymm.plots import _mode_spans, plot_d_speed, plot_d_util, plot_learning_curves, plot_views


def fake_run(alg, seed, acc, d_util):
    return {"algorithm": alg, "seed": seed, "acc": acc, "acc0": acc - 0.1, "acc1": acc - 0.2, "u_m1_m0": 0.1,
            "u_m0_m1": 0.1 - d_util, "d_util": d_util, "d_speed": -0.05 * seed}


def test_summarize_mean_and_std_over_seeds():
    runs = [fake_run("vanilla", 0, 0.90, -0.4), fake_run("vanilla", 1, 0.80, -0.2), fake_run("guided", 0, 0.95, 0.0)]
    table = summarize(runs)
    assert list(table) == ["vanilla", "guided"]
    mean, std, n = table["vanilla"]["acc"]
    assert_close((mean, std, n), (0.85, 0.05, 2))  # population std over the seeds
    assert_close(table["vanilla"]["d_util"][:2], (-0.3, 0.1))
    assert table["guided"]["acc"] == (0.95, 0.0, 1)


def test_format_table_with_the_papers_numbers():
    text = format_table(summarize([fake_run("vanilla", 0, 0.9009, -0.1)]), PAPER_MODELNET40)
    header, rule, row = text.splitlines()
    assert "paper acc %" in header and rule.count("---") == 11
    assert "| vanilla | 1 | 90.09 ± 0.00 |" in row and "90.09 ± 0.58" in row and "≈ -0.1" in row
    assert PAPER_MODELNET40["guided"]["acc"] == (91.37, 0.28)


def test_run_name_says_dataset_size_views_algorithm_seed():
    assert run_name(DataConfig.paper(), "guided", 2) == "modelnet40_224px_v0-6_guided_s2"


def test_mode_spans():
    modes = ["fused", "rebalance_m0", "rebalance_m0", "fused", "rebalance_m1", "rebalance_m0"]
    assert _mode_spans(modes) == [("rebalance_m0", 2, 3), ("rebalance_m1", 5, 5), ("rebalance_m0", 6, 6)]
    assert _mode_spans(["fused"] * 3) == []


def test_plots_draw_what_they_are_given():
    steps = [{"step": i + 1, "d_speed": 0.01 * i, "mode": m}
             for i, m in enumerate(["fused", "rebalance_m0", "rebalance_m0", "fused", "rebalance_m1"])]
    fig = plot_d_speed({"vanilla": steps[:1], "guided": steps}, epsilon=0.01)
    ax_v, ax_g = fig.axes
    spans = lambda ax: [p for p in ax.patches if isinstance(p, Rectangle) and p.get_alpha() == 0.25]
    assert len(spans(ax_v)) == 0 and len(spans(ax_g)) == 2
    np.testing.assert_allclose(ax_g.lines[0].get_ydata(), [0, 0.01, 0.02, 0.03, 0.04])

    hist = [{"epoch": e, "train_loss": 1 / e, "val_loss": 2 / e, "val_acc": 0.1 * e, "val_acc0": 0.05 * e,
             "val_acc1": 0.02 * e} for e in (1, 2, 3)]
    fig = plot_learning_curves({"vanilla": hist})
    assert len(fig.axes) == 3 and fig.axes[0].get_yscale() == "log"
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [0.1, 0.2, 0.3])

    fig = plot_d_util({"vanilla": [-0.4, -0.2], "guided": [0.0]}, {"vanilla": -0.1})
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights[:2], [-0.3, 0.0])

    images = np.zeros((2, 12, 1, 8, 8), np.uint8)
    fig = plot_views(images, ["a_0001", "b_0001"], ["a", "b"], views=(0, 6))
    assert len(fig.axes) == 24 and fig.axes[0].get_title() == "view 0 (m0)" and fig.axes[6].get_title() == "view 6 (m1)"
