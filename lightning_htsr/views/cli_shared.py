"""What the ``lightning-htsr`` subcommands share: the program name, the usage error, the options that select
matrices and set the conventions, and the plain-text tables they print and write."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "format_table", "summary_line"]


PROG = "lightning-htsr"


#: Columns of the printed table (``--columns`` chooses others from :data:`~lightning_htsr.records.COLUMNS`).
DEFAULT_TABLE_COLUMNS: tuple[str, ...] = (
    "name", "N", "M", "alpha", "D", "entropy", "stable_rank", "mp_softrank", "num_spikes", "phase", "warning",
    "status",
)  # fmt: skip


CHECKPOINT_KINDS = ("checkpoint files (Lightning .ckpt, torch.save'd state_dict .pt/.pth/.bin, TorchScript, "
                     ".safetensors), .index.json files or Hugging Face model directories")


class CLIError(Exception):
    """An error reported as one line on stderr with exit code 2 (no traceback)."""


def compile_patterns(patterns: list[str] | None, option: str) -> list[str] | None:
    if not patterns:
        return None
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise CLIError(f"{option} {pattern!r}: not a valid regular expression ({err})") from None
    return patterns


def parse_columns(text: str | None) -> list[str]:
    from ..records import COLUMNS

    if text is None:
        return list(DEFAULT_TABLE_COLUMNS)
    columns = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown or not columns:
        raise CLIError(f"--columns: unknown column(s) {', '.join(unknown) or '(none given)'}; choose from: "
                       + ", ".join(COLUMNS))
    return columns


def _cell(record: Mapping[str, Any], column: str, columns: Sequence[str]) -> str:
    from ..records import flag_unclassified
    from .html import format_value

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
    from ..records import summarize
    from .html import format_value, phase_counts

    s = summarize(frame)
    return (f"model: {s['num_layers']} matrices, {s['num_analyzed']} analyzed, {s['num_classified']} classified | "
            "mean alpha "
            f"{format_value(s.get('alpha', math.nan))} (over {s.get('alpha_n', 0)}) | mean entropy "
            f"{format_value(s.get('entropy', math.nan))} | phases: {phase_counts(frame['phase'])}")


def write_table(frame: Any, path: Path, kind: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_json(path, orient="records", indent=1, double_precision=15)
    except OSError as err:
        raise CLIError(f"--{kind} {path}: cannot write ({err.strerror or err})") from None


def analysis_options(args: argparse.Namespace) -> Any:
    from ..analysis import resolve_options

    if args.min_evals is not None and args.min_evals < 0:
        raise CLIError(f"--min-evals must be >= 0, got {args.min_evals}")
    if args.threads is not None and args.threads < 0:
        raise CLIError(f"--threads must be >= 0, got {args.threads}")
    try:
        return resolve_options(None, ww_compat=args.ww_compat, fit=args.fit, min_tail=None, precision=args.precision,
                               backend=args.backend, min_evals=args.min_evals, max_evals=args.max_evals,
                               phase_config=None, fix_fingers=args.fix_fingers, randomize=args.randomize,
                               seed=args.seed, xmax=args.xmax, max_fingers=args.max_fingers,
                               finger_thresh=args.finger_thresh)
    except (ValueError, ImportError) as err:  # options weightwatcher refuses too, or the [tpl] extra missing
        raise CLIError(str(err)) from None


def parse_xmax(text: str) -> int | float:
    """``--xmax``: an integer (top eigenvalues left out) or a number with a point or exponent (tail cap)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_selection_options(analyze: argparse.ArgumentParser) -> None:
    """Which matrices ``analyze`` takes: ``--include/--exclude/--min-evals/--max-evals``."""
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


def add_numerics_options(analyze: argparse.ArgumentParser) -> None:
    """How ``analyze`` computes: ``--precision/--fit/--ww-compat`` and weightwatcher's fit options."""
    analyze.add_argument("--precision", choices=("auto", "float32", "float64"), default="auto",
                         help="eigenvalue precision (default auto: float32 where accurate enough)")
    analyze.add_argument("--fit", choices=("fast", "exact", "TPL", "E_TPL"), default="fast",
                         help="power-law search (default fast), or weightwatcher's truncated power law TPL/E_TPL "
                              "(needs pip install -e '.[tpl]'; slow: seconds per matrix)")
    analyze.add_argument("--ww-compat", action="store_true",
                         help="weightwatcher 0.7.7's conventions (exact fit, float64; overrides --fit fast/exact "
                              "and --precision)")
    ww = analyze.add_argument_group("weightwatcher's options")
    ww.add_argument("--fix-fingers", choices=("clip_xmax", "xmin_peak"), default=None,
                    help="weightwatcher's fix_fingers (adds num_fingers and raw_alpha with clip_xmax)")
    ww.add_argument("--max-fingers", metavar="K", type=int, default=None,
                    help="clip_xmax: finger limit (as weightwatcher: only values >= half the eigenvalues count)")
    ww.add_argument("--finger-thresh", metavar="X", type=float, default=None,
                    help="clip_xmax: drop of alpha that marks fingers (default 1.0)")
    ww.add_argument("--xmax", metavar="K|X", type=parse_xmax, default=None,
                    help="integer K: leave the abs(K) largest eigenvalues out of the fit; number X (with a point): "
                         "leave out eigenvalues above X")
    ww.add_argument("--randomize", action="store_true",
                    help="add the correlation-trap columns of the element-shuffled matrices (the randomized columns)")
    ww.add_argument("--seed", metavar="N", type=int, default=None, help="seed of --randomize's shuffles")
