"""TensorBoard figures (ESD fits, the phase map) drawn and PNG-encoded off the training process.

Drawing the figures is almost all of what the callback costs a training run (measured in
``benchmarks/bench_callback_overhead.py``: the spectra of 26 matrices take 0.09 s, their 26 ESD figures several
seconds). A thread would not help: matplotlib holds the GIL while it draws, and the training loop needs it between
two torch kernels. So :class:`FigureRenderer` hands each figure to a child process (``python -c``, not
``multiprocessing``: a user's script without an ``if __name__ == "__main__"`` guard is not re-run; one per Python
process, shared by every renderer and kept across fits), which draws it with Agg and returns the PNG; a reader
thread writes the PNG to the ``SummaryWriter`` with the step and wall time of the analysis it belongs to.
:meth:`FigureRenderer.close` (end of ``fit``, or an exception) waits for every figure of its own still being drawn;
figures a dead child did not return are drawn in process, so none is lost. The pixels are the same as
``SummaryWriter.add_figure`` of the same figure (Agg, RGB, PIL's PNG encoder).
"""

from __future__ import annotations

import atexit
import io
import itertools
import os
import pickle
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FigureJob", "FigureRenderer", "fast_layout", "render_png", "stop_figure_worker"]


@dataclass(frozen=True)
class FigureJob:
    """One TensorBoard image: what to draw and where it goes.

    Attributes:
        tag: TensorBoard tag (``htsr/<matrix>/esd``, ``htsr/phase_map``).
        step: Global step of the analysis the figure belongs to.
        kind: ``"esd"`` (:func:`~lightning_htsr.plotting.plot_esd`), ``"fit_diagnostics"``
            (:func:`~lightning_htsr.fit_plots.plot_fit_diagnostics`) or ``"phase_map"``
            (:func:`~lightning_htsr.plotting.plot_phase_map`).
        kwargs: The plotting function's arguments (plain values, NumPy arrays and the frozen fits: picklable).
        walltime: When the analysis ran (TensorBoard's wall time of the image).
    """

    tag: str
    step: int
    kind: str
    kwargs: dict[str, Any]
    walltime: float


def _esd_figure(**kwargs: Any) -> Any:
    from ...plotting import plot_esd

    fig = plot_esd(**kwargs)
    fast_layout(fig)
    return fig


def _fit_figure(**kwargs: Any) -> Any:
    from ...fit_plots import plot_fit_diagnostics

    fig = plot_fit_diagnostics(**kwargs)
    fast_layout(fig)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.07, top=0.91, wspace=1.1, hspace=0.33)  # 2 x 6 grid
    return fig


def _phase_map_figure(**kwargs: Any) -> Any:
    from ...plotting import plot_phase_map

    return plot_phase_map(**kwargs)


_FIGURES: dict[str, Callable[..., Any]] = {"esd": _esd_figure, "fit_diagnostics": _fit_figure,
                                           "phase_map": _phase_map_figure}


def draw(job: FigureJob) -> Any:
    """The matplotlib figure of ``job``."""
    return _FIGURES[job.kind](**job.kwargs)


def render_png(job: FigureJob) -> tuple[bytes, int, int]:
    """Draw ``job`` with Agg and encode it as PNG: ``(png, height, width)``, the pixels ``add_figure`` would write.

    Example:
        >>> job = FigureJob("t", 0, "phase_map", {"names": ["a"], "steps": [0], "phases": [["heavy_tailed"]]}, 0.0)
        >>> png, height, width = render_png(job)
        >>> png[:4], (height, width)
        (b'\\x89PNG', (250, 600))
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(draw(job))
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[:, :, :3]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return buffer.getvalue(), int(rgb.shape[0]), int(rgb.shape[1])


def write_png(writer: Any, job: FigureJob, png: bytes, height: int, width: int) -> None:
    """Write an encoded image to a ``torch.utils.tensorboard.SummaryWriter`` as ``add_image`` would."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=job.tag, image=image)]), job.step,
                                          job.walltime)


