"""Print the phase classifier's diagnostics on synthetic matrices of every phase (calibration aid).

Usage: python scripts/calibrate_phases.py [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import collections

import torch

from lightning_htsr.analysis import analyze_matrices
from lightning_htsr.spectra.phases import Phase
from lightning_htsr.spectra.synthetic import phase_example
from lightning_htsr.weights.matrix import WeightMatrix

SHAPES = [(256, 256), (512, 256), (1024, 256), (2560, 256), (512, 512), (2048, 512), (1024, 1024), (4096, 1024)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="use fresh seeds to check generalization")
    parser.add_argument("--quick", action="store_true", help="only M = 256 and 512")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = [s for s in SHAPES if not args.quick or s[1] <= 512]
    confusion: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for phase in Phase:
        for N, M in shapes:
            mats = [WeightMatrix.from_tensor(f"{phase.value}-{N}x{M}-{s}", phase_example(phase, N, M, seed=s))
                    for s in range(args.first_seed, args.first_seed + args.seeds)]
            for res in analyze_matrices(mats):
                r = res.record
                confusion[phase.value][r["phase"]] += 1
                if args.verbose or r["phase"] != phase.value:
                    print(f"{r['name']:32s} -> {str(r['phase']):17s} spikes={r['num_spikes']:4d} "
                          f"gap={r['spike_gap_tw']:8.1f} maxgap={r['max_gap_tw']:8.1f} ks={r['ks_mp']:.3f} "
                          f"tail={r['tail_mass']:.3f} alpha={r['alpha']:6.2f} D={r['D']:.3f} "
                          f"ntail={r['num_pl_spikes']} zero={r['frac_zero']:.2f} | {r['phase_reason']}")
    total = correct = 0
    for phase, counts in confusion.items():
        n = sum(counts.values())
        total += n
        correct += counts[phase]
        print(f"{phase:17s} {counts[phase]}/{n} correct; {dict(counts)}")
    print(f"overall {correct}/{total} = {correct / total:.1%}")


if __name__ == "__main__":
    main()
