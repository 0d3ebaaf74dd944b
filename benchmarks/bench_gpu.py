"""Seconds per model on a GPU: Llama-2-7B shapes generated on the device, torch vs CuPy, batched vs one by one.

Run on a machine with CUDA (``scripts/gpu_check.sh`` does, within its time budget)::

    python benchmarks/bench_gpu.py --json gpu_bench.json
    python benchmarks/bench_gpu.py --device cpu --layers 1 --hidden 256 --mlp 688   # smoke test without a GPU

The model is 32 decoder layers x 7 matrices = 224 matrices (``q,k,v,o``: hidden x hidden, ``gate, up``: MLP x hidden,
``down``: hidden x MLP; no embeddings), bf16, generated directly on the device (Gaussian, Student-t(2.5) for
``o_proj``/``down_proj``). Each configuration analyzes all of them with
:func:`lightning_htsr.analysis.analyze_stream` (fits, metrics and phases included) after one warm-up matrix:

* ``batched``: batches of up to ``--batch-gb`` GB of float32 weights (equal-size Gram matrices share one
  ``eigvalsh`` call);
* ``one by one``: ``batch_bytes=1``, one matrix per call.

for ``backend="torch"`` and, when CuPy is installed, ``backend="cupy"``. Device time is synchronized before each
clock read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lightning_htsr

import torch  # noqa: E402

from lightning_htsr.analysis import AnalysisOptions, analyze_stream  # noqa: E402
from lightning_htsr.weights.matrix import WeightMatrix  # noqa: E402

HEAVY = ("o_proj", "down_proj")


def generate(layers: int, hidden: int, mlp: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """The decoder layers' matrices, bf16, on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden),
              "down_proj": (hidden, mlp)}
    weights = {}
    for i in range(layers):
        for name, shape in shapes.items():
            w = torch.randn(shape, generator=gen, device=device)
            if name in HEAVY:  # Student-t(2.5) = N / sqrt(Gamma(1.25, 1.25))
                gamma = torch._standard_gamma(torch.full(shape, 1.25, device=device)) / 1.25
                w = w / gamma.sqrt()
            weights[f"model.layers.{i}.{name}"] = (0.02 * w).to(torch.bfloat16)
    return weights


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(weights: dict[str, torch.Tensor], backend: str, batch_bytes: int, device: torch.device) -> dict[str, Any]:
    """Analyze every matrix once; seconds, phases."""
    options = AnalysisOptions(backend=backend)  # type: ignore[arg-type]
    warm = next(iter(weights.values()))
    list(analyze_stream([WeightMatrix.from_tensor("warm", warm)], options))
    _sync(device)
    start = time.perf_counter()
    records = [r.record for r in analyze_stream((WeightMatrix.from_tensor(k, w, "linear") for k, w in weights.items()),
                                                options, batch_bytes=batch_bytes)]
    _sync(device)
    seconds = time.perf_counter() - start
    phases: dict[str, int] = {}
    for r in records:
        phases[str(r["phase"])] = phases.get(str(r["phase"]), 0) + 1
    return {"seconds": seconds, "matrices": len(records), "phases": phases,
            "float64": sum(r["precision"] == "float64" for r in records)}


def run(layers: int, hidden: int, mlp: int, device: torch.device, batch_gb: float) -> list[dict[str, Any]]:
    """Every configuration available here."""
    weights = generate(layers, hidden, mlp, device)
    backends = ["torch"]
    if device.type == "cuda":
        try:
            import cupy  # noqa: F401

            backends.append("cupy")
        except ImportError:
            print("CuPy not installed: torch backend only", file=sys.stderr)
    results = []
    for backend in backends:
        for mode, batch_bytes in (("batched", int(batch_gb * 2**30)), ("one by one", 1)):
            result = time_model(weights, backend, batch_bytes, device)
            results.append({"backend": backend, "mode": mode, **result})
            print(f"{backend:5s} {mode:10s} {result['seconds']:8.2f} s per model ({result['matrices']} matrices, "
                  f"{result['float64']} redone in float64) phases {result['phases']}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--batch-gb", type=float, default=2.0, help="float32 GB per batched call (default 2)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device (use --device cpu for a smoke test)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = run(args.layers, args.hidden, args.mlp, device, args.batch_gb)
    summary = {"device": name, "torch": torch.__version__, "layers": args.layers, "hidden": args.hidden,
               "mlp": args.mlp, "results": results}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
