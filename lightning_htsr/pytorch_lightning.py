"""``HTSRCallback`` for the standalone ``pytorch_lightning`` package.

``lightning_htsr.HTSRCallback`` subclasses ``lightning.pytorch.Callback``. A ``pytorch_lightning.Trainer`` runs it
too (callbacks are duck-typed), but type-checked entry points such as ``pytorch_lightning.cli.LightningCLI``
expect their own namespace's ``Callback``: use ``lightning_htsr.pytorch_lightning.HTSRCallback`` there.
"""

from __future__ import annotations

from pytorch_lightning import Callback

from .training.callback import _HTSRCallbackImpl

__all__ = ["HTSRCallback"]


class HTSRCallback(_HTSRCallbackImpl, Callback):
    __doc__ = _HTSRCallbackImpl.__doc__
    _log_namespace = "pytorch_lightning"
