"""The one input converter of the spectral stages (fits, metrics, phase classifier), below all of them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["sorted_float64"]


def sorted_float64(eigenvalues: Tensor | np.ndarray | Sequence[float]) -> Tensor:
    """Eigenvalues as one flat float64 tensor sorted ascending: the one input converter of the fits, the metrics and
    the phase classifier. A tensor stays on its device; NumPy arrays and sequences come back on the CPU.

    Example:
        >>> sorted_float64([3.0, 1.0, 2.0])
        tensor([1., 2., 3.], dtype=torch.float64)
    """
    if isinstance(eigenvalues, Tensor):
        x = eigenvalues.detach().to(torch.float64)
    else:
        x = torch.from_numpy(np.ascontiguousarray(eigenvalues, dtype=np.float64))
    return torch.sort(x.reshape(-1)).values
