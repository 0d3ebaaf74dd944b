"""Checkpoint files -> one table: the streaming driver behind :func:`analyze_checkpoint` and ``lightning-htsr
analyze``.

checkpoint (headers) --plan--> matrices by name and shape --(this rank's share, read one tensor at a time)-->
:func:`~lightning_htsr.analysis.analyze_stream` --> records, gathered on every rank when distributed.

Threads: offline analysis runs torch (and SciPy's BLAS, which follows it) with :data:`DEFAULT_THREADS` intra-op
threads unless told otherwise. Measured on the 2-core development box (``benchmarks/README.md``, one Llama-7B decoder
layer): on a quiet box 2 threads were 1.45x faster than 1 (34 s vs 49 s), but 2 processes of 1 thread (``torchrun``)
were about 1.9x, and with other jobs loading the cores 2 threads were 2x *slower* than 1 (MKL's threads wait for
each other). One thread per process also makes the table independent of how many processes share the work: float32
sums depend on the thread count (alpha moved by up to 3e-4 relative between 1 and 2 threads), never on the number
of processes. ``--threads 0`` (torch's default) is the faster choice for one process on an otherwise idle machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .analysis import AnalysisOptions, FitKind, MatrixAnalysis, analyze_stream, records_table, resolve_options
from .distributed import assign_owners, gather_objects
from .spectra.eigenvalues import Backend, Precision
from .spectra.phases import PhaseConfig
from .weights.adapters import AdapterFiles, LoraMode, check_lora_mode, read_adapter
from .weights.checkpoints import Checkpoint, CheckpointError, TensorInfo, open_checkpoint
from .weights.matrix import WeightMatrix
from .weights.state_dict import ShapeAccess, is_weight_entry, iter_state_dict_matrices, state_dict_source

__all__ = ["DEFAULT_THREADS", "analyze_checkpoint", "checkpoint_plan", "checkpoint_records"]

#: torch intra-op threads during offline analysis (see the module docstring for the measurement).
DEFAULT_THREADS = 1


@contextlib.contextmanager
def threads_limit(threads: int | None) -> Iterator[int]:
    """Run the body with ``threads`` torch intra-op threads (default :data:`DEFAULT_THREADS`), then restore.

    Args:
        threads: Number of threads; ``0`` leaves torch's own choice.

    Yields:
        The number of threads in effect.
    """
    before = torch.get_num_threads()
    wanted = DEFAULT_THREADS if threads is None else threads
    if wanted > 0:
        torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def checkpoint_plan(checkpoint: Checkpoint, options: AnalysisOptions, *, include: Sequence[str] | str | None = None,
                    exclude: Sequence[str] | str | None = None, adapter: AdapterFiles | None = None,
                    lora: LoraMode = "merged") -> list[WeightMatrix]:
    """Every matrix the analysis will report, from the headers alone (no tensor is read).

    Args:
        checkpoint: The opened checkpoint.
        options: For ``min_evals``/``max_evals``.
        include: Regex(es) a matrix name must match.
        exclude: Regex(es) of names to drop.
        adapter: A LoRA adapter merged into the checkpoint (:func:`~lightning_htsr.weights.adapters.read_adapter`).
        lora: What an adapted matrix is (``"delta"`` lists the adapted matrices only).

    Returns:
        Matrices with names, shapes and ``source`` (``slices`` on the meta device).
    """
    items = ((i.name, torch.empty(i.shape, dtype=i.dtype, device="meta")) for i in checkpoint.infos
             if adapter is None or adapter.keeps(i.name, lora))
    return list(_matrices(items, checkpoint, options, include, exclude, access=ShapeAccess()))


def _matrices(items: Iterable[tuple[str, Tensor]], checkpoint: Checkpoint, options: AnalysisOptions,
              include: Sequence[str] | str | None, exclude: Sequence[str] | str | None,
              **access: Any) -> Iterator[WeightMatrix]:
    """The checkpoint's matrices from ``items`` (meta tensors for the plan, real ones for the analysis): one
    selection, so the plan and the analysis always name and skip the same matrices."""
    return iter_state_dict_matrices(items, shapes=checkpoint.shapes(), include=include, exclude=exclude,
                                    min_evals=options.min_evals, max_evals=options.max_evals, tie=False, **access)


def _checkpoint_analyses(
    checkpoint: Checkpoint,
    options: AnalysisOptions,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    owned: Callable[[str], bool] | None = None,
    adapter: AdapterFiles | None = None,
    lora: LoraMode = "merged",
    base: Any = None,
) -> Iterator[MatrixAnalysis]:
    """Analyze a checkpoint's matrices as their tensors are read, one at a time.

    Args:
        checkpoint: The opened checkpoint.
        options: Conventions.
        include: Regex(es) a matrix name must match.
        exclude: Regex(es) of names to drop.
        device: Analyze there (each matrix is moved when its turn comes).
        owned: Only read entries whose :attr:`~lightning_htsr.weights.matrix.WeightMatrix.source` passes (a
            rank's share).
        adapter: A LoRA adapter merged into each tensor as it is read (memory: the tensor at hand and its merge).
        lora: What an adapted matrix is.
        base: A :class:`~lightning_htsr.pairs.MatrixSource`: analyze ``W - W_base`` (:mod:`~lightning_htsr.deltas`).

    Yields:
        One :class:`~lightning_htsr.analysis.MatrixAnalysis` per matrix, in checkpoint order.
    """

    def wanted(info: TensorInfo) -> bool:
        return is_weight_entry(info.name, info.shape) and (owned is None or owned(
            state_dict_source(info.name, info.shape))) and (adapter is None or adapter.keeps(info.name, lora))

    items = checkpoint.tensors(wanted)
    if base is not None:
        from .deltas import analyze_deltas
        from .pairs import checkpoint_source

        if adapter is not None:
            raise ValueError("an adapter and a base model together are not supported: merge the adapter first")
        side = checkpoint_source(checkpoint, options, include=include, exclude=exclude)
        return analyze_deltas(side, base, options, matrices=_matrices(items, checkpoint, options, include, exclude),
                              device=device)
    if adapter is None:
        return analyze_stream(_matrices(items, checkpoint, options, include, exclude), options, device=device)
    matrices = _matrices(adapter.apply(items, lora), checkpoint, options, include, exclude)
    return (_noted(result, adapter.note(f"{result.record['name']}.weight", lora))
            for result in analyze_stream(matrices, options, device=device))


def _noted(result: MatrixAnalysis, note: str) -> MatrixAnalysis:
    """``result`` with ``note`` appended to its record's (how an adapted matrix was obtained)."""
    if note:
        result.record["note"] = "; ".join(filter(None, [result.record.get("note"), note]))
    return result


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _progress(results: Iterator[MatrixAnalysis], total: int, enabled: bool) -> Iterator[MatrixAnalysis]:
    """``results`` with a tqdm bar on stderr: matrices done, elapsed, ETA, and the matrix just finished."""
    if not enabled:
        yield from results
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="matrix", dynamic_ncols=True, mininterval=0.5) as bar:
        for result in results:
            bar.set_postfix_str(str(result.record["name"]), refresh=False)
            bar.update(1)
            yield result


