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

from ...records import COLUMNS

#: Default file names, under the logger's log dir, of the callback's history and latest spectra.
HISTORY_FILE = "htsr_history.csv"
SPECTRA_FILE = "htsr_spectra.npz"

__all__ = [
    "HISTORY_COLUMNS", "HISTORY_FILE", "SPECTRA_FILE", "HistoryWriter", "free_name", "read_history", "read_spectra",
    "set_aside", "split_after", "write_spectra",
]

#: Columns of the history file: when (analysis index, epoch, step, what triggered it), the record, the smoothed
#: phase the callback acts on, the rank that computed the row, the stop reason on the rows of the analysis
#: that stopped training, and the analysis the stop rule judged best so far (empty before any).
HISTORY_COLUMNS: tuple[str, ...] = (
    "analysis", "epoch", "global_step", "trigger", *COLUMNS, "smoothed_phase", "rank", "stopping_reason",
    "best_analysis",
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
        self.jsonl = _is_jsonl(self.path)

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


def free_name(path: str | os.PathLike[str], tag: str) -> Path:
    """``<stem>.<tag><k><suffix>`` next to ``path``, with the first ``k`` (from 1) no file has."""
    path = Path(path)
    k = 1
    while (found := path.with_name(f"{path.stem}.{tag}{k}{path.suffix}")).exists():
        k += 1
    return found


def set_aside(path: str | os.PathLike[str]) -> Path | None:
    """Rename a non-empty history that a fresh run finds (an earlier run's) to ``<stem>.<k><suffix>``: never appended
    to, never overwritten. Returns the new path, ``None`` when there was nothing to move."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    target = free_name(path, "")
    os.replace(path, target)
    return target


def split_after(path: str | os.PathLike[str], analysis: int) -> tuple[int, Path | None]:
    """Move the rows of analyses ``>= analysis`` (written after the checkpoint a run resumes from, and about to be
    written again) to ``<stem>.superseded<k><suffix>``; the rows before stay. Returns how many rows moved and where
    (``None``: none). CSV rows are parsed as records (a quoted field may span lines), JSON lines one per line."""
    path, jsonl = Path(path), _is_jsonl(Path(path))
    if not path.exists() or path.stat().st_size == 0:
        return 0, None
    with open(path, newline="", encoding="utf-8") as handle:
        if jsonl:
            records = [line for line in handle if line.strip()]
            header, number = [], _jsonl_analysis
        else:
            rows = list(csv.reader(handle))
            header, records, number = rows[:1], rows[1:], lambda row: _int(row[0]) if row else -1
    keep = [r for r in records if number(r) < analysis]
    moved = [r for r in records if number(r) >= analysis]
    if not moved:
        return 0, None
    target = free_name(path, "superseded")
    _write_records(target, header + moved, jsonl=jsonl)
    tmp = path.with_name(path.name + ".tmp")
    _write_records(tmp, header + keep, jsonl=jsonl)
    os.replace(tmp, path)
    return len(moved), target


def _write_records(path: Path, records: Sequence[Any], *, jsonl: bool) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        if jsonl:
            handle.writelines(records)
        else:
            csv.writer(handle).writerows(records)


def _int(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return -1


def _jsonl_analysis(line: str) -> int:
    try:
        return int(json.loads(line).get("analysis", -1))
    except (ValueError, TypeError, AttributeError):
        return -1


def read_history(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a history file written by :class:`HistoryWriter` (CSV or JSON lines) into a ``DataFrame``."""
    path = Path(path)
    if _is_jsonl(path):
        return pd.read_json(path, lines=True)
    return pd.read_csv(path, keep_default_na=True)


def _is_jsonl(path: Path) -> bool:
    """JSON lines (``.jsonl``/``.json``) rather than CSV, by the file's suffix."""
    return path.suffix.lower() in (".jsonl", ".json")


def write_spectra(path: str | os.PathLike[str], spectra: Mapping[str, Any], *, step: int, epoch: int) -> None:
    """Save the latest eigenvalues (``{matrix name: 1-D array}``) as ``.npz``, replacing the file atomically."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"ev/{name}": np.asarray(values, dtype=np.float32) for name, values in spectra.items()
              if values is not None}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, __step__=np.array(step), __epoch__=np.array(epoch), **arrays)
    os.replace(tmp, path)


def read_spectra(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int, int]:
    """Inverse of :func:`write_spectra`: ``({matrix name: eigenvalues}, step, epoch)``.

    Example:
        >>> import tempfile, os, numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "s.npz")
        >>> write_spectra(path, {"fc": np.array([1.0, 2.0])}, step=8, epoch=0)
        >>> spectra, step, epoch = read_spectra(path)
        >>> spectra["fc"].tolist(), step, epoch
        ([1.0, 2.0], 8, 0)
    """
    import numpy as np

    with np.load(path) as data:
        spectra = {key[3:]: data[key] for key in data.files if key.startswith("ev/")}
        return spectra, int(data["__step__"]), int(data["__epoch__"])
