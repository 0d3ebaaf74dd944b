"""The ``lightning-htsr`` command line.

``lightning-htsr analyze PATH [PATH ...]``
    HT-SR diagnostics of every weight matrix in a checkpoint, without the model's class: a Lightning ``.ckpt``, a
    ``state_dict`` saved with ``torch.save`` (also nested under the keys of
    :data:`~lightning_htsr.weights.checkpoints.STATE_DICT_KEYS`), a TorchScript archive, ``.safetensors`` files, an
    ``*.index.json`` or a Hugging Face model directory, read one tensor at a time
    (:mod:`lightning_htsr.weights.checkpoints`). Prints one row per matrix and one model summary; ``--csv``/``--json``
    save the full table, ``--plots DIR`` one ESD figure per matrix. Launched by ``torchrun``, the processes share the
    matrices and rank 0 prints and writes.

``lightning-htsr analyze PATH --base BASE``
    The same for the deltas ``W - W_base`` of a fine-tuned checkpoint (:mod:`lightning_htsr.deltas`).

``lightning-htsr distances A B`` and ``lightning-htsr compare A B C ...``
    Per-matrix distances between two checkpoints, and model-level summaries side by side
    (:mod:`lightning_htsr.views.cli_compare`).

``lightning-htsr report RUN``
    Figures and an ``index.html`` from the history that :class:`~lightning_htsr.HTSRCallback` wrote during
    training (see :func:`lightning_htsr.views.report.write_report`).

What lives where: this module parses the arguments, runs the two commands and prints; the analysis is one call
into :mod:`lightning_htsr.offline` (in ``_run_analyze``), the report is :mod:`lightning_htsr.views.report`, and the
table cells, ESD figure files and HTML pages of ``--plots`` come from :mod:`lightning_htsr.views.html`.

Pickle safety: checkpoints are loaded with ``torch.load(weights_only=True)``, which only rebuilds tensors and
plain containers. A checkpoint that pickles other Python objects is refused (exit code 2) unless ``--trust-pickle``
is given, because unpickling them can run arbitrary code from the file.

Exit codes: 0 success, 2 bad usage or an input that cannot be analyzed (the message on stderr names the file and
what is wrong), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from .cli_shared import (
    CHECKPOINT_KINDS,
    DEFAULT_TABLE_COLUMNS,
    PROG,
    CLIError,
    add_numerics_options,
    add_selection_options,
    analysis_options,
    compile_patterns,
    format_table,
    parse_columns,
    summary_line,
    write_table,
)

__all__ = [
    "CLIError",
    "DEFAULT_TABLE_COLUMNS",
    "build_parser",
    "format_table",
    "main",
    "summary_line",
]


# ------------------------------------------------------------------------------------------------ analysis


def _device(text: str | None) -> Any:
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise CLIError(f"--device {text!r}: not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: no CUDA device is available here")
    return device


def _check_backend(backend: str, device: Any) -> None:
    """Refuse ``--backend cupy`` up front, in one line, where it cannot run (no ``--device cuda``, no CuPy, no GPU)."""
    if backend != "cupy":
        return
    if device is None or device.type != "cuda":
        raise CLIError("--backend cupy: needs --device cuda (CuPy works on CUDA tensors only)")
    from ..spectra.eigenvalues import BackendUnavailableError, _import_cupy

    try:
        _import_cupy()
    except BackendUnavailableError as err:
        raise CLIError(f"--backend cupy: {err}") from None


@contextlib.contextmanager
def _process_group(device: Any) -> Iterator[int]:
    """Join the ``torchrun`` process group when launched by it (gloo on CPU, NCCL on CUDA); yields the rank."""
    import torch

    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def _run_analyze(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from ..offline import checkpoint_plan, checkpoint_records, threads_limit
    from ..weights.checkpoints import open_checkpoint

    include = compile_patterns(args.include, "--include")
    exclude = compile_patterns(args.exclude, "--exclude")
    columns = parse_columns(args.columns)
    options = analysis_options(args)
    device = _device(args.device)
    _check_backend(options.backend, device)
    checkpoint = open_checkpoint(args.paths, trust_pickle=args.trust_pickle)
    adapter = _adapter(args, checkpoint)
    if adapter is None and not args.quiet and os.environ.get("RANK", "0") == "0":  # once under torchrun
        _adapter_hint(checkpoint.paths, stderr)
    if not checkpoint_plan(checkpoint, options, include=include, exclude=exclude, adapter=adapter, lora=args.lora):
        _no_matrices(checkpoint, options, include or exclude)
    base = _base_source(args, options, include, exclude)
    plotter = _EsdPlotter(Path(args.plots)) if args.plots else None
    show = args.progress if args.progress is not None else (not args.quiet and _isatty(stderr))
    with _process_group(device) as rank, threads_limit(args.threads):
        records = checkpoint_records(checkpoint, options, include=include, exclude=exclude, device=device,
                                     progress=show and rank == 0, on_result=plotter, adapter=adapter, lora=args.lora,
                                     base=base)
        plotted = _gathered(plotter.plotted) if plotter is not None else []
    if rank == 0:
        _report_analysis(args, records, columns, checkpoint.paths, plotted, stdout, stderr)
    return 0


def _adapter(args: argparse.Namespace, checkpoint: Any) -> Any:
    """The ``--adapter`` read and checked against the checkpoint (``None`` without one)."""
    if args.adapter is None:
        if args.lora != "merged":
            raise CLIError("--lora needs --adapter (a LoRA adapter directory to merge into the checkpoint)")
        return None
    from ..weights.adapters import read_adapter

    adapter = read_adapter(args.adapter)
    adapter.check(checkpoint.shapes())
    return adapter


def _adapter_hint(paths: Sequence[Path], stderr: TextIO) -> None:
    """A note when the checkpoint analyzed is a peft adapter on its own (its factors would be listed one by one)."""
    for folder in dict.fromkeys(Path(p).parent for p in paths):
        if (folder / "adapter_config.json").is_file():
            stderr.write(f"{PROG}: note: {folder} is a peft adapter (adapter_config.json): its factors are listed one "
                         f"by one; to analyze the adapted model: {PROG} analyze BASE_MODEL_DIR --adapter {folder}\n")


def _base_source(args: argparse.Namespace, options: Any, include: Any, exclude: Any) -> Any:
    """The ``--base`` checkpoint as a :class:`~lightning_htsr.pairs.MatrixSource` (``None`` without one)."""
    if args.base is None:
        return None
    if args.adapter is not None:
        raise CLIError("--base and --adapter together are not supported: analyze the merged model against the base")
    from ..pairs import open_source

    return open_source(args.base, options, trust_pickle=args.trust_pickle, include=include, exclude=exclude)


def _no_matrices(checkpoint: Any, options: Any, filtered: Any) -> None:
    from ..offline import checkpoint_plan

    where = ", ".join(str(p) for p in checkpoint.paths[:3]) + (" ..." if len(checkpoint.paths) > 3 else "")
    if filtered:
        total = len(checkpoint_plan(checkpoint, options))
        raise CLIError(f"{where}: no weight matrix matches --include/--exclude ({total} matrices without them)")
    names = [i.name for i in checkpoint.infos]
    keys = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    raise CLIError(f"{where}: no weight matrices: none of its {len(names)} tensors is a 2-D or larger tensor named "
                   f"'*weight' (keys: {keys})")


def _gathered(items: list[Any]) -> list[Any]:
    """Every rank's ``items`` (this rank's alone when not distributed)."""
    import torch

    from ..distributed import gather_objects

    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return [x for part in gather_objects(items, world) for x in part]


def _report_analysis(args: argparse.Namespace, records: list[dict[str, Any]], columns: list[str],
                     sources: Sequence[Path], plotted: list[dict[str, Any]], stdout: TextIO, stderr: TextIO) -> None:
    """Print the table and summary, note bad matrices, write --csv/--json/--plots' index (rank 0)."""
    from ..analysis import bad_input_rows
    from ..records import records_to_frame

    frame = records_to_frame(records)
    if not args.quiet:
        stdout.write(format_table(records, columns) + "\n\n")
    stdout.write(summary_line(frame) + "\n")
    bad = bad_input_rows(records)
    if bad and not args.quiet:
        stderr.write(f"{PROG}: note: {len(bad)} matrices not fully analyzed (see status): "
                     + ", ".join(str(r["name"]) for r in bad[:8]) + (" ..." if len(bad) > 8 else "") + "\n")
    for kind in ("csv", "json"):
        if getattr(args, kind):
            write_table(frame, Path(getattr(args, kind)), kind)
            if not args.quiet:
                stderr.write(f"{PROG}: wrote {getattr(args, kind)}\n")
    if args.plots:
        index = _write_plot_index(Path(args.plots), sources, plotted)
        if not args.quiet:
            fits = sum(1 for r in plotted if r.get("fit_file"))
            stderr.write(f"{PROG}: wrote {len(plotted)} ESD figures, {fits} fit diagnostics and {index}\n")


