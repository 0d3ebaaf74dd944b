"""The kept copy of the weights of the analysis the stop rule judges best, and handing them back.

:class:`KeptWeights` copies a module's parameters and buffers into CPU memory (into buffers allocated once and reused,
so a new best analysis costs one device-to-host copy and no allocation), writes them to a file for a checkpoint and
reads them back on resume (one file per rank in a multi-process run, :func:`rank_file`), and copies them back into the
module. It works on this rank's *local* tensors:

* one process, DDP: the full tensors (every DDP rank keeps its own copy, so a node holds ``world_size`` copies);
* FSDP2 / tensor parallel (``DTensor``): the local shard (``to_local()``), so nothing is gathered and each rank keeps
  ``1 / world_size`` of the model; restoring writes every rank's shard back into place.

Memory: one copy of the parameters and buffers in their own dtype, e.g. 4 GB for a 1B-parameter model in float32
(2 GB in bfloat16), per rank under DDP, divided by the world size under FSDP2. The file written at a checkpoint has
the same size.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(4, 3)
    >>> kept = KeptWeights()
    >>> kept.take(layer, analysis=2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.add_(1.0)
    >>> kept.restore(layer)
    True
    >>> kept.analysis, kept.nbytes
    (2, 60)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["KeptWeights", "rank_file"]


def rank_file(base: str, rank: int, world_size: int) -> str:
    """This rank's file of a per-rank set (``name-rank<r>.pt``; the base name itself in one process).

    Example:
        >>> rank_file("logs/htsr_best_weights.pt", 1, 2), rank_file("logs/htsr_best_weights.pt", 0, 1)
        ('logs/htsr_best_weights-rank1.pt', 'logs/htsr_best_weights.pt')
    """
    stem, ext = os.path.splitext(base)
    return f"{stem}-rank{rank}{ext}" if world_size > 1 else base


def _local(tensor: Tensor) -> Tensor:
    """This rank's part of a tensor: the local shard of a ``DTensor``, the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Parameters and persistent-or-not buffers, by name, each once (tied weights appear under their first name)."""
    yield from module.named_parameters()
    yield from module.named_buffers()


class KeptWeights:
    """A CPU copy of one module's weights at one analysis (see the module docstring).

    Attributes:
        analysis: Index of the analysis whose weights are kept (``-1``: none).
    """

    def __init__(self) -> None:
        self.analysis = -1
        self._tensors: dict[str, Tensor] = {}
        self._saved_analysis = -1  # the analysis last written to a file

    @property
    def nbytes(self) -> int:
        """Bytes held in CPU memory."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    @property
    def empty(self) -> bool:
        return self.analysis < 0 or not self._tensors

    @torch.no_grad()
    def take(self, module: nn.Module, analysis: int) -> None:
        """Copy the module's current parameters and buffers (this rank's local parts) into the kept copy."""
        current = dict(_named_tensors(module))
        for name in set(self._tensors) - set(current):  # a layer removed since the last copy
            del self._tensors[name]
        for name, tensor in current.items():
            local = _local(tensor.detach())
            kept = self._tensors.get(name)
            if kept is None or kept.shape != local.shape or kept.dtype != local.dtype:
                kept = self._tensors[name] = torch.empty(local.shape, dtype=local.dtype, device="cpu")
            kept.copy_(local, non_blocking=False)
        self.analysis = analysis

    @torch.no_grad()
    def restore(self, module: nn.Module) -> bool:
        """Copy the kept weights back into the module; ``False`` (and nothing written) if the copy does not fit it."""
        if self.empty:
            return False
        targets = dict(_named_tensors(module))
        if set(targets) != set(self._tensors) or any(
                _local(targets[n]).shape != t.shape for n, t in self._tensors.items()):
            return False
        for name, kept in self._tensors.items():
            _local(targets[name].detach()).copy_(kept)
        return True

    def save(self, path: str) -> None:
        """Write the kept copy to ``path`` (skipped when that analysis was already written there)."""
        if self.empty or self._saved_analysis == self.analysis and os.path.exists(path):
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save({"analysis": self.analysis, "tensors": self._tensors}, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated file under the real name
        self._saved_analysis = self.analysis

    def load(self, path: str) -> None:
        """Read a copy written by :meth:`save` (plain tensors: ``weights_only`` loading)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._tensors = dict(state["tensors"])
        self.analysis = self._saved_analysis = int(state["analysis"])

    def clear(self) -> None:
        self.analysis, self._tensors = -1, {}
