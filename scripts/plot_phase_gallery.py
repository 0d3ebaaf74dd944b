"""Regenerate docs/phase_gallery.png: the ESD of one synthetic matrix per phase, with the classifier's label.

Each panel is ``lightning_htsr.spectra.synthetic.phase_example(phase, N, M, seed)`` analysed with
``analyze_matrices`` (default options) and drawn with ``plotting.plot_esd`` (histogram, Marchenko-Pastur fit,
bulk edge, spike threshold, power-law fit), titled ``"<generator phase> -> classified <label>"``.

Usage: python scripts/plot_phase_gallery.py [--out docs/phase_gallery.png] [--size 2000 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure

from lightning_htsr.analysis import analyze_matrices
from lightning_htsr.plotting import phase_label, plot_esd
from lightning_htsr.spectra.phases import Phase
from lightning_htsr.spectra.synthetic import phase_example
from lightning_htsr.weights.matrix import WeightMatrix

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "phase_gallery.png"


def build_gallery(N: int, M: int, seed: int) -> tuple[Figure, list[tuple[str, str]]]:  # noqa: N803
    """The 2 x 3 figure and ``(generator phase, classified label)`` per panel."""
    fig = Figure(figsize=(15, 9), dpi=100, layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    labels = []
    for ax, phase in zip(axes, Phase):
        weight = phase_example(phase, N, M, seed=seed)
        matrix = WeightMatrix.from_tensor(phase.value, weight)
        result = analyze_matrices([matrix])[0]
        label = phase_label(result.phase)
        labels.append((phase.value, label))
        ev = result.eigenvalues if result.eigenvalues is not None else []
        plot_esd(ev, powerlaw=result.powerlaw, mp=result.mp, phase=result.phase, Q=matrix.Q, ax=ax,
                 title=f"{phase.value} -> classified {label}")
    fig.suptitle(f"lightning-htsr: ESDs of synthetic {N} x {M} matrices of each phase (seed {seed})", fontsize=13)
    return fig, labels


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default: %(default)s)")
    parser.add_argument("--size", type=int, nargs=2, default=(2000, 1000), metavar=("N", "M"),
                        help="matrix shape, N >= M (default: 2000 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of phase_example (default: 0)")
    parser.add_argument("--dpi", type=float, default=100.0, help="PNG resolution (default: 100)")
    args = parser.parse_args(argv)
    N, M = args.size  # noqa: N806
    if N < M:
        parser.error("--size N M needs N >= M")
    fig, labels = build_gallery(N, M, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    for generated, label in labels:
        mark = "" if generated == label else "   <- differs"
        print(f"{generated:17s} -> classified {label}{mark}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