class _EsdPlotter:
    """Writes one ESD figure per analyzed matrix into ``plots_dir`` and remembers what it wrote."""

    def __init__(self, plots_dir: Path) -> None:
        try:
            plots_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CLIError(f"--plots {plots_dir}: cannot create the directory ({err.strerror or err})") from None
        self.plots_dir = plots_dir
        self.plotted: list[dict[str, Any]] = []
        self._taken: set[str] = set()

    def __call__(self, result: Any) -> None:
        from .html import esd_figure, fit_figure, safe_filename, save_png

        if result.eigenvalues is None or result.eigenvalues.numel() == 0:
            return
        record = result.record
        phase = result.phase if result.phase is not None else record.get("phase")
        fig = esd_figure(record["name"], result.eigenvalues, powerlaw=result.powerlaw, mp=result.mp,
                         phase=phase, Q=float(record["Q"]))
        file = safe_filename(str(record["name"]), self._taken)
        save_png(fig, self.plots_dir / file)
        scan, fit_file = result.fit_scan(), ""
        if scan is not None:  # the power-law fit's diagnostics (none for TPL fits and xmin_peak)
            fit_file = safe_filename(str(record["name"]), self._taken, prefix="fit_")
            save_png(fit_figure(str(record["name"]), result.eigenvalues, scan, mp=result.mp, phase=phase,
                                Q=float(record["Q"])), self.plots_dir / fit_file)
        self.plotted.append({**record, "file": file, "fit_file": fit_file})