def takes_png(writer: Any) -> bool:
    """Whether ``writer`` is torch's ``SummaryWriter`` (encoded images are written to its file writer); other
    writers get ``add_figure``, drawn in process."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return False
    return isinstance(writer, SummaryWriter)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_MATH_POWER = re.compile(r"\$\\mathdefault\{(?:([0-9.]+)\\times)?10\^\{(-?\d+)\}\}\$")
_MATH_PLAIN = re.compile(r"\$\\mathdefault\{([0-9.]+)\}\$")


def plain_log_label(label: str) -> str:
    """A log axis' mathtext tick label as plain text with Unicode superscripts (``10⁻²``, ``2×10³``), the same
    text without the mathtext parser (half of an ESD figure's drawing time); other labels are returned unchanged.

    Example:
        >>> plain_log_label(r"$\\mathdefault{10^{-2}}$"), plain_log_label(r"$\\mathdefault{2\\times10^{3}}$")
        ('10⁻²', '2×10³')
    """
    match = _MATH_POWER.fullmatch(label)
    if match:
        return (f"{match.group(1)}×" if match.group(1) else "") + "10" + match.group(2).translate(_SUPERSCRIPT)
    match = _MATH_PLAIN.fullmatch(label)
    return match.group(1) if match else label


def fast_layout(fig: Any) -> None:
    """Fixed margins, no minor ticks and plain-text log tick labels: constrained layout on log-log axes took three
    times as long to draw (146 ms vs 467 ms per ESD figure) and mathtext tick labels half of the rest."""
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation

    fig.set_layout_engine(None)
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.11, top=0.91)
    for ax in fig.axes:
        ax.minorticks_off()
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                formatter = LogFormatterSciNotation()
                formatter.set_axis(axis)
                axis.set_major_formatter(FuncFormatter(lambda x, pos, f=formatter: plain_log_label(f(x, pos))))


class FigureRenderer:
    """Draws :class:`FigureJob` s in a child process and writes each PNG to its writer when it is ready.

    The child is shared by every renderer of this Python process (started at the first figure, kept across fits,
    stopped at exit), so its start-up (importing torch: about 3 s of CPU) is paid once per process, not once per fit.

    Args:
        background: Draw in a child process; ``False`` draws in the calling thread (also the fallback when the
            child cannot start or dies).
        max_pending: Figures submitted but not yet written beyond which :meth:`submit` waits for the child (when
            analyses come faster than it draws, training slows down instead of memory growing).
    """

    def __init__(self, background: bool = True, max_pending: int = 256) -> None:
        self.background = background
        self.max_pending = max_pending
        self._worker: _Worker | None = None
        self._pending: dict[int, tuple[Any, FigureJob]] = {}
        self._failed: list[tuple[Any, FigureJob]] = []  # answered without a PNG, or not written: drawn at close
        self._writers: dict[int, Any] = {}  # written to since the last close(): flushed there
        self._done = threading.Condition()

    def __getstate__(self) -> dict[str, Any]:
        """Settings only (``ddp_spawn`` pickles the callbacks before training): the copy uses its own process's
        child."""
        return {"background": self.background, "max_pending": self.max_pending}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def _process(self) -> subprocess.Popen[bytes] | None:
        """The child drawing this renderer's figures (``None`` before the first figure or without one)."""
        return self._worker.process if self._worker is not None else None

    def submit(self, writer: Any, job: FigureJob) -> None:
        """Draw ``job`` for ``writer`` (a ``SummaryWriter``): queued for the child, or drawn now without one."""
        self._writers[id(writer)] = writer
        if self.background and self._start():
            assert self._worker is not None
            job_id = next(_JOB_IDS)
            with self._done:
                while len(self._pending) >= self.max_pending and self._worker.alive():
                    self._done.wait(timeout=1.0)
                self._pending[job_id] = (writer, job)
            self._worker.send(job_id, job, self)  # a sender thread writes it: a full pipe must not block training
            return
        write_png(writer, job, *render_png(job))

    def close(self, timeout: float = 600.0) -> None:
        """Wait until every submitted figure is written (drawing in process what a dead child left) and flush the
        writers. The shared child keeps running for the next fit."""
        if self._worker is not None:
            deadline = time.monotonic() + timeout
            with self._done:
                while self._pending and self._worker.alive() and time.monotonic() < deadline:
                    self._done.wait(timeout=1.0)
            self._worker.forget(self._pending)
        with self._done:
            left, self._pending, self._failed = [*self._failed, *self._pending.values()], {}, []
        for writer, job in left:
            write_png(writer, job, *render_png(job))
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            writer.flush()

    def _start(self) -> bool:
        if self._worker is not None and self._worker.alive():
            return True
        if self._worker is not None:  # it died: stay in process from now on
            self.background = False
            return False
        self._worker = _shared_worker()
        if self._worker is None:
            self.background = False
        return self._worker is not None

    def _answer(self, job_id: int, png: bytes | None, height: int, width: int) -> None:
        """Called by the reader thread: write the PNG of one of this renderer's figures. The figure stays pending
        until it is written, so :meth:`close` never flushes a writer while a PNG is still going into it."""
        with self._done:
            entry = self._pending.get(job_id)
        if entry is None:
            return
        try:
            if png is None:
                raise RuntimeError("the figure worker could not draw it")
            write_png(entry[0], entry[1], png, height, width)
            failed = False
        except Exception:  # noqa: BLE001 - drawn and written again in process at close(), errors shown there
            failed = True
        with self._done:
            if self._pending.pop(job_id, None) is not None and failed:
                self._failed.append(entry)
            self._done.notify_all()

    def _wake(self) -> None:
        with self._done:
            self._done.notify_all()


_JOB_IDS = itertools.count()


class _Worker:
    """The child process (``python -c``, not ``multiprocessing``: a user's script without an ``if __name__ ==
    "__main__"`` guard is not re-run), a sender and a reader thread, and which renderer each job in flight is for."""

    def __init__(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.owner = os.getpid()  # a forked copy of this process must start its own child
        command = [sys.executable, "-c", "from lightning_htsr.training.sinks.figures import serve; serve()"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.routes: dict[int, FigureRenderer] = {}
        self.lock = threading.Lock()
        self.outbox: queue.Queue[tuple[int, FigureJob] | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, name="htsr-figures-read", daemon=True)
        self.sender = threading.Thread(target=self._send, name="htsr-figures-send", daemon=True)
        self.reader.start()
        self.sender.start()

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.process.poll() is None and self.reader.is_alive()

    def send(self, job_id: int, job: FigureJob, renderer: FigureRenderer) -> None:
        with self.lock:
            self.routes[job_id] = renderer
        self.outbox.put((job_id, job))

    def forget(self, job_ids: Any) -> None:
        """Drop the routes of jobs their renderer draws itself (the child died or took too long)."""
        with self.lock:
            for job_id in list(job_ids):
                self.routes.pop(job_id, None)

    def stop(self, timeout: float = 30.0) -> None:
        self.outbox.put(None)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for thread in (self.reader, self.sender):
            thread.join(timeout=timeout)

    def _send(self) -> None:
        """Sender thread: pickle queued jobs to the child until ``None`` (stop) or the child is gone."""
        assert self.process.stdin is not None
        stream = self.process.stdin
        while (item := self.outbox.get()) is not None:
            try:
                pickle.dump(item, stream, protocol=pickle.HIGHEST_PROTOCOL)
                stream.flush()
            except (OSError, ValueError):  # the child is gone: close() draws what is still pending
                break
        try:
            stream.close()  # EOF: the child finishes what it has and exits
        except OSError:
            pass

    def _read(self) -> None:
        """Reader thread: hand every PNG the child returns to its renderer, until the child closes its output."""
        assert self.process.stdout is not None
        while True:
            try:
                job_id, png, height, width = pickle.load(self.process.stdout)
            except Exception:  # noqa: BLE001 - EOF or a dead child: close() draws what is left
                break
            with self.lock:
                renderer = self.routes.pop(job_id, None)
            if renderer is not None:
                renderer._answer(job_id, png, height, width)
        with self.lock:
            waiting, self.routes = set(self.routes.values()), {}
        for renderer in waiting:
            renderer._wake()


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _shared_worker() -> _Worker | None:
    """This process's figure child, started now if there is none (or it died); ``None`` if it cannot start."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None or not _WORKER.alive():
            try:
                _WORKER = _Worker()
            except OSError:
                return None
        return _WORKER


@atexit.register
def stop_figure_worker(timeout: float = 5.0) -> None:
    """Stop this process's figure child now (it exits after the figures it holds; the next figure starts a new one).

    Called at exit; call it yourself to reap the child earlier, e.g. to count its CPU time in ``RUSAGE_CHILDREN``.
    """
    global _WORKER
    with _WORKER_LOCK:
        worker, _WORKER = _WORKER, None
    if worker is not None and worker.owner == os.getpid():
        worker.stop(timeout=timeout)


def serve() -> None:
    """The child process, at the lowest CPU priority: read pickled ``(id, FigureJob)`` from stdin until EOF, answer
    ``(id, png, h, w)`` (``png`` ``None`` when drawing failed) on stdout."""
    if hasattr(os, "nice"):  # lowest priority: on a busy machine the training process keeps its cores, and the
        try:  # figures wait for idle time (at the latest, for the end of fit)
            os.nice(19)
        except OSError:
            pass
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the answers
    source = sys.stdin.buffer
    while True:
        try:
            job_id, job = pickle.load(source)
        except EOFError:
            return
        try:
            answer: tuple[Any, ...] = (job_id, *render_png(job))
        except Exception as err:  # noqa: BLE001 - the parent draws it again in process and sees the error there
            print(f"lightning-htsr figure worker: {type(err).__name__}: {err}", file=sys.stderr)
            answer = (job_id, None, 0, 0)
        pickle.dump(answer, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()
