"""The charts' conventions (privbench.report.charts): what a reader needs is on every chart."""

import pandas as pd
import pytest
from matplotlib.colors import to_hex

from privbench.report import charts

MACHINE = "AMD EPYC 7B13, 2 cores"
# The default preset's StateSpace small chart: JAX clipped failed at its first batch, the
# throughputs span 20x (JAX clipped at 3-5 samples/s, PyTorch standard at 65-73).
STATE_SPACE = {
    "jax (clipped)": [(8, None, "oom")],
    "jax (standard)": [(8, 60.0, "ok"), (16, 70.0, "ok"), (32, 73.1, "ok")],
    "torch (clipped)": [(8, 2.5, "ok"), (16, 2.5, "ok"), (32, None, "timeout")],
    "torch (standard)": [(8, 55.0, "ok"), (16, 61.0, "ok"), (32, 65.0, "ok")],
}
PUBLISHED = {"jax (standard)": [(16, 900.0), (32, 1200.0)]}


@pytest.fixture
def drawn(monkeypatch):
    """The figures the chart functions would save, kept open for inspection."""
    figures = []
    monkeypatch.setattr(charts, "save", lambda fig, path: figures.append(fig))
    return figures


def _legend(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def _legend_is_outside(fig, ax) -> bool:
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    return legend.x0 >= axes.x1 or legend.y1 <= axes.y0


def _texts(ax) -> list[str]:
    return [text.get_text() for text in ax.texts] + [ax.get_title()]


def test_sweep_chart_shows_every_series_plain_batches_and_a_log_axis(drawn):
    charts.sweep_chart(STATE_SPACE, "StateSpace small", "samples / s", "unused.png", MACHINE, PUBLISHED)
    fig = drawn[0]
    ax = fig.axes[0]
    legend = _legend(ax)
    # the curve that only failed has its entry, naming the failure and the batch
    assert "jax (clipped): OOM at 8" in legend
    assert {"jax (standard)", "torch (clipped)", "torch (standard)", "jax (standard) (published)"} <= set(legend)
    assert _legend_is_outside(fig, ax)
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "32"]
    assert ax.get_yscale() == "log"  # 2.5 .. 1200: over 10x
    assert MACHINE in _texts(ax) and "StateSpace small" in ax.get_title()
    lines = {line.get_label(): line for line in ax.get_lines()}
    published, reproduced = lines["jax (standard) (published)"], lines["jax (standard)"]
    assert to_hex(published.get_color()) == to_hex(reproduced.get_color())
    assert published.get_linestyle() == "--" and reproduced.get_linestyle() == "-"
    # the OOM and timeout markers are drawn and named on the x axis
    assert {"OOM", "timeout"} <= set(_texts(ax))


def test_sweep_chart_axis_is_linear_from_zero_within_10x(drawn):
    series = {"jax (standard)": [(2, 10.0, "ok"), (4, 30.0, "ok")]}
    references = {"jax fast DP": (50.0, "ok"), "torch fast DP": (None, "oom")}
    charts.sweep_chart(series, "CNN", "samples / s", "unused.png", MACHINE, xlabel="microbatch size",
                       references=references)
    ax = drawn[0].axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert ax.get_xlabel() == "microbatch size"
    assert {"jax fast DP: 50.00", "torch fast DP: OOM"} <= set(_legend(ax))


def test_grouped_bar_chart_puts_reproduced_and_published_on_one_scale(drawn):
    series = ["reproduced: this CPU", "published: A100"]
    groups = [("Baseline", {series[0]: (120.0, "(batch 64)"), series[1]: (7.06, "(batch 2048)")}),
              ("Opacus", {series[0]: (None, "OOM at batch 32"), series[1]: (61.49, "(batch 128)")}),
              ("BastionLab TEE", {series[1]: (10.7, "")})]
    charts.grouped_bar_chart(groups, series, "Seconds per epoch", "seconds per epoch", "unused.png", MACHINE)
    fig = drawn[0]
    assert len(fig.axes) == 1  # one image, one value axis for both
    ax = fig.axes[0]
    assert ax.get_ylabel() == "seconds per epoch"
    assert ax.get_yscale() == "log"  # 7.06 .. 120: over 10x
    assert _legend(ax) == series and _legend_is_outside(fig, ax)
    heights = sorted(round(patch.get_height(), 2) for patch in ax.patches)
    assert heights == [7.06, 10.7, 61.49, 120.0]
    texts = _texts(ax)
    assert "OOM at batch 32" in texts and "120 (batch 64)" in texts and MACHINE in texts


def test_machine_label_names_cpu_model_cores_and_gpu():
    frame = pd.DataFrame({"sys_processor": ["AMD EPYC 7B13"] * 2, "sys_cpu_count": [2, 2], "sys_gpu": [None, None]})
    assert charts.machine_label(frame) == "AMD EPYC 7B13, 2 cores"
    frame["sys_gpu"] = "NVIDIA H200, 143771 MiB"
    assert charts.machine_label(frame) == "AMD EPYC 7B13, 2 cores, NVIDIA H200, 143771 MiB"
    assert charts.machine_label(pd.DataFrame({"status": ["ok"]})) == "unknown CPU"


def test_charts_are_written_as_png(tmp_path):
    charts.sweep_chart(STATE_SPACE, "StateSpace small", "samples / s", tmp_path / "sweep.png", MACHINE, PUBLISHED)
    charts.grouped_bar_chart([("Baseline", {"here": (1.0, "")})], ["here"], "t", "s", tmp_path / "bars.png", MACHINE)
    for name in ("sweep.png", "bars.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
