"""``python -m lightning_htsr`` (and ``torchrun -m lightning_htsr``): the ``lightning-htsr`` command line."""

from .views.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
