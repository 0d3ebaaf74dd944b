"""Rebuild tests/data/powerlaw_degenerate_exact.json: exact-mode power-law fits of the pooled Student-t ESDs.

``test_fast_within_001_of_exact_on_nearly_degenerate_ks_minima`` compares the fast search with these stored exact
(O(n^2)) fits instead of recomputing twelve of them on every run; ``test_stored_exact_fits_are_current`` recomputes
two live, so a change to the exact mode shows up as a failure there. Rerun this after such an intended change:

    OMP_NUM_THREADS=1 python tests/data/regenerate_powerlaw_exact.py      # about 10 s on one core
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]
from test_powerlaw import DEGENERATE_EXACT, pooled_student_t_esd  # noqa: E402  (one definition of the ESDs)

from lightning_htsr.spectra.powerlaw import fit_power_law  # noqa: E402


def main() -> None:
    table = {}
    for n in (4096, 8192):
        for seed in (0, 1, 2):
            ev = pooled_student_t_esd(n, seed)
            for ks in ("two_sided", "lower"):
                fit = fit_power_law(ev, method="exact", ks=ks)
                table[f"{n}-{seed}-{ks}"] = {"alpha": fit.alpha, "xmin": fit.xmin, "D": fit.D,
                                             "num_evals": len(ev), "ev_sum": float(ev.sum()),
                                             "ev_max": float(ev[-1])}
    DEGENERATE_EXACT.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(table)} fits to {DEGENERATE_EXACT}")


if __name__ == "__main__":
    main()