def checkpoint_records(
    checkpoint: Checkpoint,
    options: AnalysisOptions,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    on_result: Callable[[MatrixAnalysis], None] | None = None,
    adapter: AdapterFiles | None = None,
    lora: LoraMode = "merged",
    base: Any = None,
) -> list[dict[str, Any]]:
    """The records of every matrix, in plan order; under ``torch.distributed`` each rank analyzes a cost-balanced
    share (:func:`~lightning_htsr.distributed.assign_owners`) and every rank gets every record.

    Args:
        checkpoint: The opened checkpoint.
        options: Conventions.
        include: Regex(es) a matrix name must match.
        exclude: Regex(es) of names to drop.
        device: Analyze there.
        progress: Show a progress bar (this rank's matrices).
        on_result: Called with each of this rank's results (e.g. to plot its ESD).
        adapter: A LoRA adapter merged into the checkpoint (checked against its shapes first).
        lora: What an adapted matrix is.
        base: A :class:`~lightning_htsr.pairs.MatrixSource`: analyze ``W - W_base`` (:mod:`~lightning_htsr.deltas`).

    Returns:
        One record per matrix of :func:`checkpoint_plan`.
    """
    if adapter is not None:
        adapter.check(checkpoint.shapes())
    plan = checkpoint_plan(checkpoint, options, include=include, exclude=exclude, adapter=adapter, lora=lora)
    rank, world = _world()
    owners = assign_owners(plan, world) if world > 1 else {}
    mine = [m for m in plan if owners.get(m.source, 0) == rank]
    records: list[dict[str, Any]] = []
    error = ""
    analyses = _checkpoint_analyses(checkpoint, options, include=include, exclude=exclude, device=device,
                                   owned=(lambda s: owners.get(s, 0) == rank) if world > 1 else None,
                                   adapter=adapter, lora=lora, base=base)
    try:
        for result in _progress(analyses, len(mine), progress):
            if on_result is not None:
                on_result(result)
            records.append(result.record)
    except CheckpointError as err:  # a damaged shard seen by one rank: every rank must still reach the gather
        error = str(err)
    parts = gather_objects((records, error), world)
    errors = [e for _, e in parts if e]
    if errors:
        raise CheckpointError(errors[0])
    order = {m.name: i for i, m in enumerate(plan)}
    merged = [r for part, _ in parts for r in part]
    return sorted(merged, key=lambda r: order.get(r["name"], len(order)))


