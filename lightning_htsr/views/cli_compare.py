"""The ``lightning-htsr`` subcommands that read two or more models (the rest of the command line is in
:mod:`lightning_htsr.views.cli`).

``lightning-htsr distances A B``
    One row per matrix: ``||W_A - W_B||_F``, relative to ``||W_B||_F``, cosine and weightwatcher's ``cka``
    (:mod:`lightning_htsr.weight_distances`); unmatched matrices are rows with a reason.

``lightning-htsr compare A B C ...``
    The model-level summary of each checkpoint side by side (:mod:`lightning_htsr.compare`).

Both take ``--csv``/``--json`` like ``analyze``; a file that cannot be read is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from .cli_shared import (
    CHECKPOINT_KINDS,
    PROG,
    add_numerics_options,
    add_selection_options,
    analysis_options,
    compile_patterns,
    format_table,
    write_table,
)

__all__ = ["add_parsers"]

_DISTANCE_TABLE = ("name", "N", "M", "status", "frobenius", "relative", "cosine", "cka", "reason")


def _outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", metavar="FILE", help="write the table as CSV")
    parser.add_argument("--json", metavar="FILE", help="write the table as JSON records")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow checkpoints that pickle arbitrary Python objects (runs code from the file: only "
                             "for trusted files)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")


def _save(args: argparse.Namespace, frame: Any, stderr: TextIO) -> None:
    for kind in ("csv", "json"):
        if getattr(args, kind):
            write_table(frame, Path(getattr(args, kind)), kind)
            if not args.quiet:
                stderr.write(f"{PROG}: wrote {getattr(args, kind)}\n")


def _run_distances(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from ..weight_distances import distances

    frame = distances(args.a, args.b, include=compile_patterns(args.include, "--include"),
                      exclude=compile_patterns(args.exclude, "--exclude"), trust_pickle=args.trust_pickle,
                      cka=not args.no_cka)
    if not args.quiet:
        stdout.write(format_table(frame.to_dict("records"), _DISTANCE_TABLE) + "\n")
        matched = frame[frame["status"] == "success"]
        stdout.write(f"\n{len(matched)} of {len(frame)} matrices paired; mean relative distance "
                     f"{matched['relative'].mean():.4g}\n")
    _save(args, frame, stderr)
    return 0


def _run_compare(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from ..compare import COMPARE_METRICS, compare_models

    frame = compare_models(args.paths, options=analysis_options(args),
                           include=compile_patterns(args.include, "--include"),
                           exclude=compile_patterns(args.exclude, "--exclude"), trust_pickle=args.trust_pickle,
                           threads=args.threads)
    if not args.quiet:
        phases = [c for c in frame.columns if c.startswith("n_") and frame[c].any()]
        stdout.write(format_table(frame.to_dict("records"), ["model", "classified", *COMPARE_METRICS, *phases])
                     + "\n")
    _save(args, frame, stderr)
    return 0


def add_parsers(sub: Any) -> None:
    """Add the ``distances`` and ``compare`` subcommands to ``lightning-htsr``'s subparsers."""
    distances = sub.add_parser(
        "distances", allow_abbrev=False, help="per-matrix distances between two models",
        description="One row per matrix paired by name and shape (A streamed, each B matrix read when its partner "
                    "comes): frobenius ||W_A - W_B||_F, relative (frobenius / ||W_B||_F), cosine and weightwatcher's "
                    "uncentered cka. A and B: " + CHECKPOINT_KINDS + ".")
    distances.add_argument("a", metavar="A", help="checkpoint (file, .index.json file or model directory)")
    distances.add_argument("b", metavar="B", help="the reference checkpoint (relative distances divide by its norms)")
    distances.add_argument("--include", metavar="RE", action="append", help="only matrices matching this regex")
    distances.add_argument("--exclude", metavar="RE", action="append", help="leave out matrices matching this regex")
    distances.add_argument("--no-cka", action="store_true",
                           help="leave cka out: its M x M Gram products (3 N M^2 flops per matrix) are most of the time "
                                "on large models")
    _outputs(distances)
    distances.set_defaults(handler=_run_distances)

    compare = sub.add_parser(
        "compare", allow_abbrev=False, help="model-level HT-SR summaries of several checkpoints side by side",
        description="Analyze each checkpoint and print one row per model: mean alpha, alpha_weighted (analysis "
                    "convention), alpha_hat (alpha * log10 lambda_max of W^T W, weightwatcher's alpha_weighted), "
                    "log_norm, log_spectral_norm, entropy and phase counts. No data needed; see the README for what "
                    "these numbers can and cannot tell.")
    compare.add_argument("paths", metavar="PATH", nargs="+", help="checkpoints, one model each")
    add_selection_options(compare)
    add_numerics_options(compare)
    compare.add_argument("--threads", metavar="N", type=int, default=None,
                         help="torch intra-op threads (default 1; 0: torch's default)")
    _outputs(compare)
    compare.set_defaults(handler=_run_compare, backend="torch")
