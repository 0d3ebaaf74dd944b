"""TensorBoard extras: eigenvalue histograms, ESD figures, the phase map, a custom-scalars dashboard, a table.

The writer is found by capability (``logger.experiment`` has ``add_histogram``, ``add_figure``, ``add_text`` and
``add_custom_scalars``), so ``lightning.pytorch`` and ``pytorch_lightning`` TensorBoard loggers both qualify, and
so does any logger exposing a ``SummaryWriter``. Everything is written at ``global_step = trainer.global_step``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...records import MatrixResult, flag_unclassified
from .figures import FigureJob, FigureRenderer, draw, takes_png
from .scalars import MATRIX_SCALARS, phase_legend

__all__ = ["TensorBoardSink", "dashboard_layout", "tensorboard_writer"]

_WRITER_METHODS = ("add_histogram", "add_figure", "add_text", "add_custom_scalars", "add_scalar")


def tensorboard_writer(logger: Any) -> Any | None:
    """The ``SummaryWriter``-like ``experiment`` of a logger, or ``None`` if it is not a TensorBoard logger."""
    try:
        writer = logger.experiment
    except Exception:  # noqa: BLE001 - some loggers raise when offline; they are simply not TensorBoard
        return None
    if all(callable(getattr(writer, m, None)) for m in _WRITER_METHODS):
        return writer
    return None


def dashboard_layout(prefix: str) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout grouping alpha, entropy and phase across layers (tags are regular expressions)."""
    p = prefix.replace(".", r"\.")
    return {
        "HT-SR alpha": {
            "alpha per matrix": ["Multiline", [rf"^{p}/.+/alpha$"]],
            "alpha mean": ["Multiline", [rf"^{p}/alpha_mean$"]],
            "alpha-weighted per matrix": ["Multiline", [rf"^{p}/.+/alpha_weighted$"]],
        },
        "HT-SR entropy": {
            "entropy per matrix": ["Multiline", [rf"^{p}/.+/entropy$"]],
            "entropy mean": ["Multiline", [rf"^{p}/entropy_mean$"]],
        },
        "HT-SR phase": {
            "phase code per matrix (0 random_like .. 4 heavy_tailed, 5 rank_collapse)": [
                "Multiline", [rf"^{p}/.+/phase$"]],
            "smoothed_phase code per matrix": ["Multiline", [rf"^{p}/.+/smoothed_phase$"]],
            "share of matrices per phase": ["Multiline", [rf"^{p}/frac_.+$"]],
            "share of matrices per smoothed_phase": ["Multiline", [rf"^{p}/smoothed_frac_.+$"]],
        },
        "HT-SR rank": {
            "stable rank per matrix": ["Multiline", [rf"^{p}/.+/stable_rank$"]],
            "MP soft rank per matrix": ["Multiline", [rf"^{p}/.+/mp_softrank$"]],
            "spikes per matrix": ["Multiline", [rf"^{p}/.+/num_spikes$"]],
        },
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3g}"
    return "" if value is None else str(value)


