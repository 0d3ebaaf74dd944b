"""Standalone training runs with HTSRCallback, used by tests/test_callback_distributed.py.

Lightning's subprocess launchers (``ddp``, ``ModelParallelStrategy``) re-execute ``sys.argv``; inside pytest that
would re-run the test session, so distributed runs go through this script instead:

    python tests/distributed_run.py OUT_DIR

One invocation runs every mode, each writing ``OUT_DIR/MODE/htsr_history.csv`` and ``OUT_DIR/MODE/result.json``:
``single`` and ``ddp_spawn`` in the launching process (ddp_spawn's two workers are fresh processes), then ``ddp`` and
``fsdp2`` in the same two processes: the ddp launcher re-executes this script as rank 1 (``LOCAL_RANK`` set, so it
skips the first two modes), and the FSDP2 Trainer reuses that process group. Sharing the processes saves four Python
start-ups (each imports torch and Lightning) over one process tree per mode.

Every mode trains the same seeded model with lr = 0 (weights never change), so all modes must produce the same
per-matrix results. Then every mode trains ``conftest.ShiftNet`` (moving weights that over-fit) with
``restore_best_weights=True``; each rank writes ``OUT_DIR/MODE/restore_rank<r>.json``: the stop, the analysis judged
best, and whether its weights (this rank's local shard under FSDP2) equal the ones it held at that analysis.
Last, every mode but ``ddp_spawn`` fine-tunes a tiny ``transformers`` Llama with ``peft`` LoRA (sharded per decoder
layer under FSDP2) on identical examples, so that one process and two see the same gradients and follow the same
trajectory: ``OUT_DIR/MODE/lora/htsr_history.csv``, and ``lora_final.json``, the adapted matrices' merged weights
``W + scale * B A`` computed by hand from the gathered factors at the end; then the same with DoRA (``OUT_DIR/MODE/dora``;
its magnitude vectors sharded too).
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch
from conftest import ShiftNet  # this script's folder is on sys.path (also in the ddp launcher's re-execution)
from lightning.pytorch.demos.boring_classes import RandomDataset
from torch import nn
from torch.utils.data import DataLoader

from lightning_htsr import HTSRCallback
from lightning_htsr.spectra.synthetic import pareto

MODES = ("single", "ddp_spawn", "ddp", "fsdp2")
LAUNCHER_ONLY = ("single", "ddp_spawn")  # not run by the ddp launcher's re-executed rank 1


class Net(pl.LightningModule):
    """A few layers of different shapes and phases (random-like and heavy-tailed), trained with lr = 0."""

    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        self.shard = shard
        torch.manual_seed(0)
        self.blocks = nn.Sequential(
            nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
            nn.Linear(128, 192), nn.ReLU(), nn.Linear(192, 2),
        )
        with torch.no_grad():
            self.blocks[2].weight.copy_(pareto(256, 256, 1.2, seed=1))
            self.blocks[6].weight.copy_(pareto(192, 128, 1.5, seed=2))

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed._composable.fsdp import fully_shard

        for layer in self.blocks:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch).sum() * 0.0 + self(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 64), batch_size=8)


def strategy_kwargs(mode: str) -> dict:
    """Trainer arguments that select ``mode``'s strategy on CPU."""
    if mode == "single":
        return {"accelerator": "cpu", "devices": 1}
    if mode == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        return {"accelerator": "cpu", "devices": 2, "strategy": strategy}
    return {"accelerator": "cpu", "devices": 2, "strategy": mode}


def run(mode: str, out: str) -> None:
    """Train ``Net`` under ``mode``; rank 0 writes ``out/result.json`` next to the callback's history."""
    os.makedirs(out, exist_ok=True)
    callback = HTSRCallback(history_file=os.path.join(out, "htsr_history.csv"),
                            spectra_file=os.path.join(out, "htsr_spectra.npz"), stop_on="heavy_tailed",
                            patience=2, log_figures_every=None)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], **strategy_kwargs(mode))
    trainer.fit(Net(shard=mode == "fsdp2"))
    if trainer.is_global_zero:
        import pandas as pd

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("htsr/")}
        # ddp_spawn returns metrics, not callback state, to the parent: read the stop from the history instead
        history = pd.read_csv(os.path.join(out, "htsr_history.csv"))
        stops = history.dropna(subset=["stopping_reason"])
        stopped_epoch = int(stops["epoch"].iloc[0]) if len(stops) else -1
        sharded = any(type(p).__name__ == "DTensor" for p in trainer.lightning_module.parameters())
        with open(os.path.join(out, "result.json"), "w") as handle:
            json.dump({"current_epoch": trainer.current_epoch, "world_size": trainer.world_size, "dtensor": sharded,
                       "stopped_epoch": stopped_epoch, "metrics": metrics}, handle)


