"""Fit diagnostics: the power-law fit's own D(xmin)/alpha(xmin) curves, the five-panel figure,
and its three outlets: ``analyze --plots``, ``report`` and the callback's TensorBoard images (real files)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_htsr import HTSRCallback
from lightning_htsr.analysis import AnalysisOptions, analyze_matrices
from lightning_htsr.fit_plots import plot_fit_diagnostics
from lightning_htsr.plotting import figure_to_png
from lightning_htsr.spectra.powerlaw import fit_power_law, fit_scan
from lightning_htsr.training.sinks.history import read_history, read_spectra
from lightning_htsr.views.report import recorded_scan, write_report
from lightning_htsr.weights.modules import weight_matrices

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator
PNG = b"\x89PNG\r\n\x1a\n"


def pareto(n: int, seed: int, a: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1.0 - torch.rand(n, generator=g, dtype=torch.float64)) ** (-1.0 / a)


def heavy_model() -> nn.Module:
    """Linear layers with student-t weights (power-law tails) and one with a few large 'fingers'."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 300), nn.ReLU(), nn.Linear(300, 200))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(rng.standard_t(2.5, p.shape) / np.sqrt(p.shape[1])))
    return model


# ------------------------------------------------------------------------------------------------ the scan


@pytest.mark.parametrize("method", ["fast", "exact"])
@pytest.mark.parametrize("ks", ["two_sided", "lower"])
@pytest.mark.parametrize("n", [15, 400, 3000])
def test_scan_is_the_fits_own_objective(method: str, ks: str, n: int) -> None:
    x = pareto(n, seed=n)
    fit = fit_power_law(x, method=method, ks=ks, min_tail=10)
    scan = fit_scan(x, method=method, ks=ks, min_tail=10)
    assert scan.fit == fit
    c = scan.chosen
    assert scan.xmins[c] == fit.xmin and scan.alphas[c] == fit.alpha and scan.Ds[c] == fit.D  # exactly
    assert np.all(np.diff(scan.xmins) >= 0) and scan.xmins.size <= 1024 + 1
    # every candidate's alpha is the MLE of its tail
    i = scan.xmins.size // 3
    tail = x[x >= scan.xmins[i]]
    if n >= 20:
        assert scan.alphas[i] == pytest.approx(1 + tail.numel() / float(torch.log(tail / scan.xmins[i]).sum()))
    if method == "exact" and scan.xmins.size == np.unique(scan.xmins).size:
        assert c == int(np.nanargmin(scan.Ds))  # the exhaustive search picks the curve's first minimum


def test_scan_of_a_failed_fit_and_at_a_recorded_xmin() -> None:
    failed = fit_scan(torch.ones(5, dtype=torch.float64))
    assert not failed.fit.ok and failed.chosen == -1
    x = pareto(500, seed=1)
    fit = fit_power_law(x)
    again = fit_scan(x, min_tail=2, at_xmin=fit.xmin)  # a recorded fit whose settings are unknown
    assert again.fit.xmin == fit.xmin and again.fit.alpha == fit.alpha and again.fit.D == pytest.approx(fit.D)


@pytest.mark.parametrize("options", [
    AnalysisOptions(), AnalysisOptions(fit="exact"), AnalysisOptions.weightwatcher(),
    AnalysisOptions.weightwatcher(xmax=-3), AnalysisOptions.weightwatcher(xmax=5.0),
    AnalysisOptions.weightwatcher(fix_fingers="clip_xmax"),
], ids=["default", "exact", "ww", "xmax_int", "xmax_cap", "clip_xmax"])
def test_matrix_scan_reproduces_the_records_fit(options: AnalysisOptions) -> None:
    torch.manual_seed(0)
    # default-initialised layers have fingers under clip_xmax (7 and 2: tests/test_ww_selection_fingers_randomize.py)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 300)) if options.fix_fingers else heavy_model()
    results = analyze_matrices(weight_matrices(model), options)
    if options.fix_fingers:
        assert any(r.record["num_fingers"] > 0 for r in results)  # the clipped fit is what is scanned
    for res in results:
        scan = res.fit_scan()
        rec = res.record
        assert (scan.fit.alpha, scan.fit.xmin, scan.fit.D) == (rec["alpha"], rec["xmin"], rec["D"])
        assert scan.Ds[scan.chosen] == rec["D"] and scan.alphas[scan.chosen] == rec["alpha"]


def test_no_scan_without_a_power_law_search() -> None:
    res = analyze_matrices(weight_matrices(nn.Linear(64, 128)), AnalysisOptions(fix_fingers="xmin_peak"))[0]
    assert res.fit_scan() is None


# ------------------------------------------------------------------------------------------------ the figure


