"""Analyze a generated Llama-style sharded bf16 checkpoint the way a user would, and measure it.

Run from the repository root::

    python benchmarks/bench_checkpoint.py                       # Llama-2-7B shapes: 32 layers (~13 GB on disk)
    python benchmarks/bench_checkpoint.py --layers 2            # 2 decoder layers of the 7B shapes (+ embeddings)
    python benchmarks/bench_checkpoint.py --layers 2 --nproc 2  # the same under torchrun, 2 CPU processes
    python benchmarks/bench_checkpoint.py --layers 2 --ww-layers 1 --json out.json

What it does:

1. Generates the checkpoint in ``--dir`` (default: a temporary directory, removed afterwards unless ``--keep``):
   Hugging Face Llama names (``model.embed_tokens``, ``model.layers.<i>.self_attn.{q,k,v,o}_proj``,
   ``model.layers.<i>.mlp.{gate,up,down}_proj``, norms, ``lm_head``), bf16, ``--shard-gb`` GB safetensors shards
   plus ``model.safetensors.index.json``. Entries are Gaussian (std 0.02), except ``o_proj`` and ``down_proj``,
   which are Student-t with 2.5 degrees of freedom (heavy-tailed ESDs, alpha about 4). One shard is in memory at a time.
2. Runs ``python -m lightning_htsr analyze DIR --csv ... --no-progress`` (or ``torchrun --nproc-per-node N -m
   lightning_htsr analyze DIR``) as a child process and reports its wall time, its peak RSS (``VmHWM`` of every
   analyzing process, read at exit; the sum over processes for torchrun) and matrices per second.
3. With ``--ww-layers K`` (default 1): the first K decoder layers as ``nn.Linear`` modules in float32, analyzed by
   weightwatcher 0.7.7 (``WeightWatcher(model=m).analyze()``, defaults) and by ``lightning_htsr.analyze(m)``, both
   in this process on one thread; prints seconds per decoder layer for each and the ratio.

Targets (printed with MET / MISSED): the 7B shapes in <= 15 min with peak RSS <= 2.5 GB; >= 3.5x weightwatcher per
decoder layer.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lightning_htsr, also uninstalled

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

HEAVY = ("o_proj", "down_proj")
TARGET_SECONDS, TARGET_RSS_GB, TARGET_WW_RATIO = 15 * 60, 2.5, 3.5

#: Run inside each analyzing process: the CLI, then this process's peak RSS into $HTSR_BENCH_RSS_DIR/<rank>.
_CHILD = """
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    with open(os.path.join(os.environ["HTSR_BENCH_RSS_DIR"], os.environ.get("RANK", "0")), "w") as f:
        f.write(str(kib))
