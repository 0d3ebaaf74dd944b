"""Tests of lightning_htsr.plotting and scripts/plot_phase_gallery.py (small matrices, Agg rendering only)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from lightning_htsr.analysis import MatrixAnalysis, analyze_matrices
from lightning_htsr.plotting import (
    PHASE_COLORS,
    figure_to_array,
    figure_to_png,
    phase_color,
    plot_esd,
    plot_metric_history,
    plot_phase_map,
)
from lightning_htsr.spectra.phases import Phase
from lightning_htsr.spectra.powerlaw import PowerLawFit
from lightning_htsr.spectra.synthetic import phase_example
from lightning_htsr.weights.matrix import WeightMatrix

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def heavy() -> MatrixAnalysis:
    weight = phase_example(Phase.HEAVY_TAILED, 400, 200, seed=1)
    result = analyze_matrices([WeightMatrix.from_tensor("w", weight)])[0]
    assert result.powerlaw is not None and result.powerlaw.ok
    assert result.mp is not None and math.isfinite(result.mp.lambda_plus)
    return result


def _line(fig: Figure, gid: str):  # noqa: ANN202
    lines = [line for line in fig.axes[0].lines if line.get_gid() == gid]
    assert len(lines) == 1, [line.get_gid() for line in fig.axes[0].lines]
    return lines[0]


def test_phase_colors_cover_every_phase_and_are_distinct() -> None:
    assert {p.value for p in Phase} <= set(PHASE_COLORS)
    assert len({PHASE_COLORS[p.value] for p in Phase} | {PHASE_COLORS["unclassified"]}) == len(Phase) + 1
    for missing in (None, "", float("nan")):
        assert phase_color(missing) == PHASE_COLORS["unclassified"] == PHASE_COLORS[""]
    assert phase_color(Phase.HEAVY_TAILED) == PHASE_COLORS["heavy_tailed"]


def test_plot_esd_draws_fits_on_log_axes(heavy: MatrixAnalysis) -> None:
    pl, mp = heavy.powerlaw, heavy.mp
    assert pl is not None and mp is not None and heavy.eigenvalues is not None
    fig = plot_esd(heavy.eigenvalues, powerlaw=pl, mp=mp, phase=heavy.phase, Q=2.0)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert len(ax.patches) > 0  # histogram bars

    law = _line(fig, "powerlaw")
    xs, ys = np.asarray(law.get_xdata()), np.asarray(law.get_ydata())
    assert xs[0] == pytest.approx(pl.xmin) and xs[-1] == pytest.approx(pl.xmax)
    assert np.all(np.diff(ys) < 0)  # a decreasing law
    fraction = pl.num_pl_spikes / int((heavy.eigenvalues > 0).sum())
    assert ys[0] == pytest.approx(fraction * (pl.alpha - 1) / pl.xmin)
    assert np.asarray(_line(fig, "xmin").get_xdata()) == pytest.approx([pl.xmin, pl.xmin])
    assert np.asarray(_line(fig, "lambda_plus").get_xdata()) == pytest.approx([mp.lambda_plus] * 2)
    assert np.asarray(_line(fig, "spike_threshold").get_xdata()) == pytest.approx([mp.spike_threshold] * 2)
    mp_x = np.asarray(_line(fig, "mp").get_xdata())
    assert mp.lambda_minus <= mp_x.min() and mp_x.max() <= mp.lambda_plus
    text = ax.get_title() + " " + " ".join(t.get_text() for t in ax.get_legend().get_texts())
    text += ax.get_legend().get_title().get_text()
    assert f"{pl.alpha:.2f}" in text and f"{pl.D:.3f}" in text and "heavy_tailed" in text
    assert figure_to_png(fig)[:4] == b"\x89PNG"


def test_plot_esd_derives_q_and_takes_fits_from_phase_result(heavy: MatrixAnalysis) -> None:
    assert heavy.eigenvalues is not None and heavy.mp is not None
    explicit = _line(plot_esd(heavy.eigenvalues, mp=heavy.mp, Q=2.0), "mp").get_ydata()
    derived = _line(plot_esd(heavy.eigenvalues, phase=heavy.phase), "mp").get_ydata()  # Q from the MP edges
    np.testing.assert_allclose(derived, explicit, rtol=1e-9)


def test_plot_esd_tolerates_failed_and_missing_fits() -> None:
    ev = torch.cat([torch.zeros(5), torch.linspace(0.1, 2.0, 50), torch.tensor([float("nan"), -1.0])])
    fig = plot_esd(ev, powerlaw=PowerLawFit.failed("tail too short"), mp=None, phase=None, title="t")
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert not [line for line in ax.lines if line.get_gid() in ("powerlaw", "xmin", "lambda_plus")]
    assert any("tail too short" in t.get_text() for t in ax.texts)
    assert ax.get_title() == "t"
    figure_to_png(fig)
    # nothing usable at all, and drawing into given axes
    target = Figure().add_subplot()
    assert plot_esd(np.zeros(10), mp=None, ax=target) is target.figure
    figure_to_png(target.figure)


def test_plot_phase_map_pixels_match_phase_colors() -> None:
    names = ["layer.a", "layer.b", "layer.c"]
    steps = [0, 5, 10, 15]
    phases = [
        ["random_like", "bleeding_out", "bulk_plus_spikes", "bulk_decay"],
        ["heavy_tailed", "rank_collapse", None, ""],
        [Phase.RANDOM_LIKE, "heavy_tailed", "heavy_tailed", float("nan")],
    ]
    fig = plot_phase_map(names, steps, phases, title="phases")  # type: ignore[arg-type]
    ax = fig.axes[0]
    image = np.asarray(ax.images[0].get_array())
    assert image.shape == (3, 4, 3)
    rgb = figure_to_array(fig)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    height = rgb.shape[0]
    for i, row in enumerate(phases):
        for j, phase in enumerate(row):
            expected = np.array(to_rgb(phase_color(phase)))
            np.testing.assert_allclose(image[i, j], expected)
            x, y = ax.transData.transform((j, i))  # cell centre, display coords from the bottom
            pixel = rgb[int(round(height - y)), int(round(x))] / 255.0
            np.testing.assert_allclose(pixel, expected, atol=1.5 / 255)
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(s) for s in steps]
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {p.value for p in Phase} | {"unclassified"} <= legend
    with pytest.raises(ValueError):
        plot_phase_map(["a"], [0, 1], [["random_like"]])


def test_plot_phase_map_many_rows_shrinks_font() -> None:
    few = plot_phase_map(["a"], [0], [["random_like"]]).axes[0].get_yticklabels()[0].get_fontsize()
    names = [f"m{i}" for i in range(200)]
    many = plot_phase_map(names, [0, 1], [["heavy_tailed", None]] * 200).axes[0].get_yticklabels()[0].get_fontsize()
    assert many < few


def test_plot_metric_history_one_line_per_name_plus_mean() -> None:
    rows = [{"name": n, "epoch": e, "alpha": a + 0.1 * e, "step": 10 * e}
            for n, a in (("l1", 2.5), ("l2", 4.0), ("l3", 7.0)) for e in range(4)]
    rows.append({"name": "l3", "epoch": 4, "alpha": math.nan, "step": 40})
    frame = pd.DataFrame(rows)
    fig = plot_metric_history(frame, "alpha", by="epoch")
    ax = fig.axes[0]
    assert len(ax.lines) == 4
    assert [line.get_gid() for line in ax.lines] == ["name:l1", "name:l2", "name:l3", "mean"]
    mean = ax.lines[-1]
    np.testing.assert_allclose(mean.get_ydata(), frame.groupby("epoch")["alpha"].mean().dropna())
    assert mean.get_linewidth() > ax.lines[0].get_linewidth()
    assert len(ax.patches) == 1  # the 2 <= alpha <= 6 band
    other = plot_metric_history(frame, "step", by="epoch").axes[0]
    assert len(other.lines) == 4 and not other.patches
    assert figure_to_png(fig)[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        plot_metric_history(frame, "entropy")


def test_gallery_script_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("plot_phase_gallery", ROOT / "scripts" / "plot_phase_gallery.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gallery.png"
    assert module.main(["--out", str(out), "--size", "400", "200", "--seed", "3", "--dpi", "40"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert all(f"{p.value:17s} -> classified" in printed for p in Phase)
