"""Append-only history of every analysis: one row per matrix per analysis, flushed as it is written."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..records import COLUMNS

__all__ = ["HISTORY_COLUMNS", "HistoryWriter", "read_history"]

#: Columns of the history file: when (analysis index, epoch, step, what triggered it), the record, the smoothed
#: phase the callback acts on, the rank that computed the row, and the stop reason on the rows of the analysis
#: that stopped training.
HISTORY_COLUMNS: tuple[str, ...] = (
    "analysis", "epoch", "global_step", "trigger", *COLUMNS, "smoothed_phase", "rank", "stopping_reason",
)  # fmt: skip


def _plain(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "" if math.isnan(value) else value
    return value


class HistoryWriter:
    """Appends rows to a ``.csv`` (default) or ``.jsonl`` file and flushes them to disk at every call.

    A crash loses nothing already written; a resumed run appends to the same file when it writes to the same path.

    Args:
        path: Target file; the format follows the suffix (``.jsonl``/``.json`` -> JSON lines, else CSV).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "h.csv")
        >>> HistoryWriter(path).append([{"analysis": 0, "name": "fc", "alpha": 3.0}])
        >>> read_history(path)[["analysis", "name", "alpha"]].values.tolist()
        [[0, 'fc', 3.0]]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.jsonl = self.path.suffix.lower() in (".jsonl", ".json")

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``rows`` (missing columns left empty, unknown keys dropped) and flush them to disk."""
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            if self.jsonl:
                for row in rows:
                    clean = {k: (None if v == "" else v) for k, v in ((c, _plain(row.get(c))) for c in HISTORY_COLUMNS)}
                    handle.write(json.dumps(clean) + "\n")
            else:
                writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerows({c: _plain(row.get(c)) for c in HISTORY_COLUMNS} for row in rows)
            handle.flush()
            os.fsync(handle.fileno())


def read_history(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a history file written by :class:`HistoryWriter` (CSV or JSON lines) into a ``DataFrame``."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return pd.read_json(path, lines=True)
    return pd.read_csv(path, keep_default_na=True)