def results_table(records: Sequence[Mapping[str, Any]], smoothed: Mapping[str, str | None]) -> str:
    """Markdown table of the latest analysis (one row per matrix); an unclassified matrix's raw alpha is shown in
    parentheses with phase ``(too small)``."""
    columns = ["name", "N", "M", *MATRIX_SCALARS, "D", "phase", "smoothed_phase", "warning", "status"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        row = flag_unclassified({**r, "smoothed_phase": smoothed.get(r["name"])}, _fmt)
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _aspect(q: Any) -> float | None:
    """``Q`` for the MP density, or ``None`` (derived from the fitted edges) when it is not a usable number."""
    return float(q) if isinstance(q, (int, float)) and math.isfinite(q) and q >= 1 else None


class TensorBoardSink:
    """Writes the TensorBoard-only views of each analysis (rank 0 only; scalars go through the loggers).

    Figures for torch's ``SummaryWriter`` are drawn off the training process by a
    :class:`~lightning_htsr.training.sinks.figures.FigureRenderer` and written with the step of their analysis; call
    :meth:`close` at the end of training (the callback does, also on exceptions) to wait for the last ones.

    Args:
        prefix: Tag namespace.
        log_histograms: Histogram of log10 eigenvalues per matrix at every analysis.
        log_figures_every: ESD log-log figures with the fitted power law every this many analyses (and at the
            first); ``None`` or 0 disables them. The phase map is drawn at every analysis.
        background_figures: Draw the figures in a child process (``False``: in the training thread).
        log_fit_diagnostics: With the ESD figures, also the power-law fit's diagnostics
            (``<prefix>/<matrix>/fit_diagnostics``) of the results that carry a ``scan``.
    """

    def __init__(self, prefix: str = "htsr", log_histograms: bool = True, log_figures_every: int | None = 5,
                 background_figures: bool = True, log_fit_diagnostics: bool = False) -> None:
        self.prefix = prefix
        self.log_histograms = log_histograms
        self.log_figures_every = log_figures_every
        self.log_fit_diagnostics = log_fit_diagnostics
        self.renderer = FigureRenderer(background=background_figures)
        self._initialized: set[int] = set()

    def figures_due(self, analysis_index: int) -> bool:
        """Whether analysis number ``analysis_index`` (0-based) draws the ESD figures."""
        return bool(self.log_figures_every) and analysis_index % self.log_figures_every == 0  # type: ignore[operator]

    def fit_diagnostics_due(self, analysis_index: int) -> bool:
        """Whether analysis number ``analysis_index`` draws the fit diagnostics (so its results need a scan)."""
        return self.log_fit_diagnostics and self.figures_due(analysis_index)

    def write(
        self,
        writer: Any,
        analyses: Sequence[MatrixResult],
        smoothed: Mapping[str, str | None],
        phase_history: Sequence[Mapping[str, Any]],
        *,
        step: int,
        analysis_index: int,
    ) -> None:
        """Write one analysis.

        Args:
            writer: A ``SummaryWriter``.
            analyses: One :class:`~lightning_htsr.records.MatrixResult` per matrix (record, eigenvalues, fits).
            smoothed: Smoothed phase per matrix.
            phase_history: ``[{"step": s, "phases": {name: phase}}]`` of all analyses so far (for the phase map).
            step: Global step.
            analysis_index: 0-based analysis number.
        """
        p = self.prefix
        if id(writer) not in self._initialized:
            writer.add_custom_scalars(dashboard_layout(p))
            writer.add_text(f"{p}/phase_legend", phase_legend(), step)
            self._initialized.add(id(writer))
        if self.log_histograms:
            for result in analyses:
                if result.eigenvalues is not None and (positive := result.eigenvalues[result.eigenvalues > 0]).size:
                    writer.add_histogram(f"{p}/{result.name}/log10_eigenvalues",
                                         torch.from_numpy(np.log10(positive.astype(np.float64))), step)
        jobs = self.figure_jobs(analyses, smoothed, phase_history, step=step, analysis_index=analysis_index)
        for job in jobs:
            if takes_png(writer):
                self.renderer.submit(writer, job)
            else:  # another SummaryWriter-like writer: its own add_figure, in process
                writer.add_figure(job.tag, draw(job), step, close=False)
        writer.add_text(f"{p}/latest", results_table([r.record for r in analyses], smoothed), step)
        writer.flush()

    def figure_jobs(self, analyses: Sequence[MatrixResult], smoothed: Mapping[str, str | None],
                    phase_history: Sequence[Mapping[str, Any]], *, step: int,
                    analysis_index: int) -> list[FigureJob]:
        """The figures of one analysis: an ESD per matrix when :meth:`figures_due`, and the phase map."""
        now, jobs = time.time(), []
        if self.figures_due(analysis_index):
            for result in analyses:
                if result.eigenvalues is not None:
                    phase = smoothed.get(result.name) or result.record.get("phase")
                    jobs.append(FigureJob(f"{self.prefix}/{result.name}/esd", step, "esd", {
                        "eigenvalues": result.eigenvalues, "powerlaw": result.powerlaw, "mp": result.mp,
                        "phase": phase, "Q": result.record.get("Q"), "title": f"{result.name} (step {step})"}, now))
                    if self.log_fit_diagnostics and result.scan is not None:
                        jobs.append(FigureJob(f"{self.prefix}/{result.name}/fit_diagnostics", step,
                                              "fit_diagnostics", {
                            "eigenvalues": result.eigenvalues, "scan": result.scan, "mp": result.mp, "phase": phase,
                            "Q": _aspect(result.record.get("Q")), "title": f"{result.name} (step {step})"}, now))
        if phase_history:
            names = [r.name for r in analyses]
            grid = [[h["phases"].get(n) for h in phase_history] for n in names]
            jobs.append(FigureJob(f"{self.prefix}/phase_map", step, "phase_map", {
                "names": names, "steps": [h["step"] for h in phase_history], "phases": grid,
                "xlabel": "global step", "title": "smoothed_phase per matrix and analysis"}, now))
        return jobs

    def write_stop(self, writer: Any, message: str, step: int) -> None:
        """Record why training was stopped."""
        writer.add_text(f"{self.prefix}/stopping_reason", message, step)
        writer.flush()

    def close(self) -> None:
        """Wait for the figures still being drawn, write them and flush (idempotent)."""
        self.renderer.close()