def _write_plot_index(plots_dir: Path, sources: Sequence[Path], plotted: Sequence[Mapping[str, Any]]) -> Path:
    import html

    from .html import esd_grid, html_page, html_table

    links = {str(r["name"]): str(r["file"]) for r in plotted}
    where = ", ".join(f"<code>{html.escape(str(p.resolve()))}</code>" for p in sources)
    body = [f"<h1>ESD of every weight matrix</h1><p>Checkpoint: {where} ({len(plotted)} matrices with a "
            "spectrum).</p>",
            html_table(plotted, ["name", "N", "M", "alpha", "D", "entropy", "num_spikes", "phase", "warning",
                                 "status"], links=links),
            esd_grid((str(r["name"]), str(r["file"]), str(r["name"])) for r in plotted)]
    fits = [r for r in plotted if r.get("fit_file")]
    if fits:
        body += [("<h2>Power-law fit diagnostics</h2><p>Per matrix: the ESD on log-log, lin-lin and log-lin axes "
                  "with the Marchenko-Pastur bulk, and the KS distance D and alpha over the candidate xmin, the "
                  "chosen xmin marked.</p>"),
                 esd_grid((str(r["name"]), str(r["fit_file"]), f"{r['name']}: fit diagnostics") for r in fits)]
    index = plots_dir / "index.html"
    title = sources[0].name if len(sources) == 1 else f"{sources[0].parent.name or sources[0].name}"
    index.write_text(html_page(f"ESDs of {title}", "\n".join(body)), encoding="utf-8")
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