def test_figure_marks_the_chosen_xmin_on_every_panel() -> None:
    res = analyze_matrices(weight_matrices(heavy_model()))[0]
    scan = res.fit_scan()
    fig = plot_fit_diagnostics(res.eigenvalues, scan, mp=res.mp, phase=res.phase, title="0", Q=2.0)
    axes = fig.axes
    assert [a.get_title(loc="left").split(":")[0] for a in axes] == \
        ["log-log ESD", "lin-lin ESD", "log-lin ESD", "D(xmin)", "alpha(xmin)"]
    assert [a.get_xscale() for a in axes] == ["log", "linear", "linear", "log", "log"]

    def artist(ax, gid):
        return next(line for line in ax.get_lines() if line.get_gid() == gid)

    xmin = res.powerlaw.xmin
    assert artist(axes[1], "xmin").get_xdata()[0] == xmin
    assert artist(axes[2], "xmin").get_xdata()[0] == pytest.approx(np.log10(xmin))
    for ax, gid, value in ((axes[3], "D_curve", res.powerlaw.D), (axes[4], "alpha_curve", res.powerlaw.alpha)):
        dot = artist(ax, f"{gid}_chosen")
        assert dot.get_xdata()[0] == xmin and dot.get_ydata()[0] == value
        np.testing.assert_array_equal(artist(ax, gid).get_xdata(), scan.xmins)
    assert any(line.get_gid() == "mp" for line in axes[1].get_lines())  # the MP bulk on lin-lin
    assert figure_to_png(fig).startswith(PNG)


def test_figure_of_a_failed_fit_still_draws() -> None:
    x = torch.full((30,), 2.0, dtype=torch.float64)
    fig = plot_fit_diagnostics(x, fit_scan(x))
    assert "no power-law fit" in fig._suptitle.get_text()
    assert figure_to_png(fig).startswith(PNG)


# ------------------------------------------------------------------------------------------------ the outlets


def test_tensorboard_fit_diagnostics_images_are_opt_in(tmp_path) -> None:
    on = TensorBoardLogger(str(tmp_path), name="on")
    trainer = pl.Trainer(callbacks=[HTSRCallback(log_figures_every=2, log_fit_diagnostics=True)],
                         **trainer_kwargs(tmp_path, logger=on, max_epochs=2))
    trainer.fit(TinyNet(lr=0.05))
    acc = EventAccumulator(on.log_dir, size_guidance={"images": 0})
    acc.Reload()
    for name in ("net.0", "net.2", "net.4"):
        events = acc.Images(f"htsr/{name}/fit_diagnostics")
        assert [e.step for e in events] == [0, 16]  # with the ESD figures: analyses 0 and 2
        assert events[0].encoded_image_string.startswith(PNG) and events[0].width > events[0].height > 400
    off = TensorBoardLogger(str(tmp_path), name="off")
    pl.Trainer(callbacks=[HTSRCallback(log_figures_every=2)],
               **trainer_kwargs(tmp_path, logger=off, max_epochs=1)).fit(TinyNet(lr=0.05))
    acc = EventAccumulator(off.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "htsr/net.2/esd" in acc.Tags()["images"]
    assert not [t for t in acc.Tags()["images"] if t.endswith("fit_diagnostics")]


def test_report_has_a_fit_diagnostic_per_matrix(tmp_path) -> None:
    logger = CSVLogger(str(tmp_path), name="run")
    pl.Trainer(callbacks=[HTSRCallback()], **trainer_kwargs(tmp_path, logger=logger, max_epochs=1)).fit(
        TinyNet(lr=0.05))
    index = write_report(logger.log_dir + "/htsr_history.csv", tmp_path / "report")
    fits = sorted(p.name for p in (tmp_path / "report" / "fit").glob("*.png"))
    assert fits == ["fit_net.0.png", "fit_net.2.png", "fit_net.4.png"]
    assert all((tmp_path / "report" / "fit" / f).read_bytes().startswith(PNG) for f in fits)
    text = index.read_text()
    assert all(f'src="fit/{f}"' in text for f in fits)
    # the marked values are the recorded fit's, to the float32 precision of the stored spectra
    history = read_history(logger.log_dir + "/htsr_history.csv")
    spectra, _, _ = read_spectra(logger.log_dir + "/htsr_spectra.npz")
    last = history[history["analysis"] == history["analysis"].max()].set_index("name")
    for name in ("net.0", "net.2", "net.4"):
        scan = recorded_scan(spectra[name], last.loc[name])
        assert scan.xmins[scan.chosen] == pytest.approx(last.loc[name, "xmin"], rel=1e-6)
        assert scan.alphas[scan.chosen] == pytest.approx(last.loc[name, "alpha"], rel=1e-4)
        assert scan.Ds[scan.chosen] == pytest.approx(last.loc[name, "D"], rel=1e-3)
