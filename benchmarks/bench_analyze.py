"""Wall-time benchmark of ``lightning_htsr.analyze`` against weightwatcher 0.7.7 and the linear-algebra floor.

Run from the repository root (a few minutes on 2 CPU cores)::

    python benchmarks/bench_analyze.py                 # full run, median of 5 timed repeats (or more for fast cases)
    python benchmarks/bench_analyze.py --quick         # median of 3, for a smoke test
    python benchmarks/bench_analyze.py --json out.json # also write every figure (all individual runs) as JSON
    python benchmarks/bench_analyze.py --profile       # also cProfile one analyze() call per model

Everything runs in ONE process on ONE BLAS/OpenMP thread (``OMP_NUM_THREADS`` & co. are set before numpy and torch
are imported, then ``torch.set_num_threads(1)`` and ``threadpoolctl.threadpool_limits(1)``), so that the numbers
do not depend on how many cores the box has or on thread oversubscription when it is shared. Every timing is the
median of >= 5 repeats (3 with ``--quick``; cheap measurements get up to 25) after one untimed warm-up call; the
min-max of the repeats is printed as the spread. The measurements of one table row run interleaved (round-robin),
so that a change in the machine's load hits both sides of a ratio alike. Ratios are printed on wall time (the
verdict) and on process CPU time (less sensitive to other jobs on a shared box); the load average and Linux CPU
pressure (PSI) at start and end are printed too. On a shared machine, look at the spread before trusting a ratio.

Models (``torch.manual_seed(0)``, default PyTorch init):

* ``mlp``: ``Sequential(Linear(784, 1024), ReLU, Linear(1024, 1024), ReLU, Linear(1024, 10))``;
* ``cnn``: ``Conv2d 3->64->128->256`` (3x3, ReLU between), global average pool, ``Linear(256, 10)``;
* ``transformer``: ``TransformerEncoder(TransformerEncoderLayer(512, 8, 2048, batch_first=True), 6,
  enable_nested_tensor=False)``.

Tables printed:

1. Per model: ``weightwatcher.WeightWatcher(model=m).analyze()`` (defaults) vs ours,
   ``lightning_htsr.analyze(m, layer_types=["linear", "conv2d", "embedding"])`` (default options). weightwatcher
   analyses Linear/Conv2d/Embedding only (not ``MultiheadAttention.in_proj``), hence the ``layer_types``
   restriction; the script asserts both analyse the same set of layer names.
2. weightwatcher's ``analyze(mp_fit=True)`` vs ours: ours always computes Marchenko-Pastur columns, so this is the
   like-for-like comparison.
3. Ours vs the linear-algebra floor: for every matrix ours analyses (its tall ``(num_slices, N, M)`` float32 stack,
   extracted beforehand), only ``G = W^T W`` (batched over the slices) and ``torch.linalg.eigvalsh(G)``, summed
   over matrices. Everything ours does beyond that (layer extraction, float64 copies, sorting, power-law and MP
   fits, phase classification, the DataFrame) is overhead over this floor.
4. Route choice: per shape, float32/float64 Gram + ``eigvalsh``, float32/float64 ``torch.linalg.svdvals`` and
   SciPy float64 ``scipy.linalg.svd(compute_uv=False)`` (looped over slices for stacks), all on the tall
   orientation (the one the package uses), inputs already in the target dtype; ms and ratio to float32 Gram.
5. Power-law fit alone: ``lightning_htsr.spectra.powerlaw.fit_power_law`` (``method="fast"`` and ``"exact"``) and
   weightwatcher's ``WWFit`` on the same realistic ESDs (pooled squared singular values, divided by N, of seeded
   Student-t(2.5) slices of shape (2m, m) -- what a convolution's pooled ESD looks like) with n = 1024, 4096,
   8192, 15000 eigenvalues, plus ``|alpha_fast - alpha_exact|``.

Targets (printed with MET / MISSED next to each measurement): ours <= 1.2x the floor; >= 3x faster than
weightwatcher's default ``analyze()``; >= 20x faster than ``analyze(mp_fit=True)``; the fast fit alone <= 20 ms at
n = 8192.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402
from torch import nn  # noqa: E402

import lightning_htsr  # noqa: E402
from lightning_htsr.spectra.powerlaw import fit_power_law  # noqa: E402
from lightning_htsr.weights.modules import weight_matrices  # noqa: E402

torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):  # only allowed before any inter-op parallel work
    torch.set_num_interop_threads(1)
_LIMITS = threadpool_limits(1)  # kept alive for the whole process

logging.disable(logging.CRITICAL)
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import weightwatcher  # noqa: E402  (prints a CUDA notice on import)
    from weightwatcher.WW_powerlaw import WWFit  # noqa: E402

LAYER_TYPES = ["linear", "conv2d", "embedding"]
TARGET_FLOOR = 1.2  # ours / floor <=
TARGET_WW = 3.0  # ww default / ours >=
TARGET_WW_MP = 20.0  # ww mp_fit / ours >=
TARGET_FIT_MS = 20.0  # fast fit at n = 8192 <=
FIT_TARGET_N = 8192
ROUTE_SHAPES: list[tuple[int, ...]] = [(1024, 784), (1024, 1024), (2048, 512), (512, 2048), (4096, 1024),
                                       (9, 128, 64), (36, 512, 512)]
FIT_SIZES = [1024, 4096, 8192, 15000]


# --------------------------------------------------------------------------------------------------- timing


class Timing:
    """Wall-clock (and process CPU) seconds of the timed repeats of one measurement."""

    def __init__(self, wall: list[float], cpu: list[float]) -> None:
        self.wall = wall
        self.cpu = cpu

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def lo(self) -> float:
        return min(self.wall)

    @property
    def hi(self) -> float:
        return max(self.wall)

    def ms(self) -> str:
        """``median (min-max)`` in ms."""
        return f"{_fmt_ms(self.median)} ({_fmt_ms(self.lo)}-{_fmt_ms(self.hi)})"

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.lo, "max_s": self.hi, "runs_s": self.wall,
                "cpu_median_s": statistics.median(self.cpu), "repeats": len(self.wall)}


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def measure_group(fns: dict[str, Callable[[], Any]], repeats: int, extend: bool, warm: bool = True
                  ) -> dict[str, Timing]:
    """Time several functions *interleaved* (round-robin), so that a slow drift in the machine's load hits them
    alike and their ratio stays meaningful. One untimed warm-up call each (unless ``warm=False``: the caller has
    just made it), then ``repeats`` rounds; with ``extend``, cheap groups get more rounds (up to 25, or until about
    1 s has been spent) for a stabler median."""
    if warm:
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    spent = 0.0
    rounds = 0
    while rounds < repeats or (extend and rounds < 25 and spent < 1.0):
        for key, fn in fns.items():
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            cpu[key].append(time.process_time() - c0)
            wall[key].append(dt)
            spent += dt
        rounds += 1
    return {k: Timing(wall[k], cpu[k]) for k in fns}


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print()
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
    for note in notes:
        print(note)
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------- models


def build_models() -> dict[str, nn.Module]:
    models: dict[str, nn.Module] = {}
    torch.manual_seed(0)
    models["mlp"] = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                  nn.Linear(1024, 10))
    torch.manual_seed(0)
    models["cnn"] = nn.Sequential(
        nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Conv2d(128, 256, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
    )
    torch.manual_seed(0)
    models["transformer"] = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True), 6, enable_nested_tensor=False
    )
    for m in models.values():
        m.eval()
    return models


def ww_analyze(model: nn.Module, **kwargs: Any):  # noqa: ANN201 - a pandas DataFrame
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return weightwatcher.WeightWatcher(model=model).analyze(**kwargs)


def ours_analyze(model: nn.Module):  # noqa: ANN201 - a pandas DataFrame
    return lightning_htsr.analyze(model, layer_types=LAYER_TYPES)


def floor_stacks(model: nn.Module) -> list[torch.Tensor]:
    """The float32 tall ``(num_slices, N, M)`` stacks ours analyses, extracted once (not timed)."""
    mats = weight_matrices(model, layer_types=LAYER_TYPES, min_evals=10)
    return [m.slices.to(torch.float32).contiguous() for m in mats if m.slices is not None]


def floor_call(stacks: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            for w in stacks:
                torch.linalg.eigvalsh(w.transpose(-1, -2) @ w)

    return run


def check_same_layers(name: str, ours_df, ww_df, ww_mp_df) -> list[str]:  # noqa: ANN001 - DataFrames
    ours_names = set(ours_df.loc[ours_df["status"] != "skipped", "name"].astype(str))
    ww_names = set(ww_df["longname"].astype(str))
    ww_mp_names = set(ww_mp_df["longname"].astype(str))
    assert ours_names == ww_names == ww_mp_names, (
        f"{name}: analysed layers differ: ours-only {sorted(ours_names - ww_names)}, "
        f"ww-only {sorted(ww_names - ours_names)}, mp_fit differs {sorted(ww_mp_names ^ ww_names)}"
    )
    return sorted(ours_names)


# --------------------------------------------------------------------------------------------------- sections


def bench_models(repeats: int, extend: bool, profile: bool) -> dict[str, Any]:
    models = build_models()
    out: dict[str, Any] = {}
    for name, model in models.items():
        print(f"  timing {name} ...", file=sys.stderr, flush=True)
        # These first calls are the warm-up calls of the timings below.
        ours_df = ours_analyze(model)
        ww_df = ww_analyze(model)
        ww_mp_df = ww_analyze(model, mp_fit=True)
        layers = check_same_layers(name, ours_df, ww_df, ww_mp_df)
        stacks = floor_stacks(model)
        assert len(stacks) == len(layers), (name, len(stacks), len(layers))
        floor = floor_call(stacks)
        floor()  # warm-up
        group = measure_group({"ours": lambda: ours_analyze(model), "floor": floor, "ww": lambda: ww_analyze(model)},
                              repeats, extend, warm=False)
        t_ours, t_floor, t_ww = group["ours"], group["floor"], group["ww"]
        # weightwatcher's mp_fit is seconds per call: exactly `repeats` runs, not interleaved.
        t_ww_mp = measure_group({"ww_mp": lambda: ww_analyze(model, mp_fit=True)}, repeats, False, warm=False)["ww_mp"]
        out[name] = {
            "layers": layers,
            "num_matrices": len(layers),
            "stack_shapes": [list(s.shape) for s in stacks],
            "ours": t_ours.as_dict(),
            "ww_default": t_ww.as_dict(),
            "ww_mp_fit": t_ww_mp.as_dict(),
            "floor": t_floor.as_dict(),
            "ratio_ww_over_ours": t_ww.median / t_ours.median,
            "ratio_ww_mp_over_ours": t_ww_mp.median / t_ours.median,
            "ratio_ours_over_floor": t_ours.median / t_floor.median,
            "cpu_ratio_ww_over_ours": t_ww.cpu_median / t_ours.cpu_median,
            "cpu_ratio_ww_mp_over_ours": t_ww_mp.cpu_median / t_ours.cpu_median,
            "cpu_ratio_ours_over_floor": t_ours.cpu_median / t_floor.cpu_median,
            "precision_used": sorted(set(ours_df.loc[ours_df["status"] != "skipped", "precision"].astype(str))),
            "_timings": (t_ours, t_ww, t_ww_mp, t_floor),
        }
        if profile:
            out[name]["profile"] = profile_ours(model)
    return out


def profile_ours(model: nn.Module, calls: int = 5) -> str:
    ours_analyze(model)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        ours_analyze(model)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    return buf.getvalue()


def print_model_tables(res: dict[str, Any]) -> None:
    rows_ww, rows_mp, rows_floor = [], [], []
    for name, r in res.items():
        t_ours, t_ww, t_ww_mp, t_floor = r["_timings"]
        k = str(r["num_matrices"])
        ratio = r["ratio_ww_over_ours"]
        rows_ww.append([name, k, t_ww.ms(), t_ours.ms(), f"{ratio:.2f}x", f"{r['cpu_ratio_ww_over_ours']:.2f}x",
                        f">= {TARGET_WW:g}x", verdict(ratio >= TARGET_WW)])
        ratio = r["ratio_ww_mp_over_ours"]
        rows_mp.append([name, k, t_ww_mp.ms(), t_ours.ms(), f"{ratio:.1f}x",
                        f"{r['cpu_ratio_ww_mp_over_ours']:.1f}x", f">= {TARGET_WW_MP:g}x",
                        verdict(ratio >= TARGET_WW_MP)])
        ratio = r["ratio_ours_over_floor"]
        rows_floor.append([name, k, t_ours.ms(), t_floor.ms(), f"{ratio:.2f}x",
                           f"{r['cpu_ratio_ours_over_floor']:.2f}x", f"<= {TARGET_FLOOR:g}x",
                           verdict(ratio <= TARGET_FLOOR)])
    spread = ("wall times in ms: median of the timed repeats (min-max of the repeats); ratios of wall medians "
              "(verdict), and of process-CPU-time medians (less sensitive to other jobs on the box)")
    print_table("Table 1. weightwatcher WeightWatcher(model=m).analyze() (defaults) vs ours "
                "lightning_htsr.analyze(m, layer_types=['linear','conv2d','embedding'])",
                ["model", "matrices", "ww analyze() ms", "ours ms", "ww/ours", "(CPU)", "target", "verdict"], rows_ww,
                [spread, "same analysed layer names asserted for both (and for mp_fit=True)"])
    print_table("Table 2. weightwatcher analyze(mp_fit=True) (the output comparable to ours, which has MP columns) "
                "vs ours",
                ["model", "matrices", "ww mp_fit ms", "ours ms", "ww_mp/ours", "(CPU)", "target", "verdict"], rows_mp,
                [spread])
    print_table("Table 3. ours vs the linear-algebra floor (float32 G = W^T W batched per slice stack + "
                "torch.linalg.eigvalsh, summed over the analysed matrices)",
                ["model", "matrices", "ours ms", "floor ms", "ours/floor", "(CPU)", "target", "verdict"], rows_floor,
                [spread])


def _tall(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 2:
        shape = (1, *shape)
    k, a, b = shape
    return (k, max(a, b), min(a, b))


def bench_routes(repeats: int, extend: bool) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in ROUTE_SHAPES:
        print(f"  timing routes for {shape} ...", file=sys.stderr, flush=True)
        k, n, m = _tall(shape)
        w32 = torch.randn(k, n, m, generator=gen) / n**0.5
        w64 = w32.double()
        np64 = [w64[i].numpy() for i in range(k)]

        def gram(w: torch.Tensor) -> Callable[[], None]:
            return lambda: torch.linalg.eigvalsh(w.transpose(-1, -2) @ w)

        def svd_torch(w: torch.Tensor) -> Callable[[], None]:
            return lambda: torch.linalg.svdvals(w)

        def svd_scipy() -> None:
            for a in np64:
                scipy.linalg.svd(a, compute_uv=False)

        with torch.no_grad():
            timings = measure_group({
                "gram_fp32": gram(w32),
                "gram_fp64": gram(w64),
                "svdvals_fp32": svd_torch(w32),
                "svdvals_fp64": svd_torch(w64),
                "scipy_svd_fp64": svd_scipy,
            }, repeats, extend)
        base = timings["gram_fp32"].median
        results.append({
            "shape": list(shape),
            "tall_stack": [k, n, m],
            **{key: t.as_dict() for key, t in timings.items()},
            "ratio_to_gram_fp32": {key: t.median / base for key, t in timings.items()},
            "_timings": timings,
        })
    return results


def print_route_table(res: list[dict[str, Any]]) -> None:
    keys = ["gram_fp32", "gram_fp64", "svdvals_fp32", "svdvals_fp64", "scipy_svd_fp64"]
    rows = []
    for r in res:
        t = r["_timings"]
        base = t["gram_fp32"].median
        row = ["x".join(map(str, r["shape"]))]
        for key in keys:
            row.append(f"{_fmt_ms(t[key].median)} ({t[key].median / base:.2f}x)")
        rows.append(row)
    print_table("Table 4. Route choice: ms, median (ratio to float32 Gram+eigvalsh); tall orientation, inputs already "
                "in the target dtype",
                ["shape", "fp32 Gram+eigvalsh", "fp64 Gram+eigvalsh", "fp32 svdvals", "fp64 svdvals",
                 "scipy fp64 svd"], rows,
                ["(512x2048 is computed as its tall 2048x512 transpose, as the package does; stacks are batched in "
                 "torch, looped in scipy)"])


def realistic_esd(n: int, seed: int = 0) -> np.ndarray:
    """Pooled ESD of ``n / m`` seeded Student-t(2.5) slices of shape ``(2m, m)``: eigenvalues of ``W^T W / N``."""
    m = 512 if n % 512 == 0 else 500 if n % 500 == 0 else n
    k = n // m
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(k):
        w = torch.from_numpy(rng.standard_t(2.5, size=(2 * m, m)) / np.sqrt(m))
        parts.append(torch.linalg.eigvalsh(w.T @ w / (2 * m)))
    ev = torch.sort(torch.cat(parts)).values.numpy()
    assert ev.size == n and ev.min() > 1e-5, (n, ev.min())
    return ev


def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def bench_fit(repeats: int, extend: bool) -> list[dict[str, Any]]:
    results = []
    for n in FIT_SIZES:
        print(f"  timing power-law fits at n = {n} ...", file=sys.stderr, flush=True)
        ev = realistic_esd(n)
        evt = torch.from_numpy(ev)
        fast = fit_power_law(evt, method="fast")
        exact = fit_power_law(evt, method="exact")
        wwfit = _quiet(WWFit, ev)
        group = measure_group({
            "fast": lambda: fit_power_law(evt, method="fast"),
            "exact": lambda: fit_power_law(evt, method="exact"),
            "wwfit": lambda: _quiet(WWFit, ev),
        }, repeats, extend)
        t_fast, t_exact, t_ww = group["fast"], group["exact"], group["wwfit"]
        results.append({
            "n": n,
            "fast": t_fast.as_dict(),
            "exact": t_exact.as_dict(),
            "wwfit": t_ww.as_dict(),
            "alpha_fast": fast.alpha,
            "alpha_exact": exact.alpha,
            "alpha_wwfit": float(wwfit.alpha),
            "abs_alpha_fast_minus_exact": abs(fast.alpha - exact.alpha),
            "xmin_fast": fast.xmin,
            "xmin_exact": exact.xmin,
            "_timings": (t_fast, t_exact, t_ww),
        })
    return results


def print_fit_table(res: list[dict[str, Any]]) -> None:
    rows = []
    for r in res:
        t_fast, t_exact, t_ww = r["_timings"]
        target = f"<= {TARGET_FIT_MS:g} ms: {verdict(t_fast.median * 1e3 <= TARGET_FIT_MS)}" \
            if r["n"] == FIT_TARGET_N else ""
        rows.append([str(r["n"]), t_fast.ms(), t_exact.ms(), t_ww.ms(), f"{t_ww.median / t_fast.median:.0f}x",
                     f"{r['alpha_fast']:.4f}", f"{r['alpha_exact']:.4f}", f"{r['abs_alpha_fast_minus_exact']:.1e}",
                     f"{r['alpha_wwfit']:.4f}", target])
    print_table("Table 5. Power-law fit alone (ESD: pooled Student-t(2.5) slices (2m x m), eigenvalues of W^T W / N)",
                ["n", "fast ms", "exact ms", "WWFit ms", "WWFit/fast", "alpha fast", "alpha exact",
                 "|fast-exact|", "alpha WWFit", "target"], rows,
                ["times in ms: median (min-max); ours is two-sided KS with tails >= 10, WWFit one-sided KS with "
                 "tails >= 2, so alpha WWFit may differ from ours"])


# --------------------------------------------------------------------------------------------------- main


def cpu_pressure() -> str:
    """Linux PSI line 'some avg10=.. avg60=.. avg300=..': share of time runnable tasks waited for a CPU."""
    with contextlib.suppress(OSError), open("/proc/pressure/cpu") as f:
        return " ".join(f.readline().split()[1:4])
    return "n/a"


def environment() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    blas = [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "filepath")} for d in threadpool_info()]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "cpu_pressure_start": cpu_pressure(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "weightwatcher": getattr(weightwatcher, "__version__", "?"),
        "lightning_htsr": lightning_htsr.__version__,
        "torch_threads": torch.get_num_threads(),
        "threadpools": blas,
    }


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed repeats instead of >= 5")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5)")
    parser.add_argument("--json", metavar="PATH", help="write every figure (all runs) to this JSON file")
    parser.add_argument("--profile", action="store_true", help="cProfile ours on each model (5 calls, top 25)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["models", "routes", "fit"],
                        help="sections to leave out")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    extend = not args.quick

    env = environment()
    print(f"lightning_htsr {env['lightning_htsr']} benchmark, {env['date']}")
    print(f"CPU: {env['cpu']} ({env['cpu_count']} logical cores), load average at start "
          f"{' '.join(f'{x:.2f}' for x in env['loadavg_start'])}, CPU pressure {env['cpu_pressure_start']}")
    print(f"python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, scipy {env['scipy']}, "
          f"weightwatcher {env['weightwatcher']}; torch threads {env['torch_threads']}, BLAS pools: "
          + ", ".join(f"{d['internal_api']} {d['version']} x{d['num_threads']}" for d in env["threadpools"]))
    print(f"timed repeats per measurement: {repeats}" + (" (more, up to 25 / ~1 s, for fast cases)" if extend else "")
          + ", after one warm-up call; the timings of one table row are interleaved round-robin")

    report: dict[str, Any] = {"environment": env, "repeats": repeats, "targets": {
        "ours_over_floor_max": TARGET_FLOOR, "ww_over_ours_min": TARGET_WW, "ww_mp_over_ours_min": TARGET_WW_MP,
        "fit_fast_ms_max_at_8192": TARGET_FIT_MS}}
    t_start = time.perf_counter()
    verdicts: list[tuple[str, bool]] = []
    if "models" not in args.skip:
        models = bench_models(repeats, extend, args.profile)
        print_model_tables(models)
        report["models"] = models
        for name, r in models.items():
            verdicts.append((f"{name}: ours/floor {r['ratio_ours_over_floor']:.2f}x <= {TARGET_FLOOR:g}x",
                             r["ratio_ours_over_floor"] <= TARGET_FLOOR))
            verdicts.append((f"{name}: ww/ours {r['ratio_ww_over_ours']:.2f}x >= {TARGET_WW:g}x",
                             r["ratio_ww_over_ours"] >= TARGET_WW))
            verdicts.append((f"{name}: ww_mp/ours {r['ratio_ww_mp_over_ours']:.1f}x >= {TARGET_WW_MP:g}x",
                             r["ratio_ww_mp_over_ours"] >= TARGET_WW_MP))
    if "routes" not in args.skip:
        routes = bench_routes(repeats, extend)
        print_route_table(routes)
        report["routes"] = routes
    if "fit" not in args.skip:
        fits = bench_fit(repeats, extend)
        print_fit_table(fits)
        report["fit"] = fits
        for r in fits:
            if r["n"] == FIT_TARGET_N:
                ms = r["fast"]["median_s"] * 1e3
                verdicts.append((f"fit fast at n={FIT_TARGET_N}: {ms:.1f} ms <= {TARGET_FIT_MS:g} ms",
                                 ms <= TARGET_FIT_MS))
    if verdicts:
        print()
        print("Targets")
        for text, ok in verdicts:
            print(f"  {verdict(ok):6s}  {text}")
    env["loadavg_end"] = list(os.getloadavg())
    env["cpu_pressure_end"] = cpu_pressure()
    elapsed = time.perf_counter() - t_start
    report["elapsed_s"] = elapsed
    report["all_targets_met"] = all(ok for _, ok in verdicts)
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in env['loadavg_end'])}, CPU pressure "
          f"{env['cpu_pressure_end']}; total {elapsed:.0f} s")
    if args.profile and "models" in report:
        for name, r in report["models"].items():
            print(f"\ncProfile of ours on {name} (5 calls, sorted by tottime):")
            print(r["profile"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_strip(report), f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
