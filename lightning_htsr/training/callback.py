"""``HTSRCallback``: HT-SR diagnostics of every weight matrix during training, live in TensorBoard (or any Lightning
logger), with optional early stopping once the layers are heavy-tailed.

The callback is a thin, resumable shell around the pure stages (see :mod:`lightning_htsr.functional`): it holds the
schedule (:class:`~lightning_htsr.training.schedule.AnalysisSchedule`), the phase tracker, the stop state, and
dispatches each analysis to the sinks. It works with ``lightning.pytorch`` (this module) and ``pytorch_lightning``
(:mod:`lightning_htsr.pytorch_lightning`, same class on the other namespace's ``Callback``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from typing_extensions import override

from ..analysis import resolve_options, warn_bad_input
from ..records import MatrixResult
from ..spectra.phases import Phase, PhaseConfig, PhaseTracker
from ..weights.adapters import check_lora_mode
from .best_weights import KeptWeights, rank_file
from .live import analyze_live
from .monitor import MonitorReader
from .reuse import ResultCache
from .schedule import AnalysisSchedule
from .sinks.history import HISTORY_FILE, SPECTRA_FILE, HistoryWriter, set_aside, split_after, write_spectra
from .sinks.scalars import is_model_key, scalar_metrics
from .sinks.summary import fit_summary, validation_metrics
from .sinks.tensorboard import TensorBoardSink, tensorboard_writer
from .stopping import (
    BestAnalysis,
    StopCriteria,
    StopDecision,
    StopReason,
    StopState,
    evaluate_stop,
    forget_replaced,
    update_monitor,
)

if TYPE_CHECKING:  # the same class serves lightning.pytorch and pytorch_lightning; annotations name the former
    from lightning.pytorch import Callback as _CallbackHooks
    from lightning.pytorch import LightningModule, Trainer
else:  # at run time the namespace's own Callback comes in through HTSRCallback's bases
    _CallbackHooks = object

try:
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
except ImportError:  # pragma: no cover - only the standalone pytorch_lightning package is installed
    from pytorch_lightning.utilities.rank_zero import rank_zero_warn  # type: ignore[no-redef]

__all__ = ["HTSRCallback"]


PhaseName = Literal["random_like", "bleeding_out", "bulk_plus_spikes", "bulk_decay", "heavy_tailed", "rank_collapse"]


class _HTSRCallbackImpl(_CallbackHooks):
    """Analyze every weight matrix's eigenvalue spectrum during training (Heavy-Tailed Self-Regularization).

    At the chosen epochs (and/or steps, and once before training as a baseline) the callback computes the ESD of
    ``W^T W / N`` for every ``Linear``, ``Conv``, ``Embedding``, attention and recurrent weight *on the weights'
    device*, fits the power-law tail (``alpha``), the spectral entropy, a Marchenko-Pastur bulk with Tracy-Widom
    spikes and the 5+1 phase, and logs them:

    * to every logger as scalars ``htsr/<layer>/alpha``, ``.../entropy``, ``.../phase`` (integer code), ``.../
      alpha_weighted``, ``.../stable_rank``, ``.../mp_softrank``, ``.../num_spikes`` and model-level
      ``htsr/alpha_mean``, ``htsr/entropy_mean``, ``htsr/frac_heavy_tailed`` ... at ``step=trainer.global_step``;
    * to ``trainer.callback_metrics`` (so ``EarlyStopping(monitor="htsr/alpha_mean")`` works);
    * with a TensorBoard logger, also histograms of log10 eigenvalues, ESD figures, a phase map, a dashboard and a
      table;
    * to a history file (one row per matrix per analysis, flushed immediately) under the logger's log dir.

    With ``stop_on="heavy_tailed"`` it stops training once self-regularization has *settled*: every learning
    matrix (classified, not random-like) has kept its alpha within ``alpha_tolerance`` and its entropy within
    ``entropy_tolerance`` (relative) for ``patience`` epochs, and at least one matrix is heavy-tailed (phases
    smoothed with ``phase_hysteresis``); or once the spectra *turn*: half of the learning matrices' entropy has risen
    above its lowest value (``detect_overfitting``), as when a network memorizes noise. The rule reads the weights
    only; it was measured on 11 tasks x 10 seeds, 4 of them over-fitting (``benchmarks/bench_stopping.py``;
    ``docs/guide/early-stopping.md``): on the held-out seeds 60 % of the runs ended within 1 accuracy point of
    their best (93 % of the runs on tasks that do not over-fit), and it does not see an MLP over-fitting label
    noise. With a validation metric it also stops when that metric stalls and hands back the best weights (held
    out: 70 % with ``monitor="val_acc", monitor_mode="max"``, 75 % with ``monitor="val_loss"``; on six held-out
    tasks 42 and 27 of 60 runs).
    ``stop_rule="phase_fraction"`` is the rule of version 0.1 (stop when ``stop_fraction`` of the matrices are in
    ``stop_on``), which stops too early or never. When it stops, one line says why (at INFO, rank zero); at the end
    of ``fit`` a short summary is printed (``print_summary``). Under DDP each rank analyzes a share of the matrices
    and all ranks receive all results; the stop decision is reduced across ranks; FSDP2/DTensor weights are gathered
    with ``full_tensor()``.

    Args:
        every_n_epochs: Analyze at the end of every n-th epoch; 0 disables epoch-based analyses.
        epochs: Explicit 0-based epochs to analyze at the end of (overrides ``every_n_epochs``).
        every_n_steps: Also analyze every n optimizer steps (``None``: never).
        analyze_on_train_start: Analyze once before the first step: the baseline of a fresh run (logged at step
            0; it never stops training and does not count towards ``patience``).
        include: Regex (or list) a matrix name must match to be analyzed.
        exclude: Regex (or list) of matrix names to skip.
        layer_types: Restrict to these layer types (``"linear"``, ``"conv2d"``, ``"embedding"``,
            ``"attention_in_proj"``, ``"lstm"``, ... or class names).
        backend: ``"torch"`` (``torch.linalg``) or ``"cupy"`` (CUDA; ``pip install -e ".[cupy]"``).
        fit: Power-law search, ``"fast"`` or ``"exact"``.
        precision: ``"auto"`` (float32 where accurate enough), ``"float32"`` or ``"float64"``.
        min_evals: The minimum spectrum size: matrices with fewer pooled eigenvalues are not classified (phase
            -1) and stay out of the model-level means (default ``phase_config.min_evals``, 50); see
            :func:`~lightning_htsr.analysis.resolve_options`.
        max_evals: Skip matrices with more pooled eigenvalues (``None``: no limit).
        phase_config: Thresholds of the phase classifier (default :class:`~lightning_htsr.PhaseConfig`).
        phase_hysteresis: A matrix's reported phase changes after this many consecutive agreeing analyses.
        log_histograms: TensorBoard histogram of log10 eigenvalues per matrix at every analysis.
        log_figures_every: TensorBoard ESD figures every this many analyses (``None`` or 0: never).
        log_fit_diagnostics: With each ESD figure, also the power-law fit's diagnostics
            (``<prefix>/<matrix>/fit_diagnostics``: D and alpha over the candidate xmin, lin-lin and log-lin ESD
            with the MP bulk; :func:`~lightning_htsr.fit_plots.plot_fit_diagnostics`). Off by default: the
            curves cost one extra pass over each spectrum (``O(1024 n)``) on those analyses.
        background_figures: Draw the TensorBoard figures (ESD, phase map) in a child process, so that training
            does not wait for them; they are written with their analysis' step, and all of them by the end of
            ``fit`` (also when it ends with an exception). ``False`` draws them in the training thread.
        history_file: File name (relative to the logger's log dir) or path of the history; ``None`` disables it.
            ``.jsonl`` writes JSON lines, anything else CSV.
        spectra_file: File (relative to the log dir) holding the eigenvalues of the latest analysis (``.npz``,
            replaced at each analysis; read by ``lightning-htsr report``); ``None`` disables it.
        stop_on: Phase that ends training (``"heavy_tailed"``); ``None`` observes only.
        stop_rule: ``"settled"`` (default: stop once the learning matrices' alpha and entropy have settled and at
            least one is in ``stop_on``) or ``"phase_fraction"`` (stop once ``stop_fraction`` of the classified
            matrices are in ``stop_on``: measured to stop while accuracy still climbs, or never).
        stop_fraction: ``stop_rule="phase_fraction"`` only: share of classified matrices that must be in ``stop_on``.
        patience: ``"settled"``: epochs of training every learning matrix must stay within the tolerances
            (default 7; fractional epochs count with ``every_n_steps``, so the rule does not depend on the
            schedule); ``"phase_fraction"`` and ``stop_on_over_trained``: consecutive qualifying analyses
            (default 1).
        alpha_tolerance: ``"settled"``: relative change of a matrix's alpha that still counts as settled.
        entropy_tolerance: ``"settled"``: relative change of a matrix's spectral entropy that still counts as
            settled.
        min_epochs: Never stop before this epoch.
        stop_on_over_trained: Also stop when a matrix with a trusted power-law tail has alpha < 2 (measured to
            stop early on tasks whose accuracy still improves; off by default).
        detect_overfitting: ``"settled"`` rule: also stop when at least half of the learning matrices' spectral
            entropy has turned back up (above its lowest value by ``overfit_tolerance`` for ``overfit_patience``
            epochs): the spectra drifting back toward random as the network memorizes noise (measured to catch the
            GRUs that memorize; not an LSTM language model, nor MLPs, CNNs or transformers fitting label noise, whose
            spectra keep getting heavier).
        overfit_tolerance: Relative rise of a matrix's spectral entropy above its lowest value that counts as turned.
        overfit_patience: Epochs a matrix's entropy must stay turned.
        monitor: Optional logged metric (e.g. ``"val_loss"``, never required): with it the best analysis is the one
            with the best value, and training also stops when the value has not improved for ``monitor_patience``
            epochs once it has improved at all; such a stop hands back the best analysis' weights. Read at the
            end of every training epoch that ran validation (rank zero's value, broadcast to every rank; an equal
            value is a stale epoch). Measured on the stopping benchmark: the HT-SR rule plus this stop beats both
            ``EarlyStopping`` and the weights-only rule; the weights handed back are those of the metric's best
            epoch, so monitor the metric you score: a validation loss that bottoms out long before the accuracy
            hands back worse weights (4-12 points lost on a small-data CNN); measured, which of the two does
            better depends on the task (held out: ``"val_loss"`` 75 %, ``"val_acc"`` with ``monitor_mode="max"``
            70 % of 77 runs within 1 point; 27 and 42 of 60 runs on six held-out tasks).
        monitor_mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
        monitor_patience: Epochs (new values) without improvement of ``monitor`` before it stops training.
        restore_best_weights: When training stops for over-fitting, hand back the weights of the analysis judged best
            (the last one before any learning matrix's entropy rose above its lowest value; with ``monitor``, the
            epoch with the best value, and only on the monitor's own stop) instead of the last ones. ``None``: on
            with ``monitor``, off without. The callback then keeps one copy of the parameters and buffers in CPU
            memory (this rank's local shards under FSDP2; 4 GB for 1B float32 parameters), written next to the
            history at each checkpoint so that a resumed run can still restore it. Off without ``monitor`` by
            measurement (``docs/guide/early-stopping.md``): on the GRU language model the weights before the turn
            are the best, but on the noisy GRU classifier test accuracy still climbs for a few epochs after the
            spectra turn, and restoring loses more there (up to 21 points) than it gains.
        print_summary: At the end of ``fit``, print per matrix the phase reached, alpha and since when it settled,
            and whether and why training stopped (rank zero).
        prefix: Namespace of logged keys; two callbacks in one Trainer need different prefixes.
        verbose: Log one line per analysis at INFO level.
        extra_scalars: More record columns to log per matrix as ``<prefix>/<matrix>/<column>``, e.g.
            ``["ERG_gap", "num_ERG_spikes"]`` (weightwatcher's ERG/detX columns make good curves over training).
        lora: How a ``peft`` LoRA layer is analyzed: one matrix named by the base model's path, computed on
            ``"merged"`` (``W + scaling * B @ A``, default: the weight the layer computes with, which changes as
            the adapters train), ``"delta"`` (the update alone, rank ``r``) or ``"base"`` (the frozen ``W``); see
            :func:`~lightning_htsr.analyze`.
        reuse_unchanged: Analyze an unchanged weight once and reuse its results while it stays unchanged (frozen
            weights in fine-tuning cost one read per analysis); change is detected by the tensor's data pointer,
            version counter and a fingerprint of its values (:mod:`~lightning_htsr.training.reuse`). Sharded weights
            (FSDP2/DTensor, ZeRO-3) are analyzed every time. ``last_reused`` lists the matrices the latest
            analysis reused.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        epochs: list[int] | None = None,
        every_n_steps: int | None = None,
        analyze_on_train_start: bool = True,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        layer_types: list[str] | None = None,
        backend: Literal["torch", "cupy"] = "torch",
        fit: Literal["fast", "exact"] = "fast",
        precision: Literal["auto", "float32", "float64"] = "auto",
        min_evals: int | None = None,
        max_evals: int | None = None,
        phase_config: PhaseConfig | None = None,
        phase_hysteresis: int = 2,
        log_histograms: bool = True,
        log_figures_every: int | None = 5,
        log_fit_diagnostics: bool = False,
        background_figures: bool = True,
        history_file: str | None = HISTORY_FILE,
        spectra_file: str | None = SPECTRA_FILE,
        stop_on: PhaseName | None = None,
        stop_rule: Literal["settled", "phase_fraction"] = "settled",
        stop_fraction: float = 0.8,
        patience: float | None = None,
        alpha_tolerance: float = StopCriteria.alpha_tolerance,
        entropy_tolerance: float = StopCriteria.entropy_tolerance,
        min_epochs: int = 0,
        stop_on_over_trained: bool = False,
        detect_overfitting: bool = True,
        overfit_tolerance: float = StopCriteria.overfit_tolerance,
        overfit_patience: float = StopCriteria.overfit_patience,
        monitor: str | None = None,
        monitor_mode: Literal["min", "max"] = "min",
        monitor_patience: int = StopCriteria.monitor_patience,
        restore_best_weights: bool | None = None,
        print_summary: bool = True,
        prefix: str = "htsr",
        verbose: bool = False,
        extra_scalars: list[str] | None = None,
        lora: Literal["merged", "delta", "base"] = "merged",
        reuse_unchanged: bool = True,
    ) -> None:
        super().__init__()
        self.lora = check_lora_mode(lora)
        self.reuse_unchanged = reuse_unchanged
        self._reuse = ResultCache()
        self.schedule = AnalysisSchedule(every_n_epochs=every_n_epochs, epochs=epochs, every_n_steps=every_n_steps,
                                         on_train_start=analyze_on_train_start)
        self.criteria = StopCriteria(stop_on=stop_on, rule=stop_rule, stop_fraction=stop_fraction, patience=patience,
                                     alpha_tolerance=alpha_tolerance, entropy_tolerance=entropy_tolerance,
                                     min_epochs=min_epochs, stop_on_over_trained=stop_on_over_trained,
                                     overfitting=detect_overfitting, overfit_tolerance=overfit_tolerance,
                                     overfit_patience=overfit_patience, monitor=monitor, monitor_mode=monitor_mode,
                                     monitor_patience=monitor_patience)
        self.restore_best_weights = monitor is not None if restore_best_weights is None else restore_best_weights
        self.print_summary = print_summary
        self.include, self.exclude, self.layer_types = include, exclude, layer_types
        self.options = resolve_options(fit=fit, precision=precision, backend=backend, min_evals=min_evals,
                                       max_evals=max_evals, phase_config=phase_config)
        self.history_file = history_file
        self.spectra_file = spectra_file
        self.spectra_path: str | None = None
        self.prefix = prefix
        self.verbose = verbose
        self.extra_scalars = tuple(extra_scalars or ())
        self.tensorboard = TensorBoardSink(prefix, log_histograms, log_figures_every, background_figures,
                                           log_fit_diagnostics)
        self._init_state(phase_hysteresis)

    def _init_state(self, phase_hysteresis: int) -> None:
        """The state of a fresh run: what :meth:`state_dict` checkpoints, then what lives for one run only."""
        # checkpointed state (plain Python values only: loads with torch.load(weights_only=True))
        self.tracker = PhaseTracker(k=phase_hysteresis)
        self.analysis_count = 0
        self.stop_state = StopState()
        self.stopped_epoch = -1
        self.stopping_reason = StopReason.NOT_STOPPED
        self.stopping_reason_message = ""
        self.last_analysis_step = -1
        self.phase_history: list[dict[str, Any]] = []
        self.restored = False  # whether the best analysis' weights were handed back at the end of training
        self.best_weights_file: str | None = None  # the kept copy's file at the latest checkpoint (-rank<r> per rank)
        # per-run, not checkpointed
        self.kept = KeptWeights()
        self._restore_pending = False
        self._root: str | None = None
        self.monitor_reader = MonitorReader(self.criteria.monitor)  # its reading state is checkpointed
        self._last_step_seen = 0  # global_step at the previous batch end (every_n_steps counts crossings)
        self.latest_records: list[dict[str, Any]] = []
        self.latest_smoothed: dict[str, str | None] = {}
        self.history_path: str | None = None
        self._warned_no_logger = False
        self._warned_bad: set[str] = set()

    #: Logger namespace whose handler Lightning installs (INFO lines show up like Lightning's own).
    _log_namespace = "lightning.pytorch"

    def _info(self, message: str) -> None:
        logging.getLogger(f"{self._log_namespace}.callbacks.htsr").info(message)

    # ------------------------------------------------------------------------------------------- Lightning API

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def best_analysis(self) -> BestAnalysis | None:
        """The analysis the stop rule judges best so far (the latest before any learning matrix's spectral entropy
        turned back up; with ``monitor``, the epoch with the best value), ``None`` before any."""
        return self.stop_state.best

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.monitor_reader.start_fit()  # a validate() before this fit is not one of its validations
        self._root = trainer.log_dir or trainer.default_root_dir  # collective: every rank must call it (all do)
        if getattr(trainer, "fast_dev_run", False):
            return  # like Lightning's loggers and checkpoints: a smoke run writes no files
        if self.history_file:  # join keeps an absolute history_file
            self.history_path = os.path.join(self._root, self._tagged(self.history_file, HISTORY_FILE))
        if self.spectra_file:
            self.spectra_path = os.path.join(self._root, self._tagged(self.spectra_file, SPECTRA_FILE))

    def _tagged(self, name: str, default: str) -> str:
        """A default file name with a second callback's :attr:`prefix_tag` (``htsr_history-hb.csv``), so that two
        callbacks in one Trainer never write one file; a name the user chose is kept."""
        if name != default or not self.prefix_tag:
            return name
        stem, dot, suffix = name.rpartition(".")
        return f"{stem}{self.prefix_tag}{dot}{suffix}"

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step_seen = int(trainer.global_step)
        fresh = trainer.global_step == 0 and self.analysis_count == 0
        if trainer.is_global_zero and self.history_path is not None:
            self._tidy_history(self.history_path, fresh)
        if self.schedule.on_train_start and fresh:
            self._run(trainer, pl_module, "train_start")

    def _tidy_history(self, path: str, fresh: bool) -> None:
        """Never append to rows that are not this run's: a fresh run moves an earlier run's history aside (same
        directory with ``logger=False`` or a fixed logger version); a resumed run moves the rows written after its
        checkpoint (they are written again). Both with a warning; nothing is deleted."""
        try:
            if fresh:
                moved = set_aside(path)
                if moved is not None:
                    rank_zero_warn(f"HTSRCallback: {path} held an earlier run's history; moved to {moved}")
                return
            count, moved = split_after(path, self.analysis_count)
            if moved is not None:
                rank_zero_warn(f"HTSRCallback: {count} history rows of analyses from {self.analysis_count} on were "
                               f"written after the checkpoint this run resumes from; moved to {moved}")
        except Exception as err:  # noqa: BLE001 - bad input never breaks training: the rows are then appended
            rank_zero_warn(f"HTSRCallback: could not tidy {path} before this run ({err}); appending to it")

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        previous, self._last_step_seen = self._last_step_seen, int(trainer.global_step)
        if self.schedule.step_due(trainer.global_step, previous) and trainer.global_step != self.last_analysis_step:
            batches = trainer.num_training_batches
            fraction = (batch_idx + 1) / batches if isinstance(batches, int) and batches > 0 else 0.0
            self._run(trainer, pl_module, "step", progress=trainer.current_epoch + min(fraction, 1.0))

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.monitor_reader.after_validation(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.epoch_due(trainer.current_epoch) and trainer.global_step != self.last_analysis_step:
            self._run(trainer, pl_module, "epoch_end")
        elif self.criteria.monitor is not None and self.analysis_count > 0 and not trainer.should_stop:
            self._monitor_between_analyses(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restore_pending:
            self._restore(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.kept.empty:
            return
        base = os.path.join(self._root or trainer.default_root_dir, f"htsr_best_weights{self.prefix_tag}.pt")
        path = rank_file(base, int(trainer.global_rank), int(trainer.world_size))
        try:
            self.kept.save(path)
            self.best_weights_file = base  # the same in every rank's state: each rank reads its own file back
        except OSError as err:  # a full disk must not end training; the resumed run then cannot restore
            rank_zero_warn(f"HTSRCallback: could not write the kept best weights to {path} ({err}); a run resumed "
                           "from this checkpoint will keep its last weights instead")

    @property
    def prefix_tag(self) -> str:
        """The file-name tag of a second callback (``prefix`` other than ``htsr``)."""
        return "" if self.prefix == "htsr" else f"-{self.prefix.replace('/', '_')}"

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.tensorboard.close()  # the last figures, before the loggers are finalized
        if self.print_summary and trainer.is_global_zero and self.latest_records:
            print(fit_summary(self.latest_records, self.latest_smoothed, self.stop_state, self.criteria,
                              self.stopping_reason_message if self.stopped_epoch >= 0 else None,
                              logged_validation=validation_metrics(trainer.callback_metrics)))
            best = self.stop_state.best
            if self.restored and best is not None:
                print(f"The model now holds the weights of analysis {best.analysis} (epoch {best.epoch}, step "
                      f"{best.step}), not the last ones.")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.tensorboard.close()  # the figures of every analysis so far, before the loggers are finalized

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.tensorboard.close()

    @property
    def last_reused(self) -> list[str]:
        """Names of the matrices whose results the latest analysis reused (unchanged since analyzed; this rank's)."""
        return list(self._reuse.reused)

    @property
    def wait_count(self) -> int:
        """Consecutive analyses that met a ``phase_fraction`` / over-training criterion."""
        return self.stop_state.wait_count

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "analysis_count": self.analysis_count,
            "stop_state": self.stop_state.state_dict(),
            "stopped_epoch": self.stopped_epoch,
            "stopping_reason": self.stopping_reason.value,
            "stopping_reason_message": self.stopping_reason_message,
            "last_analysis_step": self.last_analysis_step,
            "tracker": self.tracker.state_dict(),
            "phase_history": pack_phase_history(self.phase_history),
            "restored": self.restored,
            "best_weights_file": self.best_weights_file,
            **self.monitor_reader.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.analysis_count = int(state_dict.get("analysis_count", 0))
        self.stop_state = StopState.from_state_dict(state_dict.get("stop_state", {}))
        self.stopped_epoch = int(state_dict.get("stopped_epoch", -1))
        self.stopping_reason = StopReason(int(state_dict.get("stopping_reason", 0)))
        self.stopping_reason_message = str(state_dict.get("stopping_reason_message", ""))
        self.last_analysis_step = int(state_dict.get("last_analysis_step", -1))
        self.tracker.load_state_dict(state_dict.get("tracker", {}))
        self.phase_history = unpack_phase_history(state_dict.get("phase_history", []))
        self.restored = bool(state_dict.get("restored", False))
        self.best_weights_file = state_dict.get("best_weights_file")
        self.monitor_reader.load_state_dict(state_dict)
        self._load_kept()

    def _load_kept(self) -> None:
        """Read back the kept copy a checkpoint refers to (a missing or damaged file: warn, keep the last weights)."""
        best, base = self.stop_state.best, self.best_weights_file
        if not self.restore_best_weights or best is None or base is None:
            return
        dist = torch.distributed
        running = dist.is_available() and dist.is_initialized()
        path = rank_file(base, dist.get_rank() if running else 0, dist.get_world_size() if running else 1)
        try:
            self.kept.load(path)
        except Exception as err:  # noqa: BLE001 - bad input never breaks training
            self.kept.clear()
            rank_zero_warn(f"HTSRCallback: could not read the kept best weights {path} ({type(err).__name__}: {err}); "
                           "if training stops for over-fitting it keeps its last weights")
            return
        if self.kept.analysis != best.analysis:
            held = self.kept.analysis
            self.kept.clear()
            rank_zero_warn(f"HTSRCallback: {path} holds analysis {held}, not the best one ({best.analysis}); if "
                           "training stops for over-fitting it keeps its last weights")

    # ---------------------------------------------------------------------------------------------- analysis

    def _run(self, trainer: Trainer, pl_module: LightningModule, trigger: str, progress: float | None = None) -> None:
        start = time.perf_counter()
        with trainer.profiler.profile(f"[HTSR]{self.prefix}.analyze"):
            results = self._compute(trainer, pl_module)
        records = [dict(r.record) for r in results]
        self._forget_replaced(trainer, records)
        smoothed = self.tracker.update_records(records)  # None for a matrix this analysis did not classify
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        self.phase_history.append({"step": step, "epoch": epoch, "phases": dict(smoothed)})
        metrics = scalar_metrics(records, smoothed, prefix=self.prefix, extra=self.extra_scalars)
        metrics[f"{self.prefix}/compute_seconds"] = time.perf_counter() - start
        # the baseline is an observation: it never stops training nor counts towards patience
        # the monitored metric is read at epoch ends only: after the epoch's validation, at the weights it validated
        monitored = self.monitor_reader.at_epoch_end(trainer) if trigger == "epoch_end" else None
        should_stop, message = self._decide(trainer, pl_module, records, smoothed, epoch, step, progress, monitored) \
            if trigger != "train_start" else (False, "")
        if self.stop_state.best is not None:
            metrics[f"{self.prefix}/best_analysis"] = float(self.stop_state.best.analysis)
        self._publish(trainer, metrics, step, epoch)
        if trainer.is_global_zero:
            self._write_views(trainer, results, smoothed, step, trigger, epoch, message if should_stop else "")
        self._warn_bad_input(trainer, records)
        self.latest_records, self.latest_smoothed = records, smoothed
        self.analysis_count += 1
        self.last_analysis_step = step
        if self.verbose and trainer.is_global_zero:
            model_level = {k[len(self.prefix) + 1:]: round(v, 3) for k, v in metrics.items()
                           if is_model_key(k, self.prefix)}
            self._info(f"HT-SR analysis {self.analysis_count - 1} at step {step} ({trigger}): {model_level}")

    def _forget_replaced(self, trainer: Trainer, records: list[dict[str, Any]]) -> None:
        """A matrix whose shape changed since an earlier analysis saw it (a layer replaced mid-training) starts its
        smoothed phase (also in the phase map and the logs), anchors and entropy low afresh; said once per
        replacement."""
        self.stop_state, replaced = forget_replaced(self.stop_state, records, self.tracker)
        if replaced and trainer.is_global_zero:
            self._info(f"HTSRCallback: {', '.join(replaced)} changed shape (a layer replaced?): their phase and the "
                       "stop rule start afresh, without their predecessors' spectral history")

    def _compute(self, trainer: Trainer, pl_module: LightningModule) -> list[MatrixResult]:
        """This analysis' results for every matrix (all ranks, same order): :func:`~.live.analyze_live`."""
        selection = {"include": self.include, "exclude": self.exclude, "layer_types": self.layer_types,
                     "min_evals": self.options.min_evals, "max_evals": self.options.max_evals}
        return analyze_live(trainer, pl_module, self.options, selection, lora=self.lora,
                            reuse=self._reuse if self.reuse_unchanged else None,
                            scans=self.tensorboard.fit_diagnostics_due(self.analysis_count))

    def _decide(self, trainer: Trainer, pl_module: LightningModule, records: list[dict[str, Any]],
                smoothed: dict[str, str | None], epoch: int, step: int, progress: float | None,
                monitored: float | None) -> tuple[bool, str]:
        decision, self.stop_state = evaluate_stop(self.criteria, self.stop_state, records, smoothed, epoch=epoch,
                                                  progress=progress, step=step, analysis=self.analysis_count,
                                                  monitored=monitored)
        if not self.criteria.active:
            return False, ""
        return self._act(trainer, pl_module, decision, epoch)

    def _monitor_between_analyses(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """An epoch end without an analysis of its own (its weights were analyzed at this step already, or no
        analysis is due): the monitored metric still counts, judged at these weights."""
        value = self.monitor_reader.at_epoch_end(trainer)
        if value is None:
            return
        epoch, where = int(trainer.current_epoch), (self.analysis_count - 1, int(trainer.global_step),
                                                    int(trainer.current_epoch))
        self.stop_state, decision, new_best = update_monitor(self.criteria, self.stop_state, value, where)
        self._act(trainer, pl_module, decision or StopDecision(False, new_best=new_best), epoch)

    def _act(self, trainer: Trainer, pl_module: LightningModule, decision: StopDecision,
             epoch: int) -> tuple[bool, str]:
        """Keep a copy of a new best analysis' weights; stop training (every rank agreeing) and say why."""
        if decision.new_best and self.restore_best_weights and self.stop_state.best is not None:
            self.kept.take(pl_module, analysis=self.stop_state.best.analysis)
        should_stop, reason, message = decision.should_stop, decision.reason, decision.message
        if getattr(trainer, "fast_dev_run", False):
            should_stop = False  # like EarlyStopping: a smoke run computes but never stops
        # the same records reach every rank, but reduce anyway: every rank must agree (and EarlyStopping does)
        should_stop = bool(trainer.strategy.reduce_boolean_decision(should_stop, all=False))
        if should_stop:
            trainer.should_stop = True
            self.stopped_epoch = epoch
            self.stopping_reason = reason if reason is not StopReason.NOT_STOPPED else StopReason.SETTLED
            self.stopping_reason_message = f"{message}; signaling Trainer to stop at epoch {epoch}." if message else \
                "another rank's analysis met the stop rule; signaling Trainer to stop."
            self._restore_pending = self._plan_restore(decision)
            if trainer.is_global_zero:  # whatever `verbose` is, as users of EarlyStopping expect in their log
                self._info(f"HTSRCallback: {self.stopping_reason_message}")
        return should_stop, self.stopping_reason_message

    def _plan_restore(self, decision: StopDecision) -> bool:
        """Whether the end of training hands back the kept weights, said in the stop message either way."""
        if decision.reason not in (StopReason.OVERFITTING, StopReason.MONITOR):
            return False
        best = self.stop_state.best
        if best is None:
            self.stopping_reason_message += " Keeping the last weights (no analysis was judged best)."
            return False
        if best.analysis == self.analysis_count:  # this very analysis is the best one
            self.stopping_reason_message += " The latest weights are the best analysis' and are kept."
            return False
        if not decision.restore_best:
            self.stopping_reason_message += (f" Keeping the last weights (the best analysis was epoch {best.epoch}; "
                                             f"with monitor={self.criteria.monitor!r} only the monitor's own stop "
                                             "hands back its best epoch).")
            return False
        if not self.restore_best_weights:
            self.stopping_reason_message += (" Keeping the last weights (restore_best_weights=False; the best "
                                             f"analysis was epoch {best.epoch}).")
            return False
        if self.kept.empty or self.kept.analysis != best.analysis:
            self.stopping_reason_message += " No kept copy of the best analysis' weights: keeping the last ones."
            return False
        self.stopping_reason_message += f" The weights of epoch {best.epoch} (step {best.step}) will be restored."
        return True

    def _restore(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hand back the kept weights (every rank its own copy or shard), and say so once."""
        self._restore_pending = False
        best = self.stop_state.best
        self.restored = bool(self.kept.restore(pl_module))
        ok = bool(trainer.strategy.reduce_boolean_decision(self.restored, all=True))
        if not ok:
            rank_zero_warn("HTSRCallback: the kept best weights do not fit the model any more; keeping the last ones")
            return
        why = f"best {self.criteria.monitor}" if self.criteria.monitor else "the last before the spectra turned"
        text = (f"HTSRCallback: restored the weights of the best analysis {best.analysis} (epoch {best.epoch}, step "
                f"{best.step}: {why})" if best else "HTSRCallback: restored")
        if trainer.is_global_zero:
            self._info(text)
            for logger in trainer.loggers:
                writer = tensorboard_writer(logger)
                if writer is not None:
                    self.tensorboard.write_stop(writer, text, int(trainer.global_step))

    def _publish(self, trainer: Trainer, metrics: dict[str, float], step: int, epoch: int) -> None:
        """Scalars to every logger (rank-zero inside the loggers) and to ``trainer.callback_metrics``."""
        if self.stopping_reason is not StopReason.NOT_STOPPED:
            metrics[f"{self.prefix}/stopping_reason"] = float(self.stopping_reason.value)
        # Keys of earlier analyses that this one did not produce must not linger: a per-matrix value disappears
        # (its matrix was skipped), a model-level aggregate becomes NaN (nothing left to average: e.g. diverged
        # weights), which EarlyStopping(check_finite=True) on it turns into a stop.
        for key in [k for k in trainer.callback_metrics if k.startswith(f"{self.prefix}/") and k not in metrics]:
            if is_model_key(key, self.prefix):
                trainer.callback_metrics[key] = torch.tensor(float("nan"))
            else:
                del trainer.callback_metrics[key]
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if not trainer.loggers:
            if not self._warned_no_logger:
                rank_zero_warn("HTSRCallback: the Trainer has no logger; HT-SR metrics go to "
                               "trainer.callback_metrics and the history file only.")
            self._warned_no_logger = True
            return
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": float(epoch)}, step=step)
            logger.save()

    def _write_views(self, trainer: Trainer, results: Sequence[MatrixResult],
                     smoothed: dict[str, str | None], step: int, trigger: str, epoch: int, stop_message: str) -> None:
        for logger in trainer.loggers:
            writer = tensorboard_writer(logger)
            if writer is None:
                continue
            self.tensorboard.write(writer, results, smoothed, self.phase_history, step=step,
                                   analysis_index=self.analysis_count)
            if stop_message:
                self.tensorboard.write_stop(writer, stop_message, step)
        if self.history_path:
            best = self.stop_state.best
            rows = [{**r, "analysis": self.analysis_count, "epoch": epoch, "global_step": step, "trigger": trigger,
                     "smoothed_phase": smoothed.get(r["name"]), "stopping_reason": stop_message,
                     "best_analysis": best.analysis if best is not None else None}
                    for r in (result.record for result in results)]
            HistoryWriter(self.history_path).append(rows)
        if self.spectra_path:
            write_spectra(self.spectra_path, {r.name: r.eigenvalues for r in results}, step=step, epoch=epoch)

    def _warn_bad_input(self, trainer: Trainer, records: list[dict[str, Any]]) -> None:
        """One warning per matrix and reason for the whole run (bad weights often stay bad for many epochs)."""
        if trainer.is_global_zero:
            warn_bad_input(records, who="HTSRCallback", seen=self._warned_bad, stacklevel=4)


try:
    from lightning.pytorch import Callback as _Callback
except ImportError:  # pragma: no cover - only the standalone pytorch_lightning package is installed
    from pytorch_lightning import Callback as _Callback  # type: ignore[no-redef]


#: A real (tiny) fit, run by ``pytest --doctest-modules`` (the test command): on ``HTSRCallback`` of this module only,
#: so it runs once (the ``pytorch_lightning`` twin and the shared implementation class do not repeat it).
_FIT_EXAMPLE = """
    Example:
        A linear layer learning a linear map for 2 epochs, analyzed before training and after each epoch:

        >>> import tempfile
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> from lightning_htsr import HTSRCallback
        >>> class Regression(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(64, 128)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.mse_loss(self.layer(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.05)
        >>> _ = pl.seed_everything(0, verbose=False)
        >>> x = torch.randn(256, 64)
        >>> y = x @ torch.randn(64, 128)
        >>> data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
        >>> htsr = HTSRCallback(print_summary=False)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[htsr], logger=CSVLogger(tempfile.mkdtemp()),
        ...                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        ...                      log_every_n_steps=1)
        >>> trainer.fit(Regression(), data)
        >>> htsr.analysis_count  # the baseline before training, then one per epoch
        3
        >>> [r["name"] for r in htsr.latest_records], float(trainer.callback_metrics["htsr/num_classified"])
        (['layer'], 1.0)
        >>> "htsr/layer/alpha" in trainer.callback_metrics, "htsr/alpha_mean" in trainer.callback_metrics
        (True, True)
        >>> from lightning_htsr.training.sinks.history import read_history
        >>> read_history(htsr.history_path)["analysis"].tolist()  # one row per matrix per analysis
        [0, 1, 2]
"""


class HTSRCallback(_HTSRCallbackImpl, _Callback):  # type: ignore[misc,valid-type]
    __doc__ = (_HTSRCallbackImpl.__doc__ or "") + _FIT_EXAMPLE


_PHASE_CHARS = {**{p.value: str(p.code) for p in Phase}, None: "."}
_CHAR_PHASES = {c: p for p, c in _PHASE_CHARS.items()}


def pack_phase_history(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The phase map's history in a checkpoint: the matrix names once, then per analysis its step, epoch and one
    character per matrix (its phase code, ``.`` for none or absent: the map draws both alike). Measured with
    ``torch.save``: 1000 analyses of 26 matrices take 43 KB instead of 127 KB as a dict of names per analysis.

    Example:
        >>> packed = pack_phase_history([{"step": 0, "epoch": 0, "phases": {"a": "random_like", "b": None}},
        ...                              {"step": 8, "epoch": 0, "phases": {"a": "heavy_tailed"}}])
        >>> packed["phases"], unpack_phase_history(packed)[1]
        (['0.', '4.'], {'step': 8, 'epoch': 0, 'phases': {'a': 'heavy_tailed', 'b': None}})
    """
    names = list(dict.fromkeys(n for h in history for n in h["phases"]))
    return {"names": names, "steps": [int(h["step"]) for h in history], "epochs": [int(h["epoch"]) for h in history],
            "phases": ["".join(_PHASE_CHARS[h["phases"].get(n)] for n in names) for h in history]}


def unpack_phase_history(state: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Inverse of :func:`pack_phase_history`; also reads the list of dicts older checkpoints hold."""
    if isinstance(state, list):
        return [dict(h) for h in state]
    return [{"step": step, "epoch": epoch, "phases": {n: _CHAR_PHASES[c] for n, c in zip(state["names"], codes)}}
            for step, epoch, codes in zip(state["steps"], state["epochs"], state["phases"])]

