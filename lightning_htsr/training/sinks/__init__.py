"""Stage 7 of the pipeline: records -> where users see them.

* :mod:`.scalars`: the flat ``{"htsr/<matrix>/alpha": value}`` metrics every Lightning logger accepts (and
  ``trainer.callback_metrics``, so ``EarlyStopping``/``ModelCheckpoint`` can monitor them).
* :mod:`.tensorboard`: histograms of log10 eigenvalues, ESD figures, the phase map, a custom-scalars dashboard and
  a text table, for loggers whose ``experiment`` is a TensorBoard ``SummaryWriter``.
* :mod:`.figures`: those figures drawn and PNG-encoded in a child process, off the training thread.
* :mod:`.history`: an append-only CSV/JSONL file with one row per matrix per analysis, and the latest spectra
  (``.npz``) for offline reports.
"""

from .figures import FigureJob, FigureRenderer
from .history import HISTORY_COLUMNS, HistoryWriter, read_history, read_spectra, write_spectra
from .scalars import MATRIX_SCALARS, scalar_metrics
from .tensorboard import TensorBoardSink, tensorboard_writer

__all__ = [
    "HISTORY_COLUMNS",
    "MATRIX_SCALARS",
    "FigureJob",
    "FigureRenderer",
    "HistoryWriter",
    "TensorBoardSink",
    "read_history",
    "read_spectra",
    "scalar_metrics",
    "tensorboard_writer",
    "write_spectra",
]