def _add_analyze_parser(sub: Any) -> None:
    """The ``analyze`` subcommand and its options (in the order ``--help`` lists them)."""
    analyze = sub.add_parser(
        "analyze", allow_abbrev=False, help="analyze the weight matrices of a checkpoint (no model class needed)",
        description="Analyze every weight matrix of a checkpoint by name and shape, reading one tensor at a time: "
                    + CHECKPOINT_KINDS + ". Several paths are merged into one checkpoint. Prints one row per "
                    "matrix and one model summary. Under torchrun (e.g. torchrun --nproc-per-node 2 -m "
                    "lightning_htsr analyze DIR) each process analyzes a cost-balanced share and rank 0 prints.")
    analyze.add_argument("paths", metavar="PATH", nargs="+",
                         help="checkpoint file, .index.json file or model directory (several: one checkpoint)")
    analyze.add_argument("--csv", metavar="FILE", help="write the full table (all columns) as CSV")
    analyze.add_argument("--json", metavar="FILE", help="write the full table (all columns) as JSON records")
    analyze.add_argument("--plots", metavar="DIR",
                         help="write one ESD figure and one power-law fit diagnostic figure (D and alpha over "
                              "xmin, lin-lin and log-lin ESD) per analyzed matrix, and index.html")
    analyze.add_argument("--adapter", metavar="DIR",
                         help="a peft LoRA adapter directory (adapter_config.json, adapter_model.safetensors) merged "
                              "into PATH, its base model, one matrix at a time")
    analyze.add_argument("--lora", choices=("merged", "delta", "base"), default="merged",
                         help="with --adapter: analyze W + scaling B@A (merged, default), the update alone (delta: "
                              "adapted matrices only) or the base weights (base)")
    analyze.add_argument("--base", metavar="BASE", help="analyze the deltas W - W_base from this base checkpoint "
                         "(matched by name and shape; unmatched, unchanged and low-rank deltas are rows saying so)")
    add_selection_options(analyze)
    add_numerics_options(analyze)
    analyze.add_argument("--columns", metavar="A,B,C",
                         help="columns of the printed table (default: " + ",".join(DEFAULT_TABLE_COLUMNS) + ")")
    analyze.add_argument("--trust-pickle", action="store_true",
                         help="allow checkpoints that pickle arbitrary Python objects (runs code from the file: "
                              "only for trusted files)")
    _add_execution_options(analyze)
    analyze.set_defaults(handler=_run_analyze)


def _add_execution_options(analyze: argparse.ArgumentParser) -> None:
    """Where ``analyze`` runs and what it shows while running: ``--threads/--device/--backend/--progress/--quiet``."""
    from ..offline import DEFAULT_THREADS

    analyze.add_argument("--threads", metavar="N", type=int, default=None,
                         help=f"torch intra-op threads per process (default {DEFAULT_THREADS}: measured fastest on "
                              "small shared CPUs; use torchrun processes for more cores; 0: torch's default)")
    analyze.add_argument("--device", metavar="DEV", default=None,
                         help="analyze on this device, e.g. cuda (matrices are moved one at a time; default cpu)")
    analyze.add_argument("--backend", choices=("torch", "cupy"), default="torch",
                         help="eigensolver library (cupy needs --device cuda and CuPy)")
    analyze.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="per-matrix progress bar with elapsed time and ETA on stderr (default: on a "
                              "terminal, unless --quiet)")
    analyze.add_argument("--quiet", "-q", action="store_true",
                         help="print only the summary line (no table, notes or automatic progress bar)")


def _add_report_parser(sub: Any) -> None:
    """The ``report`` subcommand and its options."""
    report = sub.add_parser(
        "report", allow_abbrev=False, help="figures and index.html from a training run's HT-SR history",
        description="Write PNG figures (alpha and entropy over training, phase map, final ESD fits) and index.html "
                    "from the htsr_history.csv (or .jsonl) and htsr_spectra.npz written by HTSRCallback.")
    report.add_argument("run", metavar="RUN",
                        help="log directory (searched recursively; the newest history is used) or history file")
    report.add_argument("--out", metavar="DIR",
                        help="report directory (default: RUN/htsr_report, or htsr_report next to the history file)")
    report.set_defaults(handler=_run_report)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-htsr`` (subcommands ``analyze``, ``distances``, ``compare``, ``report``)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Heavy-Tailed Self-Regularization diagnostics: eigenvalue spectra, power-law alpha,\n"
                    "spectral entropy and 5+1 phase of every weight matrix.",
        epilog=f"Examples:\n  {PROG} analyze last.ckpt\n  {PROG} analyze model.safetensors --csv layers.csv "
               f"--plots esd/\n  {PROG} analyze finetuned/ --base base/\n  {PROG} distances finetuned/ base/\n  "
               f"{PROG} compare a.ckpt b.ckpt c.ckpt\n  {PROG} report lightning_logs/version_0\n\nExit codes: 0 "
               "success, 2 usage error or a file that cannot be analyzed\n(the message on stderr says which file and "
               "why), 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_analyze_parser(sub)
    from .cli_compare import add_parsers

    add_parsers(sub)
    _add_report_parser(sub)
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
        sys.stderr.write(f"{PROG}: error: a command is required (analyze, distances, compare or report)\n")
        return 2
    from ..weights.checkpoints import CheckpointError

    try:
        return int(args.handler(args, sys.stdout, sys.stderr))
    except (CLIError, CheckpointError) as err:
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
