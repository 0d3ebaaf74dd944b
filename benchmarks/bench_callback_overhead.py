"""What does ``HTSRCallback`` cost a training run?

Trains the small causal transformer LM of ``examples/transformer_lm.py`` (synthetic Markov-chain tokens) twice per
repeat, same seed, same data, same ``TensorBoardLogger`` setup: once without the callback and once with
``HTSRCallback()`` at its defaults (an analysis before training and after every epoch; TensorBoard scalars,
histograms, phase map, ESD figures every 5th analysis, history and spectra files). Both runs use Lightning's
``SimpleProfiler``, which times every callback hook; the callback also times its own computation as the profiler
section ``[HTSR]htsr.analyze``.

Printed:

* the fit-time ratio with/without (wall and process CPU time; median over repeats, runs interleaved);
* the callback's hook time from the profiler (``[Callback]HTSRCallback{'prefix': 'htsr'}.<hook>`` summed over
  hooks) and, inside it, the analysis proper (``[HTSR]htsr.analyze``); the rest is logging (TensorBoard views,
  history and spectra files);
* the cost of one analysis in seconds (wall from the profiler, process CPU time from a pair of timing callbacks
  around ``HTSRCallback``), split into analyses that draw the ESD figures and the others, so the overhead for
  another epoch length is ``cost / epoch seconds``; and the shortest epoch for which that stays <= 2 %;
* the CPU time of the figure worker (the child process that draws the TensorBoard figures), and the overhead at
  10-second epochs (``--reference-epoch``) with and without it.

The verdict uses the profiler's hook time: at realistic epoch lengths the callback costs a few per cent, less than
the run-to-run noise of the fit time itself on a shared machine, so the fit-time ratio is printed as a cross-check.

    python benchmarks/bench_callback_overhead.py                 # 3 repeats x 2 runs of 4 x 600 steps: ~25 min
    python benchmarks/bench_callback_overhead.py --quick         # 1 repeat of a short run (smoke test)
    python benchmarks/bench_callback_overhead.py --callback-kwargs '{"log_figures_every": 0}'   # other settings
    python benchmarks/bench_callback_overhead.py --json out.json  # keep every run; --from-json out.json reprints

One BLAS thread everywhere (set before torch and numpy are imported).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.profilers import SimpleProfiler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from transformer_lm import build_model, make_dataloaders, quiet_lightning  # noqa: E402

from lightning_htsr import HTSRCallback  # noqa: E402
from lightning_htsr.training.sinks.figures import stop_figure_worker  # noqa: E402

HOOK_PREFIX = "[Callback]HTSRCallback{'prefix': 'htsr'}."
ANALYZE = "[HTSR]htsr.analyze"


def load() -> str:
    parts = []
    try:
        parts.append("load avg " + " / ".join(open("/proc/loadavg").read().split()[:3]))
    except OSError:
        pass
    try:
        some = open("/proc/pressure/cpu").readline().split()
        parts.append("CPU pressure (some, avg60) " + some[2].split("=")[1] + " %")
    except (OSError, IndexError):
        pass
    return ", ".join(parts)


class CpuClock:
    """Process CPU time of the callbacks placed between ``clock.start`` and ``clock.stop`` in the callback list, per
    ``on_train_start`` / ``on_train_epoch_end`` call (Lightning runs the hooks of the listed callbacks in order).
    The profiler measures wall time, which on a shared machine includes waiting for a core; this does not."""

    def __init__(self) -> None:
        self.each: list[float] = []
        self._t0 = 0.0
        clock = self

        class Start(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                clock._t0 = time.process_time()

            def on_train_epoch_end(self, trainer, pl_module):
                clock._t0 = time.process_time()

        class Stop(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                clock.each.append(time.process_time() - clock._t0)

            def on_train_epoch_end(self, trainer, pl_module):
                clock.each.append(time.process_time() - clock._t0)

        self.start, self.stop = Start(), Stop()


def _children_cpu() -> float:
    """CPU seconds of this process' finished children: the figure worker's, once ``fit`` has closed it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(with_callback: bool, args: argparse.Namespace, workdir: str, tag: str) -> dict:
    """One seeded training run; returns wall/CPU fit time and the profiler's HT-SR figures."""
    batch = args.batch_size
    train_dl, val_dl, _ = make_dataloaders(seq_len=args.seq_len, num_train=args.steps_per_epoch * batch,
                                           num_val=args.val_batches * batch, batch_size=batch, seed=args.seed)
    model = build_model(d_model=args.d_model, nhead=4, num_layers=args.layers, dim_feedforward=4 * args.d_model,
                        seed=args.seed, max_len=args.seq_len)
    profiler = SimpleProfiler(dirpath=workdir, filename=f"profile-{tag}")
    callback = HTSRCallback(**args.callback_kwargs) if with_callback else None
    clock = CpuClock()  # in both arms, so both pay for it
    callbacks = [clock.start, callback, clock.stop] if callback else [clock.start, clock.stop]
    logger = TensorBoardLogger(workdir, name=tag)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger,
                         callbacks=callbacks, profiler=profiler, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=50,
                         num_sanity_val_steps=0)
    pl.seed_everything(args.seed, verbose=False)
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    trainer.fit(model, train_dl, val_dl)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stop_figure_worker()  # the figure child outlives fit (one per process): reap it so its CPU time is counted
    children = _children_cpu() - children
    durations = profiler.recorded_durations
    hooks = {k[len(HOOK_PREFIX):]: sum(v) for k, v in durations.items() if k.startswith(HOOK_PREFIX)}
    # one entry per analysis, in order: the baseline (on_train_start), then one per epoch (on_train_epoch_end)
    per_analysis = list(durations.get(HOOK_PREFIX + "on_train_start", [])) + \
        list(durations.get(HOOK_PREFIX + "on_train_epoch_end", []))
    steps = durations.get("run_training_batch", [])
    return {
        "callback": with_callback,
        "wall_s": wall,
        "cpu_s": cpu,
        "children_cpu_s": children,
        "steps": int(trainer.global_step),
        "step_s_median": statistics.median(steps) if steps else float("nan"),
        "hook_s": sum(hooks.values()),
        "hooks": hooks,
        "analyze_s": sum(durations.get(ANALYZE, [])),
        "analyze_each_s": list(durations.get(ANALYZE, [])),
        "hook_each_s": per_analysis if with_callback else [],
        "hook_each_cpu_s": clock.each if with_callback else [],
        "analyses": callback.analysis_count if callback else 0,
        "matrices": len(callback.latest_records) if callback else 0,
        "val_loss": float(trainer.callback_metrics.get("val_loss", float("nan"))),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps-per-epoch", type=int, default=600)
    p.add_argument("--epochs", type=int, default=4, help="4: analyses 0-4, one of five draws figures, as in a "
                   "long run")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.02, help="overhead target (fraction)")
    p.add_argument("--reference-epoch", type=float, default=10.0, help="epoch length (s) the overhead is stated at")
    p.add_argument("--callback-kwargs", type=json.loads, default={},
                   help='HTSRCallback arguments as JSON, e.g. \'{"log_figures_every": 0}\' (default: none)')
    p.add_argument("--json", help="write every run's figures here")
    p.add_argument("--from-json", help="print the report of a run saved with --json, without training")
    p.add_argument("--quick", action="store_true", help="1 repeat, 10 steps x 2 epochs")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        saved_args = argparse.Namespace(**{**saved["args"], "json": None, "from_json": args.from_json})
        print(f"Runs from {args.from_json} ({saved_args.steps_per_epoch} steps x {saved_args.epochs} epochs, "
              f"{saved_args.repeats} repeats; load {saved.get('load_start', '?')} at the start, "
              f"{saved.get('load_end', '?')} at the end)")
        return report(saved["runs"], saved_args)
    if args.quick:
        args.steps_per_epoch, args.epochs, args.repeats, args.val_batches = 10, 2, 1, 2
    torch.set_num_threads(1)
    try:  # numpy/scipy's own BLAS pools too (the env vars above already cover fresh processes)
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    quiet_lightning()

    print(f"HTSRCallback({', '.join(f'{k}={v!r}' for k, v in args.callback_kwargs.items())}); "
          f"Model: TinyTransformerLM d_model={args.d_model}, {args.layers} layers, vocab 32, seq {args.seq_len}, "
          f"batch {args.batch_size}; {args.steps_per_epoch} steps + {args.val_batches} val batches per epoch, "
          f"{args.epochs} epochs, {args.repeats} repeats; torch {torch.__version__}, 1 thread", flush=True)
    load_start = load()
    print(f"Start: {load_start}", flush=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        # untimed warm-up of both code paths (imports, matplotlib, first-call allocations)
        warm = argparse.Namespace(**{**vars(args), "steps_per_epoch": 5, "epochs": 1, "val_batches": 1})
        run_once(True, warm, workdir, "warmup")
        for r in range(args.repeats):
            order = (False, True) if r % 2 == 0 else (True, False)  # interleave: load drifts hit both sides
            for with_cb in order:
                res = run_once(with_cb, args, workdir, f"r{r}-{'with' if with_cb else 'without'}")
                res["repeat"] = r
                runs.append(res)
                print(f"  repeat {r} {'with   ' if with_cb else 'without'}: fit {res['wall_s']:6.1f} s wall, "
                      f"{res['cpu_s']:6.1f} s CPU; HT-SR hooks {res['hook_s']:.2f} s "
                      f"({res['analyses']} analyses)", flush=True)
    load_end = load()
    print(f"End:   {load_end}")
    summary = report(runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "load_start": load_start, "load_end": load_end}, indent=1))
    return summary