atexit.register(_peak)
sys.argv = ["lightning-htsr"] + sys.argv[1:]
runpy.run_module("lightning_htsr", run_name="__main__")
"""


def layer_shapes(hidden: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """One decoder layer's tensors (Hugging Face Llama names, without the ``model.layers.<i>.`` prefix)."""
    shapes: dict[str, tuple[int, ...]] = {f"self_attn.{p}.weight": (hidden, hidden)
                                          for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes.update({"mlp.gate_proj.weight": (mlp, hidden), "mlp.up_proj.weight": (mlp, hidden),
                   "mlp.down_proj.weight": (hidden, mlp), "input_layernorm.weight": (hidden,),
                   "post_attention_layernorm.weight": (hidden,)})
    return shapes


def all_shapes(layers: int, hidden: int, mlp: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in file order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in layer_shapes(hidden, mlp).items()})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def make_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """bf16 weights: ones for norms, Student-t(2.5) for o_proj/down_proj, Gaussian otherwise (scale 0.02)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    if any(h in name for h in HEAVY):
        return torch.distributions.StudentT(2.5, scale=0.02).sample(shape).to(torch.bfloat16)
    return torch.randn(shape).mul_(0.02).to(torch.bfloat16)


def write_checkpoint(directory: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: int, seed: int = 0) -> int:
    """Write the shards and the index; returns the total bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.tensor(shape).prod())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        part = {n: make_tensor(n, shapes[n]) for n in names}
        total += sum(t.numel() * 2 for t in part.values())
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def run_analysis(directory: Path, nproc: int, threads: int | None, csv: Path) -> dict[str, Any]:
    """The CLI as a child process (or torchrun); wall time and peak RSS of the analyzing processes."""
    rss_dir = Path(tempfile.mkdtemp(prefix="htsr_rss_"))
    args = ["analyze", str(directory), "--csv", str(csv), "--no-progress", "--quiet"]
    if threads is not None:
        args += ["--threads", str(threads)]
    child = Path(rss_dir) / "child.py"
    child.write_text(_CHILD)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(nproc)]
    env = {**os.environ, "HTSR_BENCH_RSS_DIR": str(rss_dir),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = subprocess.run([*launcher, str(child), *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"analysis failed ({result.returncode}):\n{result.stderr[-3000:]}")
    peaks = [int(p.read_text()) / 2**20 for p in rss_dir.iterdir() if p.name != "child.py"]
    shutil.rmtree(rss_dir, ignore_errors=True)
    return {"wall_s": wall, "peak_rss_gb_per_process": peaks, "peak_rss_gb": sum(peaks),
            "summary": result.stdout.strip().splitlines()[-1]}


def decoder_layers(directory: Path, count: int) -> nn.Module:
    """The first ``count`` decoder layers as float32 ``nn.Linear`` modules, read from the checkpoint."""
    from lightning_htsr.weights.checkpoints import open_checkpoint

    model = nn.Module()
    wanted = tuple(f"model.layers.{i}." for i in range(count))
    for name, tensor in open_checkpoint(directory).tensors(lambda info: info.name.startswith(wanted)
                                                           and len(info.shape) == 2):
        parts = name.removesuffix(".weight").split(".")
        linear = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False)
        linear.weight.data = tensor.float()
        module = model
        for part in parts[:-1]:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.add_module(parts[-1], linear)
    return model


def compare_weightwatcher(directory: Path, count: int) -> dict[str, Any]:
    """Seconds per decoder layer: weightwatcher 0.7.7 defaults vs ours, one thread, same matrices."""
    import weightwatcher

    import lightning_htsr as htsr

    torch.set_num_threads(1)
    model = decoder_layers(directory, count)
    start = time.perf_counter()
    ours = htsr.analyze(model)
    ours_s = time.perf_counter() - start
    logging.disable(logging.CRITICAL)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        theirs = weightwatcher.WeightWatcher(model=model).analyze()
        ww_s = time.perf_counter() - start
    logging.disable(logging.NOTSET)
    assert sorted(ours["name"]) == sorted(theirs["longname"]), (list(ours["name"]), list(theirs["longname"]))
    return {"layers": count, "matrices": len(ours), "ours_s_per_layer": ours_s / count,
            "ww_s_per_layer": ww_s / count, "ratio": ww_s / ours_s}


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def report(config: dict[str, Any], analysis: dict[str, Any], matrices: int, ww: dict[str, Any] | None) -> None:
    """Print the figures (and targets, for the full 7B shapes)."""
    full = config["layers"] == 32 and config["hidden"] == 4096 and config["mlp"] == 11008
    print(f"checkpoint: {config['layers']} layers, hidden {config['hidden']}, MLP {config['mlp']}, vocab "
          f"{config['vocab']}: {config['gb']:.2f} GB bf16 in {config['shards']} shards, {matrices} matrices")
    print(f"analysis ({config['nproc']} process(es), threads {config['threads'] or 'default'}): "
          f"{analysis['wall_s']:.1f} s, {matrices / analysis['wall_s']:.3f} matrices/s, peak RSS "
          f"{analysis['peak_rss_gb']:.2f} GB (per process: "
          f"{', '.join(f'{g:.2f}' for g in analysis['peak_rss_gb_per_process'])})"
          + (f"  [<= 15 min: {verdict(analysis['wall_s'] <= TARGET_SECONDS)}, <= 2.5 GB: "
             f"{verdict(analysis['peak_rss_gb'] <= TARGET_RSS_GB)}]" if full else ""))
    print(f"  {analysis['summary']}")
    if ww is not None:
        print(f"per decoder layer ({ww['layers']} layer(s), {ww['matrices']} matrices, 1 thread): weightwatcher "
              f"{ww['ww_s_per_layer']:.1f} s, ours {ww['ours_s_per_layer']:.1f} s, ratio {ww['ratio']:.2f}x  "
              f"[>= 3.5x: {verdict(ww['ratio'] >= TARGET_WW_RATIO)}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GB (default 2)")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--reuse", action="store_true", help="use the checkpoint already in --dir")
    parser.add_argument("--nproc", type=int, default=1, help="analyzing processes (torchrun when > 1)")
    parser.add_argument("--threads", type=int, default=None, help="--threads of the CLI (default: its default)")
    parser.add_argument("--ww-layers", type=int, default=1, help="decoder layers compared with weightwatcher (0: none)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="htsr_ckpt_"))
    shapes = all_shapes(args.layers, args.hidden, args.mlp, args.vocab)
    try:
        start = time.perf_counter()
        total = sum(2 * int(torch.tensor(s).prod()) for s in shapes.values()) if args.reuse else \
            write_checkpoint(directory, shapes, int(args.shard_gb * 1e9))
        print(f"generated in {time.perf_counter() - start:.0f} s: {directory}", file=sys.stderr, flush=True)
        shards = len(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()))
        analysis = run_analysis(directory, args.nproc, args.threads, directory.parent / f"{directory.name}.csv")
        ww = compare_weightwatcher(directory, min(args.ww_layers, args.layers)) if args.ww_layers > 0 else None
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    config = {**{k: getattr(args, k) for k in ("layers", "hidden", "mlp", "vocab", "nproc", "threads")},
              "gb": total / 1e9, "shards": shards}
    matrices = sum(len(s) == 2 for s in shapes.values())
    report(config, analysis, matrices, ww)
    if args.json:
        args.json.write_text(json.dumps({"config": config, "matrices": matrices, "analysis": analysis,
                                         "weightwatcher": ww}, indent=1))


if __name__ == "__main__":
    main()
