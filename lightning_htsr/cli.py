"""The ``lightning-htsr`` command line.

``lightning-htsr analyze PATH``
    HT-SR diagnostics of every weight matrix in a checkpoint, without the model's class: a Lightning ``.ckpt``, a
    ``state_dict`` saved with ``torch.save`` (``.pt``/``.pth``/``.bin``/any name, also nested under
    ``"state_dict"``, ``"model_state_dict"`` or ``"model"``) or a ``.safetensors`` file. Prints one row per matrix
    and a model summary; ``--csv``/``--json`` save the full table, ``--plots DIR`` one ESD figure per matrix.

``lightning-htsr report RUN``
    Figures and an ``index.html`` from the history that :class:`~lightning_htsr.HTSRCallback` wrote during
    training (see :func:`lightning_htsr.report.write_report`).

Pickle safety: checkpoints are loaded with ``torch.load(weights_only=True)``, which only rebuilds tensors and
plain containers. A checkpoint that pickles other Python objects is refused (exit code 2) unless ``--trust-pickle``
is given, because unpickling them can run arbitrary code from the file.

Exit codes: 0 success, 2 bad usage or an input that cannot be analyzed (the message on stderr names the file and
what is wrong), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

__all__ = [
    "CHUNK_SIZE",
    "CLIError",
    "DEFAULT_TABLE_COLUMNS",
    "PROGRESS_THRESHOLD",
    "analyze_in_chunks",
    "build_parser",
    "extract_state_dict",
    "load_checkpoint",
    "main",
]

PROG = "lightning-htsr"

#: Matrices per :func:`~lightning_htsr.analysis.analyze_matrices` call (one progress-bar step).
CHUNK_SIZE = 16

#: With ``--progress auto``, show the progress bar (on a terminal) above this many matrices.
PROGRESS_THRESHOLD = 20

#: Columns of the printed table (``--columns`` chooses others from :data:`~lightning_htsr.records.COLUMNS`).
DEFAULT_TABLE_COLUMNS: tuple[str, ...] = (
    "name", "N", "M", "alpha", "D", "entropy", "stable_rank", "mp_softrank", "num_spikes", "phase", "warning",
    "status",
)  # fmt: skip

#: Keys under which checkpoints commonly nest the state dict, tried in this order.
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model")

#: Prefixes added by wrappers (``DistributedDataParallel``, ``torch.compile``), removed when every key has them.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_CHECKPOINT_KINDS = "a Lightning .ckpt, a torch.save'd state_dict (.pt, .pth, .bin) or a .safetensors file"


class CLIError(Exception):
    """An error reported as one line on stderr with exit code 2 (no traceback)."""


# ------------------------------------------------------------------------------------------------ loading


def _sniff(path: Path) -> str:
    """``"zip"`` (torch.save's default format), ``"safetensors"``, ``"text"`` (printable ASCII: not a checkpoint)
    or ``"pickle"`` (anything else), by content."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 10 and head[8:9] == b"{":
        header_size = int.from_bytes(head[:8], "little")
        if 0 < header_size <= path.stat().st_size - 8:
            return "safetensors"
    if path.suffix.lower() == ".safetensors":
        return "safetensors"
    if head and not head.startswith(b"\x80") and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "text"  # a pickle (torch.save's legacy format) starts with the PROTO opcode 0x80
    return "pickle"


def _short_error(err: BaseException, limit: int = 240) -> str:
    """One line describing a load error, without torch's multi-paragraph advice."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if len(line) > 120 and ". " in line:  # torch appends advice after the first sentence
        line = line.split(". ", 1)[0]
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def load_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """Load a checkpoint file on the CPU without running code from it (unless trusted).

    ``.safetensors`` content is read with ``safetensors.torch.load_file``; everything else with
    ``torch.load(path, map_location="cpu", weights_only=True)`` (memory-mapped for the zip format), or
    ``weights_only=False`` when ``trust_pickle``.

    Args:
        path: The file.
        trust_pickle: Allow unpickling arbitrary Python objects (only for files from a trusted source).

    Returns:
        Whatever the file holds (normally a ``dict``).

    Raises:
        CLIError: When the file is missing, a directory, unreadable, empty, corrupt, or needs ``--trust-pickle``.
    """
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{path}: no such file")
    if path.is_dir():
        raise CLIError(f"{path}: is a directory; expected a checkpoint file ({_CHECKPOINT_KINDS})")
    try:
        if path.stat().st_size == 0:
            raise CLIError(f"{path}: the file is empty")
        kind = _sniff(path)
    except OSError as err:
        raise CLIError(f"{path}: cannot read the file ({err.strerror or err})") from None

    if kind == "text":
        raise CLIError(f"{path}: a text file, not a checkpoint; expected {_CHECKPOINT_KINDS}")

    import torch

    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - SafetensorError and friends: the file is damaged
            raise CLIError(f"{path}: not a valid safetensors file ({_short_error(err)}); the file may be truncated "
                           "or corrupt") from None
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=kind == "zip")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found and not trust_pickle:
            raise CLIError(
                f"{path}: refusing to unpickle: the checkpoint contains Python objects other than tensors and plain "
                f"containers (first: {found.group(1)}), and unpickling them can run arbitrary code from the file. "
                "If you trust its source, pass --trust-pickle") from None
        raise CLIError(f"{path}: not a readable checkpoint ({_short_error(err)}); expected {_CHECKPOINT_KINDS}; "
                       "the file may be truncated or corrupt") from None
    except MemoryError:
        raise CLIError(f"{path}: not enough memory to load the checkpoint") from None
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, KeyError, ... on bad files
        raise CLIError(f"{path}: not a readable checkpoint ({_short_error(err)}); expected {_CHECKPOINT_KINDS}; "
                       "the file may be truncated or corrupt") from None


def _describe(obj: Any) -> str:
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}" if type(obj).__module__ != "builtins" else \
        f"a {type(obj).__name__}"


def _tensor_items(obj: Mapping[Any, Any]) -> dict[str, Any]:
    import torch

    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def extract_state_dict(obj: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``{name: tensor}`` mapping inside a loaded checkpoint.

    Accepts a state dict, a Lightning checkpoint (``"state_dict"``), dicts nesting the state dict under
    ``"model_state_dict"`` or ``"model"`` (several levels deep), and a whole ``nn.Module`` (``torch.save(model)``,
    loadable with ``--trust-pickle`` only). A ``module.``/``_orig_mod.`` prefix on every key is removed.

    Args:
        obj: What :func:`load_checkpoint` returned.
        path: The file, for messages.

    Returns:
        The tensors by name (non-tensor entries dropped).

    Raises:
        CLIError: When ``obj`` is not a mapping or holds no tensors.
    """
    from torch import nn

    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CLIError(f"{path}: unsupported content: {_describe(obj)}; expected a state_dict (a dict of tensors), "
                       "a Lightning checkpoint or a safetensors file")
    for _ in range(4):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, Mapping) and (_tensor_items(inner) or any(isinstance(inner.get(k), Mapping)
                                                                          for k in STATE_DICT_KEYS)):
                obj = inner
                break
        else:
            break
    tensors = _tensor_items(obj)
    if not tensors:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        raise CLIError(f"{path}: unsupported content: a dict without tensors (keys: {keys or 'none'}); expected a "
                       f"state_dict, or a dict holding one under {', '.join(repr(k) for k in STATE_DICT_KEYS)}")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


# ------------------------------------------------------------------------------------------------ analysis


class ProgressBar:
    """``\\r[#####     ] 64/120 matrices`` on a stream, redrawn in place; silent when disabled.

    Args:
        total: Number of matrices.
        stream: Where to draw (stderr).
        enabled: Draw at all.
        width: Characters of the bar.
    """

    def __init__(self, total: int, stream: TextIO, *, enabled: bool, width: int = 30) -> None:
        self.total, self.stream, self.enabled, self.width = total, stream, enabled, width

    def update(self, done: int) -> None:
        """Redraw with ``done`` matrices finished."""
        if not self.enabled:
            return
        filled = self.width * done // max(self.total, 1)
        self.stream.write(f"\r[{'#' * filled}{' ' * (self.width - filled)}] {done}/{self.total} matrices")
        self.stream.flush()

    def close(self) -> None:
        """End the line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def analyze_in_chunks(
    matrices: Sequence[Any],
    options: Any,
    *,
    chunk_size: int = CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
    on_result: Callable[[Any, Any], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`~lightning_htsr.analysis.analyze_matrices` over ``chunk_size`` matrices at a time.

    Only the records are kept, so the eigenvalues of one chunk are freed before the next is computed.

    Args:
        matrices: :class:`~lightning_htsr.layers.WeightMatrix` objects.
        options: :class:`~lightning_htsr.AnalysisOptions`.
        chunk_size: Matrices per call.
        progress: Called with the number of matrices done after each chunk (and with 0 first).
        on_result: Called with ``(matrix, MatrixAnalysis)`` for every matrix (e.g. to plot its ESD).

    Returns:
        One record per matrix, in order.
    """
    import torch

    from .analysis import analyze_matrices

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    records: list[dict[str, Any]] = []
    if progress is not None:
        progress(0)
    for start in range(0, len(matrices), chunk_size):
        chunk = matrices[start:start + chunk_size]
        with torch.no_grad():
            results = analyze_matrices(chunk, options)
        for matrix, result in zip(chunk, results):
            if on_result is not None:
                on_result(matrix, result)
            records.append(result.record)
        if progress is not None:
            progress(len(records))
    return records


def _compile_patterns(patterns: list[str] | None, option: str) -> list[str] | None:
    if not patterns:
        return None
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise CLIError(f"{option} {pattern!r}: not a valid regular expression ({err})") from None
    return patterns


def _parse_columns(text: str | None) -> list[str]:
    from .records import COLUMNS

    if text is None:
        return list(DEFAULT_TABLE_COLUMNS)
    columns = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown or not columns:
        raise CLIError(f"--columns: unknown column(s) {', '.join(unknown) or '(none given)'}; choose from: "
                       + ", ".join(COLUMNS))
    return columns


def _cell(record: Mapping[str, Any], column: str, columns: Sequence[str]) -> str:
    from .records import flag_unclassified
    from .report import format_value

    value = flag_unclassified(record, format_value).get(column)  # too small to classify: "(too small)", "(1.33)"
    if column == "status" and "skip_reason" not in columns and record.get("skip_reason"):
        return f"{value}: {record['skip_reason']}"
    if column in ("phase", "warning") and value == "":
        return "-"  # format_value gives "-" for None and NaN too
    return format_value(value)


def format_table(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table: numbers right-aligned, text left-aligned, ``-`` for missing values.

    Args:
        records: Rows (``analyze()`` records).
        columns: Columns to show, in order.

    Returns:
        The table, header line first, without a trailing newline.
    """
    cells = [[_cell(r, c, columns) for c in columns] for r in records]
    numeric = [all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in records)
               for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def summary_line(frame: Any) -> str:
    """One line of model-level numbers from :func:`~lightning_htsr.summarize` plus the phase counts."""
    from .records import summarize
    from .report import format_value, phase_counts

    s = summarize(frame)
    return (f"model: {s['num_layers']} matrices, {s['num_analyzed']} analyzed, {s['num_classified']} classified | "
            "mean alpha "
            f"{format_value(s.get('alpha', math.nan))} (over {s.get('alpha_n', 0)}) | mean entropy "
            f"{format_value(s.get('entropy', math.nan))} | phases: {phase_counts(frame['phase'])}")


def _write_table(frame: Any, path: Path, kind: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_json(path, orient="records", indent=1, double_precision=15)
    except OSError as err:
        raise CLIError(f"--{kind} {path}: cannot write ({err.strerror or err})") from None


def _run_analyze(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from .analysis import _resolve_options, bad_input_rows
    from .layers import state_dict_matrices
    from .records import records_to_frame

    include = _compile_patterns(args.include, "--include")
    exclude = _compile_patterns(args.exclude, "--exclude")
    columns = _parse_columns(args.columns)
    if args.min_evals is not None and args.min_evals < 0:
        raise CLIError(f"--min-evals must be >= 0, got {args.min_evals}")
    path = Path(args.path)
    state_dict = extract_state_dict(load_checkpoint(path, trust_pickle=args.trust_pickle), path)
    options = _resolve_options(None, ww_compat=args.ww_compat, fit=args.fit, min_tail=None, precision=args.precision,
                               backend="torch", min_evals=args.min_evals, max_evals=args.max_evals, phase_config=None)
    matrices = state_dict_matrices(state_dict, include=include, exclude=exclude, min_evals=options.min_evals,
                                   max_evals=options.max_evals)
    if not matrices:
        if include or exclude:
            total = len(state_dict_matrices(state_dict, min_evals=options.min_evals))
            raise CLIError(f"{path}: no weight matrix matches --include/--exclude ({total} matrices without them)")
        keys = ", ".join(list(state_dict)[:6]) + (", ..." if len(state_dict) > 6 else "")
        raise CLIError(f"{path}: no weight matrices: none of its {len(state_dict)} tensors is a 2-D or larger "
                       f"tensor named '*weight' (keys: {keys})")

    plots_dir = Path(args.plots) if args.plots else None
    plotted: list[dict[str, Any]] = []
    on_result = None
    if plots_dir is not None:
        try:
            plots_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CLIError(f"--plots {plots_dir}: cannot create the directory ({err.strerror or err})") from None
        on_result = _esd_plotter(plots_dir, plotted)

    show = args.progress == "always" or (args.progress == "auto" and not args.quiet
                                         and len(matrices) > PROGRESS_THRESHOLD and _isatty(stderr))
    bar = ProgressBar(len(matrices), stderr, enabled=show)
    try:
        records = analyze_in_chunks(matrices, options, progress=bar.update, on_result=on_result)
    finally:
        bar.close()
    frame = records_to_frame(records)

    if not args.quiet:
        stdout.write(format_table(records, columns) + "\n\n")
    stdout.write(summary_line(frame) + "\n")
    bad = bad_input_rows(records)
    if bad and not args.quiet:
        stderr.write(f"{PROG}: note: {len(bad)} matrices not fully analyzed (see status): "
                     + ", ".join(str(r["name"]) for r in bad[:8]) + (" ..." if len(bad) > 8 else "") + "\n")
    if args.csv:
        _write_table(frame, Path(args.csv), "csv")
        if not args.quiet:
            stderr.write(f"{PROG}: wrote {args.csv}\n")
    if args.json:
        _write_table(frame, Path(args.json), "json")
        if not args.quiet:
            stderr.write(f"{PROG}: wrote {args.json}\n")
    if plots_dir is not None:
        index = _write_plot_index(plots_dir, path, plotted)
        if not args.quiet:
            stderr.write(f"{PROG}: wrote {len(plotted)} ESD figures and {index}\n")
    return 0


def _esd_plotter(plots_dir: Path, plotted: list[dict[str, Any]]) -> Callable[[Any, Any], None]:
    from .report import esd_figure, save_png, safe_filename

    taken: set[str] = set()

    def plot(matrix: Any, result: Any) -> None:
        if result.eigenvalues is None or result.eigenvalues.numel() == 0:
            return
        fig = esd_figure(matrix.name, result.eigenvalues, powerlaw=result.powerlaw, mp=result.mp,
                         phase=result.phase if result.phase is not None else result.record.get("phase"),
                         Q=float(matrix.Q))
        file = safe_filename(matrix.name, taken)
        save_png(fig, plots_dir / file)
        plotted.append({**result.record, "file": file})

    return plot


def _write_plot_index(plots_dir: Path, source: Path, plotted: Sequence[Mapping[str, Any]]) -> Path:
    import html

    from .report import esd_grid, html_page, html_table

    links = {str(r["name"]): str(r["file"]) for r in plotted}
    body = [f"<h1>ESD of every weight matrix</h1><p>Checkpoint: <code>{html.escape(str(source.resolve()))}</code>"
            f" ({len(plotted)} matrices with a spectrum).</p>",
            html_table(plotted, ["name", "N", "M", "alpha", "D", "entropy", "num_spikes", "phase", "warning",
                                 "status"], links=links),
            esd_grid((str(r["name"]), str(r["file"]), str(r["name"])) for r in plotted)]
    index = plots_dir / "index.html"
    index.write_text(html_page(f"ESDs of {source.name}", "\n".join(body)), encoding="utf-8")
    return index


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ report


def _run_report(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from .report import DEFAULT_REPORT_DIR, ReportError, find_history, write_report

    run = Path(args.run)
    try:
        history, candidates = find_history(run)
        if len(candidates) > 1:
            stderr.write(f"{PROG}: found {len(candidates)} history files under {run}; using the newest: {history}\n")
            for other in candidates[1:]:
                stderr.write(f"{PROG}:   also found {other}\n")
        else:
            stderr.write(f"{PROG}: history: {history}\n")
        out = Path(args.out) if args.out else (run / DEFAULT_REPORT_DIR if run.is_dir() else None)
        index = write_report(history, out)
    except ReportError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"cannot write the report: {err.filename or ''}: {err.strerror or err}") from None
    stdout.write(f"{index}\n")
    return 0


# ------------------------------------------------------------------------------------------------ entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-htsr`` (subcommands ``analyze`` and ``report``)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Heavy-Tailed Self-Regularization diagnostics: eigenvalue spectra, power-law alpha,\n"
                    "spectral entropy and 5+1 phase of every weight matrix.",
        epilog=f"Examples:\n  {PROG} analyze last.ckpt\n  {PROG} analyze model.safetensors --csv layers.csv "
               f"--plots esd/\n  {PROG} report lightning_logs/version_0\n\nExit codes: 0 success, 2 usage error or a file that "
               "cannot be analyzed\n(the message on stderr says which file and why), 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    analyze = sub.add_parser(
        "analyze", allow_abbrev=False, help="analyze the weight matrices of a checkpoint (no model class needed)",
        description="Analyze every weight matrix of a checkpoint by name and shape: " + _CHECKPOINT_KINDS + ". "
                    "Prints one row per matrix and a model summary.")
    analyze.add_argument("path", metavar="PATH", help="checkpoint file")
    analyze.add_argument("--csv", metavar="FILE", help="write the full table (all columns) as CSV")
    analyze.add_argument("--json", metavar="FILE", help="write the full table (all columns) as JSON records")
    analyze.add_argument("--plots", metavar="DIR", help="write one ESD figure per analyzed matrix and index.html")
    analyze.add_argument("--include", metavar="RE", action="append",
                         help="only matrices whose name matches this regex (repeatable)")
    analyze.add_argument("--exclude", metavar="RE", action="append",
                         help="leave out matrices whose name matches this regex (repeatable)")
    analyze.add_argument("--min-evals", metavar="N", type=int, default=None,
                         help="minimum spectrum size: matrices with fewer pooled eigenvalues are not classified nor "
                              "averaged (default 50; below 10 they are skipped; with --ww-compat weightwatcher's "
                              "selection, default 8)")
    analyze.add_argument("--max-evals", metavar="N", type=int, default=None,
                         help="skip matrices with more pooled eigenvalues (default: no limit)")
    analyze.add_argument("--precision", choices=("auto", "float32", "float64"), default="auto",
                         help="eigenvalue precision (default auto: float32 where accurate enough)")
    analyze.add_argument("--fit", choices=("fast", "exact"), default="fast", help="power-law search (default fast)")
    analyze.add_argument("--ww-compat", action="store_true",
                         help="weightwatcher 0.7.7's conventions (exact fit, float64; overrides --fit/--precision)")
    analyze.add_argument("--columns", metavar="A,B,C",
                         help="columns of the printed table (default: " + ",".join(DEFAULT_TABLE_COLUMNS) + ")")
    analyze.add_argument("--trust-pickle", action="store_true",
                         help="allow checkpoints that pickle arbitrary Python objects (runs code from the file: "
                              "only for trusted files)")
    analyze.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                         help=f"progress bar on stderr (auto: on a terminal, above {PROGRESS_THRESHOLD} matrices)")
    analyze.add_argument("--quiet", "-q", action="store_true",
                         help="print only the summary line (no table, notes or automatic progress bar)")
    analyze.set_defaults(handler=_run_analyze)

    report = sub.add_parser(
        "report", allow_abbrev=False, help="figures and index.html from a training run's HT-SR history",
        description="Write PNG figures (alpha and entropy over training, phase map, final ESD fits) and index.html "
                    "from the htsr_history.csv (or .jsonl) and htsr_spectra.npz written by HTSRCallback.")
    report.add_argument("run", metavar="RUN",
                        help="log directory (searched recursively; the newest history is used) or history file")
    report.add_argument("--out", metavar="DIR",
                        help="report directory (default: RUN/htsr_report, or htsr_report next to the history file)")
    report.set_defaults(handler=_run_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lightning-htsr`` with ``argv`` (default: ``sys.argv[1:]``).

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        The exit code: 0 on success, 2 for usage errors and inputs that cannot be analyzed (a one-line message on
        stderr), 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version or a usage error: argparse has printed the message
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    if getattr(args, "handler", None) is None:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: error: a command is required (analyze or report)\n")
        return 2
    try:
        return int(args.handler(args, sys.stdout, sys.stderr))
    except CLIError as err:
        sys.stdout.flush()
        sys.stderr.write(f"{PROG}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:  # e.g. `lightning-htsr analyze model.pt | head`: the reader is gone, not an error
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        except (OSError, ValueError, AttributeError):
            pass
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