def report(runs: list[dict], args: argparse.Namespace) -> dict:
    """Print the tables and the verdict; returns every figure."""
    with_runs = [r for r in runs if r["callback"]]
    without = [r for r in runs if not r["callback"]]
    pair = {r["repeat"]: {} for r in runs}
    for r in runs:
        pair[r["repeat"]]["with" if r["callback"] else "without"] = r
    ratio_wall = [p["with"]["wall_s"] / p["without"]["wall_s"] for p in pair.values()]
    ratio_cpu = [p["with"]["cpu_s"] / p["without"]["cpu_s"] for p in pair.values()]
    med = statistics.median

    def m(values: list[float]) -> float:
        return med(values) if values else float("nan")

    wall_without, wall_with = med(r["wall_s"] for r in without), med(r["wall_s"] for r in with_runs)
    epoch_s = wall_without / args.epochs
    analyses = with_runs[0]["analyses"]
    hook_total = med(r["hook_s"] for r in with_runs)
    analyze_total = med(r["analyze_s"] for r in with_runs)
    per_analysis = hook_total / analyses
    per_compute = analyze_total / analyses
    each = [t for r in with_runs for t in r["analyze_each_s"]]
    every = HTSRCallback(**args.callback_kwargs).tensorboard.log_figures_every or 0  # figures at 0, every, ...

    def split(key: str) -> tuple[list[float], list[float], float]:
        """Per-analysis hook times: those that drew ESD figures, the others, and the long-run mean."""
        fig = [t for r in with_runs for i, t in enumerate(r[key]) if every and i % every == 0]
        rest = [t for r in with_runs for i, t in enumerate(r[key]) if not (every and i % every == 0)]
        if not fig or not rest:
            return fig, rest, med(fig or rest)
        return fig, rest, (med(fig) + (every - 1) * med(rest)) / every

    with_figures, without_figures, steady = split("hook_each_s")
    cpu_fig, cpu_nofig, steady_cpu = split("hook_each_cpu_s")
    epoch_cpu = med(r["cpu_s"] for r in without) / args.epochs
    hook_share = med(r["hook_s"] / (r["wall_s"] - r["hook_s"]) for r in with_runs)
    hooks = {k: med(r["hooks"].get(k, 0.0) for r in with_runs) for k in with_runs[0]["hooks"]}

    print()
    print(f"Epoch length: {args.steps_per_epoch} training steps ({med(r['step_s_median'] for r in without) * 1e3:.0f} "
          f"ms median per step) = {epoch_s:.1f} s per epoch without the callback (incl. validation)")
    print(f"Matrices analyzed: {with_runs[0]['matrices']}; analyses per run: {analyses} "
          f"(1 before training + 1 per epoch)")
    print()
    print("fit time                         without      with     ratio (median of paired repeats)")
    print(f"  wall  [s]                     {wall_without:8.1f}  {wall_with:8.1f}    {med(ratio_wall):.3f}  "
          f"(repeats: {', '.join(f'{x:.3f}' for x in ratio_wall)})")
    print(f"  CPU   [s]                     {med(r['cpu_s'] for r in without):8.1f}  "
          f"{med(r['cpu_s'] for r in with_runs):8.1f}    {med(ratio_cpu):.3f}  "
          f"(repeats: {', '.join(f'{x:.3f}' for x in ratio_cpu)})")
    print()
    print("SimpleProfiler, per run (median over repeats):")
    for k, v in sorted(hooks.items(), key=lambda kv: -kv[1]):
        if v >= 1e-4:
            print(f"  {HOOK_PREFIX}{k:<22} {v:7.3f} s")
    print(f"  {'= all HTSRCallback hooks':<61} {hook_total:7.3f} s  = {hook_share:.1%} of the rest of the fit")
    print(f"  {ANALYZE + ' (inside the hooks)':<61} {analyze_total:7.3f} s")
    print()
    print(f"Per analysis: {per_analysis:.3f} s in the hooks, of which {per_compute:.3f} s computing the spectra and "
          f"fits (analyze sections: median {med(each):.3f} s, min {min(each):.3f}, max {max(each):.3f}) and "
          f"{per_analysis - per_compute:.3f} s logging (TensorBoard views, history, spectra file).")
    if every:
        print(f"Hook time of one analysis: {m(with_figures):.3f} s when it draws the ESD figures (analysis 0 and "
              f"every {every}th; {len(with_figures)} measured), {m(without_figures):.3f} s otherwise "
              f"({len(without_figures)} measured): {steady:.3f} s on average over a long run.")
        print(f"Same in process CPU time: {m(cpu_fig):.3f} s with figures, {m(cpu_nofig):.3f} s otherwise: "
              f"{steady_cpu:.3f} s on average (epoch: {epoch_cpu:.1f} s CPU).")
    else:
        print(f"Hook time of one analysis (no ESD figures): {steady:.3f} s wall, {steady_cpu:.3f} s CPU "
              f"(epoch: {epoch_cpu:.1f} s CPU).")
    min_epoch = steady / args.target
    print(f"Overhead of analyzing every epoch of T seconds ~ {steady:.3f} s / T: <= {args.target:.0%} for epochs >= "
          f"{min_epoch:.0f} s wall ({steady_cpu / args.target:.0f} s of CPU time); this run: {per_analysis:.3f} s "
          f"per analysis / {epoch_s:.1f} s per epoch = {per_analysis / epoch_s:.1%}.")
    worker = med(r.get("children_cpu_s", 0.0) for r in with_runs) / analyses
    ref = getattr(args, "reference_epoch", 10.0)
    print(f"Figure worker (child process) CPU: {worker:.3f} s per analysis, off the training process; training "
          f"process + worker: {steady_cpu + worker:.3f} s CPU per analysis.")
    print(f"At {ref:.0f} s epochs: {steady:.3f} s / {ref:.0f} s = {steady / ref:.1%} of the fit (wall, hook time); "
          f"{steady_cpu / ref:.1%} in training-process CPU; {(steady_cpu + worker) / ref:.1%} counting the worker's "
          f"CPU too (what it costs when no core is free for the worker).")
    walls = [r["wall_s"] for r in without]
    noise = (max(walls) - min(walls)) / med(walls) if len(walls) > 1 else float("nan")
    long_run = steady / epoch_s
    verdict = "MET" if max(hook_share, long_run) <= args.target else "MISSED"
    print(f"Verdict at {args.steps_per_epoch} steps ({epoch_s:.0f} s) per epoch: the callback's hooks take "
          f"{hook_share:.1%} of the rest of the fit in these {args.epochs}-epoch runs and {long_run:.1%} of an epoch "
          f"on average over a long run: target <= {args.target:.0%} {verdict}.")
    spread = f"the runs without the callback alone differ by {noise:.1%} from one another" if len(walls) > 1 else \
        "one repeat: no estimate of its noise"
    print(f"(The fit-time ratio, {med(ratio_wall) - 1:+.1%} wall / {med(ratio_cpu) - 1:+.1%} CPU, is a cross-check "
          f"only: {spread}.)")
    return {"args": vars(args), "runs": runs, "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu,
               "epoch_s": epoch_s, "per_analysis_s": per_analysis, "per_analysis_compute_s": per_compute,
               "hook_with_figures_s": m(with_figures), "steady_per_analysis_s": steady,
               "steady_per_analysis_cpu_s": steady_cpu, "epoch_cpu_s": epoch_cpu,
               "hook_share": hook_share, "long_run_share": long_run, "fit_time_noise": noise, "verdict": verdict,
               "worker_cpu_per_analysis_s": worker, "share_at_reference_epoch": steady / ref}


if __name__ == "__main__":
    main()