class ShardedShiftNet(ShiftNet):
    """:class:`ShiftNet` whose layer is sharded with FSDP2 under ``ModelParallelStrategy``."""

    def __init__(self, shard: bool) -> None:
        super().__init__(switch=5)
        self.shard = shard

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed._composable.fsdp import fully_shard

            fully_shard(self.layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone()


class Snapshots(pl.Callback):
    """This rank's local part of the layer's weight at the end of every epoch."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.weights[trainer.current_epoch] = _local(pl_module.layer.weight)


def _restoring_fit(mode: str, root: str, max_epochs: int, callbacks: list, ckpt_path: str | None = None):
    callback = HTSRCallback(history_file=None, spectra_file=None, stop_on="heavy_tailed", restore_best_weights=True,
                            log_figures_every=None, print_summary=False)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=any(
                             isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         callbacks=[callback, *callbacks], **strategy_kwargs(mode))
    model = ShardedShiftNet(shard=mode == "fsdp2")
    trainer.fit(model, ckpt_path=ckpt_path)
    return callback, trainer, model


def run_restore(mode: str, out: str) -> None:
    """An over-fitting run with restore_best_weights: every rank reports what it handed back. Then the same run
    interrupted after its best analysis and resumed from its checkpoint must hand back the same weights."""
    snapshots = Snapshots()
    callback, trainer, model = _restoring_fit(mode, os.path.join(out, "straight"), 20, [snapshots])
    if mode == "ddp_spawn":  # the workers' modules and callbacks stay in the workers: nothing to compare here
        return
    best = callback.best_analysis
    restored = _local(model.layer.weight)
    report = {"reason": callback.stopping_reason.name, "stopped_epoch": callback.stopped_epoch,
              "restored": callback.restored, "best_epoch": best.epoch if best else None,
              "equal_to_best": bool(best and torch.equal(restored, snapshots.weights[best.epoch])),
              "differs_from_last": not torch.equal(restored, snapshots.weights[callback.stopped_epoch]),
              "local_shape": list(restored.shape), "kept_bytes": callback.kept.nbytes}
    # interrupted after the best analysis (the last checkpoint holds it and its kept copy), then resumed
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_last=True, every_n_epochs=1)
    _restoring_fit(mode, os.path.join(out, "first"), callback.stopped_epoch, [ckpt])
    resumed, _, resumed_model = _restoring_fit(mode, os.path.join(out, "first"), 20, [],
                                               ckpt_path=os.path.join(out, "ckpt", "last.ckpt"))
    report.update(resumed_stopped_epoch=resumed.stopped_epoch, resumed_restored=resumed.restored,
                  resumed_equal=torch.equal(_local(resumed_model.layer.weight), restored),
                  kept_file=os.path.basename(str(resumed.best_weights_file)))
    with open(os.path.join(out, f"restore_rank{trainer.global_rank}.json"), "w") as handle:
        json.dump(report, handle)


class LoraLlama(pl.LightningModule):
    """A tiny Llama with LoRA on ``q_proj``/``v_proj``; under FSDP2 each decoder layer is sharded, LoRA factors
    included (DTensors), and the frozen base weights with them."""

    def __init__(self, shard: bool, dora: bool = False) -> None:
        super().__init__()
        import peft
        import transformers

        self.shard = shard
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        base = transformers.LlamaForCausalLM(config)
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=dora)
        self.model = peft.get_peft_model(base, config)

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed._composable.fsdp import fully_shard

            for layer in self.model.base_model.model.model.layers:
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])  # the module whose forward runs

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)

    def train_dataloader(self) -> DataLoader:
        # 64 copies of one sequence: every batch has the same mean gradient, on one rank or split over two
        tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0)).repeat(64, 1)
        per_rank = 16 // max(self.trainer.world_size, 1)  # the same global batch (and steps) in every mode
        return DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=per_rank)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().double()


def _has_peft() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("peft", "transformers"))


def run_lora(mode: str, out: str, dora: bool = False) -> None:
    """Fine-tune :class:`LoraLlama` with the callback under ``mode``; rank 0 writes the LoRA run's adapted weights
    merged by hand."""
    out = os.path.join(out, "dora" if dora else "lora")
    os.makedirs(out, exist_ok=True)
    callback = HTSRCallback(history_file=os.path.join(out, "htsr_history.csv"), spectra_file=None,
                            log_figures_every=None, print_summary=False)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], **strategy_kwargs(mode))
    module = LoraLlama(shard=mode == "fsdp2", dora=dora)
    trainer.fit(module)
    if dora:
        return
    merged = {}
    for i, layer in enumerate(module.model.base_model.model.model.layers):
        for proj in ("q_proj", "v_proj"):
            lora = getattr(layer.self_attn, proj)  # collectives: every rank gathers every factor
            weight, a, b = (_full(t) for t in (lora.base_layer.weight, lora.lora_A["default"].weight,
                                               lora.lora_B["default"].weight))
            merged[f"model.model.layers.{i}.self_attn.{proj}"] = (weight + lora.scaling["default"] * b @ a).tolist()
    sharded = any(type(p).__name__ == "DTensor" for p in module.parameters())
    if trainer.is_global_zero:
        with open(os.path.join(out, "lora_final.json"), "w") as handle:
            json.dump({"merged": merged, "dtensor": sharded, "world_size": trainer.world_size}, handle)


def main(out: str) -> None:
    torch.set_num_threads(1)
    relaunched = "LOCAL_RANK" in os.environ  # rank 1 of the ddp launcher
    for mode in MODES:
        if relaunched and mode in LAUNCHER_ONLY:
            continue
        run(mode, os.path.join(out, mode))
        run_restore(mode, os.path.join(out, mode))
        if mode != "ddp_spawn" and _has_peft():  # ddp_spawn's module stays in the workers: nothing to read back
            run_lora(mode, os.path.join(out, mode))
            run_lora(mode, os.path.join(out, mode), dora=True)
        if mode == "ddp_spawn":
            os.environ.pop("MASTER_PORT", None)  # ddp_spawn's launcher left its port here: let ddp pick a fresh one


if __name__ == "__main__":
    main(sys.argv[1])
