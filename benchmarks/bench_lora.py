"""What does ``HTSRCallback`` cost a LoRA fine-tune, against a full fine-tune of the same model?

A ``transformers`` Llama built from a config (hidden 256, 4 layers, 4 heads, 2 KV heads, MLP 688, vocab 512; no
download) learns synthetic token sequences (a fixed random Markov chain), in three arms per repeat, same seed and
data, in this process, interleaved:

* ``full``: every weight trained (AdamW), ``HTSRCallback()``;
* ``lora``: peft LoRA ``r=8`` on ``q_proj``/``v_proj``, everything else frozen, ``HTSRCallback()`` (frozen matrices
  analyzed once, then reused while unchanged);
* ``lora-noreuse``: the same LoRA run with ``HTSRCallback(reuse_unchanged=False)``: what reuse saves.

The callback runs at its defaults otherwise, except that TensorBoard figures and histograms are off (their cost is
``bench_callback_overhead.py``'s subject; here they would hide the analysis). Lightning's ``SimpleProfiler`` times
the callback's hooks (the analyses: ``on_train_start`` and ``on_train_epoch_end``) and the training batches.

Printed per arm (medians over repeats): the hook time of the first analysis (the baseline) and of the later ones
(median), wall and process CPU time (the verdict reads CPU time: on a shared machine wall time includes waiting for
a core), the analysis proper (``[HTSR]htsr.analyze``), the matrices reused per later analysis, the training time per
epoch, and the callback's share of the fit's wall time; then a verdict.

    python benchmarks/bench_lora.py             # 5 repeats x 3 arms x 4 epochs of 20 steps: ~8 min on 2 cores
    python benchmarks/bench_lora.py --quick     # 1 repeat, 2 epochs of 5 steps (smoke test)

One BLAS thread everywhere (set before torch and numpy are imported).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.profilers import SimpleProfiler  # noqa: E402

from lightning_htsr import HTSRCallback  # noqa: E402

HOOK = "[Callback]HTSRCallback{'prefix': 'htsr'}."
ANALYZE = "[HTSR]htsr.analyze"
ARMS = ("full", "lora", "lora-noreuse")


def load() -> str:
    """The load average (1/5/15 min): other jobs on the machine share its cores."""
    try:
        return " / ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


class FineTune(pl.LightningModule):
    """A causal LM step on a ``transformers`` model (all its trainable parameters optimized)."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def build(arm: str, seed: int) -> FineTune:
    """The same initial Llama for every arm; LoRA arms wrap it with peft."""
    import peft
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    model = transformers.LlamaForCausalLM(config)
    if arm == "full":
        return FineTune(model, lr=1e-3)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    return FineTune(lora, lr=1e-2)


