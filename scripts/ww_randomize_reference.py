"""Reference values of weightwatcher 0.7.7's ``randomize=True`` columns for
``tests/test_ww_selection_fingers_randomize.py``.

Run ``OMP_NUM_THREADS=1 python scripts/ww_randomize_reference.py`` (about a minute on one core): it prints, for each
test model, the mean over NumPy seeds 0-4 of every column per layer from weightwatcher and from
``analyze(model, ww_compat=True, randomize=True, seed=s)``; the test stores weightwatcher's means.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

sys.path[:0] = [".", "tests"]
from test_ww_selection_fingers_randomize import trap_model as model  # noqa: E402  (one definition of the test models)

from lightning_htsr import analyze  # noqa: E402
from lightning_htsr.spectra.randomize import RANDOMIZE_COLUMNS  # noqa: E402

SEEDS = range(5)


def main() -> None:
    import weightwatcher as ww

    logging.disable(logging.CRITICAL)
    cols = list(RANDOMIZE_COLUMNS)
    for kind in ("gauss", "heavy", "trap"):
        m = model(kind)
        ref, ours = [], []
        for s in SEEDS:
            np.random.seed(s)
            ref.append(ww.WeightWatcher(model=m).analyze(randomize=True)[cols].to_numpy(float))
            ours.append(analyze(m, ww_compat=True, randomize=True, seed=s)[cols].to_numpy(float))
        for label, values in (("weightwatcher", ref), ("ours", ours)):
            mean = np.mean(values, axis=0)
            print(f"{kind} {label}: {{")
            for j, c in enumerate(cols):
                print(f"    {c!r}: ({', '.join(f'{v:.6g}' for v in mean[:, j])}),")
            print("}")


if __name__ == "__main__":
    main()