def analyze_checkpoint(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    fit: FitKind = "fast",
    min_tail: int | None = None,
    precision: Precision = "auto",
    backend: Backend = "torch",
    min_evals: int | None = None,
    max_evals: int | None = None,
    ww_compat: bool = False,
    phase_config: PhaseConfig | None = None,
    options: AnalysisOptions | None = None,
    device: torch.device | str | None = None,
    threads: int | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
    fix_fingers: str | None = None,
    randomize: bool = False,
    seed: int | None = None,
    xmax: int | float | None = None,  # noqa: PYI041 - an int and a float mean different things
    max_fingers: int | None = None,
    finger_thresh: float | None = None,
    adapter: str | os.PathLike[str] | None = None,
    lora: LoraMode = "merged",
    base: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
) -> pd.DataFrame:
    """Analyze checkpoint files without the model's class, streaming: one table for the whole checkpoint.

    Reads a file, several files, a Hugging Face model directory (safetensors or ``pytorch_model-*.bin`` shards
    with their index, or a single file) or an ``*.index.json``; see :mod:`lightning_htsr.weights.checkpoints`. Tensors
    are read one at a time, upcast per matrix and dropped once analyzed, so memory stays at a few of the largest
    matrices. Under an initialized ``torch.distributed`` process group (``torchrun``), each rank analyzes a
    cost-balanced share and every rank returns the whole table. ``include``, ``exclude`` and the conventions
    (``fit`` ... ``options``) and weightwatcher's options (``fix_fingers`` ... ``finger_thresh``) are
    :func:`~lightning_htsr.analyze_state_dict`'s.

    Args:
        paths: What to read.
        device: Analyze there (``"cuda"``): each matrix is moved when its turn comes.
        threads: torch intra-op threads during the analysis (default :data:`DEFAULT_THREADS`; ``0``: torch's).
        progress: Show a tqdm progress bar on stderr.
        trust_pickle: Allow ``torch.save`` files that pickle arbitrary Python objects.
        adapter: A ``peft`` LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) to
            merge into the checkpoint, its base model: each adapted tensor is merged as it is read (peft's names
            ``base_model.model.<path>.lora_A.weight`` matched to the base's ``<path>.weight``), so the table equals
            that of the merged model saved to disk. A mismatched adapter (shapes, missing base tensors, unknown or
            unsupported config keys, missing files) raises :class:`CheckpointError` before anything is analyzed.
        lora: With ``adapter``: ``"merged"`` (default), ``"delta"`` (``scaling * B @ A`` alone; only the adapted
            matrices are listed) or ``"base"`` (the checkpoint as it is). See :func:`~lightning_htsr.analyze`.
        base: The base model's checkpoint (or a module or state dict): analyze ``W - W_base`` instead, both read one
            matrix at a time (:mod:`~lightning_htsr.deltas`).

    Returns:
        The table of :func:`~lightning_htsr.analyze` (same columns, one row per matrix).

    Raises:
        CheckpointError: When a file cannot be read (the message names it).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_file({"fc.weight": torch.randn(512, 256, generator=torch.Generator().manual_seed(0))},
        ...               f"{d}/model.safetensors")
        ...     analyze_checkpoint(d)[["name", "phase"]].values.tolist()
        [['fc', 'random_like']]
    """
    options = resolve_options(options, ww_compat=ww_compat, fit=fit, min_tail=min_tail, precision=precision,
                              backend=backend, min_evals=min_evals, max_evals=max_evals, phase_config=phase_config,
                              fix_fingers=fix_fingers, randomize=randomize, seed=seed, xmax=xmax,
                              max_fingers=max_fingers, finger_thresh=finger_thresh)
    checkpoint = open_checkpoint(paths, trust_pickle=trust_pickle)
    lora = check_lora_mode(lora)  # type: ignore[assignment]
    files = read_adapter(adapter) if adapter is not None else None
    other = None
    if base is not None:
        from .pairs import open_source

        other = open_source(base, options, trust_pickle=trust_pickle, include=include, exclude=exclude)
    with threads_limit(threads):
        records = checkpoint_records(checkpoint, options, include=include, exclude=exclude, device=device,
                                     progress=progress, adapter=files, lora=lora, base=other)
    return records_table(records)