def markov_tokens(n: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """``n`` sequences of a fixed random Markov chain (each token has 4 likely successors)."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=gen)
    out = torch.empty(n, seq_len, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(1, seq_len):
        out[:, t] = successors[out[:, t - 1], torch.randint(0, 4, (n,), generator=gen)]
    return out


def run_once(arm: str, args: argparse.Namespace, workdir: str) -> dict:
    """One seeded fine-tune; the profiler's hook and batch times."""
    tokens = markov_tokens(args.steps * args.batch_size, args.seq_len, 512, args.seed)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=args.batch_size)
    module = build(arm, args.seed)
    callback = HTSRCallback(log_figures_every=None, log_histograms=False, print_summary=False,
                            reuse_unchanged=arm != "lora-noreuse")
    profiler = SimpleProfiler(dirpath=workdir, filename=f"profile-{arm}")
    cpu: list[float] = []  # process CPU time of HTSRCallback's analysis hooks (wall time includes waiting for a core)
    start = [0.0]

    class Start(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            start[0] = time.process_time()

        on_train_epoch_end = on_train_start

    class Stop(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            cpu.append(time.process_time() - start[0])

        on_train_epoch_end = on_train_start

    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                         callbacks=[Start(), callback, Stop()],
                         profiler=profiler, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=workdir)
    reused: list[int] = []

    class CountReused(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            reused.append(len(callback.last_reused))

    trainer.callbacks.append(CountReused())
    pl.seed_everything(args.seed, verbose=False)
    wall = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - wall
    d = profiler.recorded_durations
    hooks = list(d.get(HOOK + "on_train_start", [])) + list(d.get(HOOK + "on_train_epoch_end", []))
    return {"arm": arm, "wall_s": wall, "first_s": hooks[0], "later_s": statistics.median(hooks[1:]),
            "first_cpu_s": cpu[0], "later_cpu_s": statistics.median(cpu[1:]),
            "analyze_later_s": statistics.median(list(d.get(ANALYZE, []))[1:]), "hook_total_s": sum(hooks),
            "epoch_train_s": sum(d.get("run_training_batch", [])) / args.epochs,
            "matrices": len(callback.latest_records), "reused": statistics.mean(reused) if reused else 0.0,
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)}


def report(runs: list[dict]) -> None:
    """The table (medians over repeats) and the verdict."""
    med = {arm: {k: statistics.median(r[k] for r in runs if r["arm"] == arm)
                 for k in runs[0] if k != "arm"} for arm in ARMS}
    print("\n| arm | trainable params | matrices | reused per later analysis | first analysis: wall / CPU (s) | "
          "later analyses, each: wall / CPU (s) | of which analysis proper (wall, s) | training per epoch (s) | "
          "callback share of fit (wall) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm in ARMS:
        m = med[arm]
        print(f"| {arm} | {m['trainable']:,.0f} | {m['matrices']:.0f} | {m['reused']:.0f} | {m['first_s']:.3f} / "
              f"{m['first_cpu_s']:.3f} | {m['later_s']:.3f} / {m['later_cpu_s']:.3f} | {m['analyze_later_s']:.3f} | "
              f"{m['epoch_train_s']:.2f} | {100 * m['hook_total_s'] / m['wall_s']:.1f} % |")
    full, lora, noreuse = (med[a]["later_cpu_s"] for a in ARMS)
    changed = med["lora"]["matrices"] - med["lora"]["reused"]
    verdict = ("reuse pays off: what remains is the adapted matrices, re-analyzed every time as they train, and the "
               "callback's logging" if lora < 0.8 * noreuse else "reuse does NOT pay off here")
    print(f"\nVerdict (CPU time, which waiting for a core does not inflate): after the baseline, an analysis of the "
          f"LoRA fine-tune costs {lora:.3f} s, "
          f"{100 * lora / full:.0f} % of the full fine-tune's ({full:.3f} s) and {100 * lora / noreuse:.0f} % of the "
          f"same LoRA run without reuse ({noreuse:.3f} s); {changed:.0f} of {med['lora']['matrices']:.0f} matrices "
          f"are analyzed again each time. {verdict}.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1 repeat, 2 epochs of 5 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.epochs, args.repeats = 5, 2, 1
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"Llama hidden 256, 4 layers, MLP 688, vocab 512; {args.steps} steps x {args.epochs} epochs, batch "
          f"{args.batch_size} x {args.seq_len} tokens; {args.repeats} repeats x {len(ARMS)} arms interleaved; torch "
          f"{torch.__version__}, 1 thread; {os.cpu_count()} CPUs; load average at start {load()}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            for arm in ARMS:
                runs.append(run_once(arm, args, workdir))
                r = runs[-1]
                print(f"  repeat {repeat} {arm:13s} fit {r['wall_s']:6.1f} s, first analysis {r['first_s']:.3f} s "
                      f"(CPU {r['first_cpu_s']:.3f}), later {r['later_s']:.3f} s (CPU {r['later_cpu_s']:.3f}), "
                      f"reused {r['reused']:.0f}/{r['matrices']}", flush=True)
    print(f"load average at end {load()}")
    report(runs)


if __name__ == "__main__":
    main()
