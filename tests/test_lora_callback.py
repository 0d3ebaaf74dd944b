"""HTSRCallback on fine-tuning: a real Lightning fine-tune of a tiny transformers Llama
with peft LoRA shows the adapted layers' alpha move in the history and TensorBoard, while the frozen weights are
analyzed once and reused until they change."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_htsr as htsr
from lightning_htsr import HTSRCallback
from lightning_htsr.training.sinks.history import read_history
from lightning_htsr.weights.modules import weight_matrices

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def trainer_kwargs(tmp_path, **kwargs):
    return {"default_root_dir": str(tmp_path), "enable_progress_bar": False, "enable_model_summary": False,
            "enable_checkpointing": False, "log_every_n_steps": 1, "accelerator": "cpu", "devices": 1, **kwargs}


class LoraLlama(pl.LightningModule):
    """A tiny Llama with LoRA on q_proj/v_proj learning random token sequences."""

    def __init__(self, tuner: str = "lora") -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        base = transformers.LlamaForCausalLM(config)
        targets = ["q_proj", "v_proj"]
        adapter = (peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets) if tuner == "lora"
                   else peft.LoHaConfig(r=8, alpha=16, target_modules=targets))
        self.model = peft.get_peft_model(base, adapter)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-2)


def token_data() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (64, 16), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=16)


class Reused(pl.Callback):
    """Records which matrices each epoch's analysis reused (runs after HTSRCallback's hook)."""

    def __init__(self, htsr_callback: HTSRCallback) -> None:
        self.htsr, self.per_analysis = htsr_callback, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.per_analysis.append(self.htsr.last_reused)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.per_analysis.append(self.htsr.last_reused)


@pytest.mark.parametrize("tuner", ["lora", "loha"])
def test_lora_fine_tune_moves_the_adapted_alphas_in_history_and_tensorboard(tmp_path, tuner) -> None:
    """LoRA (merged here) and LoHa (merged by peft's merge()) alike."""
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = HTSRCallback(log_figures_every=None, log_histograms=False, print_summary=False)
    reused = Reused(callback)
    module = LoraLlama(tuner)
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback, reused], logger=logger, **trainer_kwargs(tmp_path))
    trainer.fit(module, token_data())
    history = read_history(callback.history_path)
    assert not history["name"].str.contains("lora_|base_layer|base_model").any()
    alpha = history.pivot(index="analysis", columns="name", values="alpha")
    assert len(alpha) == 4
    adapted = [f"model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    frozen = [c for c in alpha.columns if c not in adapted]
    for name in adapted:
        assert alpha[name].nunique() == 4, name  # every analysis sees the adapters move
    assert (alpha[frozen].nunique() == 1).all()
    # the frozen matrices are analyzed once, then reused; the adapted ones never are
    assert reused.per_analysis[0] == []
    for names in reused.per_analysis[1:]:
        assert sorted(names) == sorted(frozen)
    # the last analysis equals an offline analysis of the merged model
    last = history[history["analysis"] == 3].set_index("name")["alpha"]
    merged = htsr.analyze(module.model.merge_and_unload()).set_index("name")["alpha"]
    assert last.loc[adapted].to_numpy() == pytest.approx(merged.loc[[n[len("model."):] for n in adapted]].to_numpy(),
                                                         rel=1e-5)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    for name in adapted:
        values = board_alpha(acc, name)
        assert len(values) == 4 and len(set(values)) == 4
        assert values == pytest.approx(alpha[name].tolist(), rel=1e-6)
    frozen_values = board_alpha(acc, frozen[0])
    assert len(frozen_values) == 4 and len(set(frozen_values)) == 1


def board_alpha(acc, name: str) -> list[float]:
    """A matrix's alpha over training in TensorBoard (logged as ``alpha_unclassified`` while it has no phase)."""
    tags = [t for t in (f"htsr/{name}/alpha", f"htsr/{name}/alpha_unclassified") if t in acc.Tags()["scalars"]]
    return [e.value for e in sorted((e for t in tags for e in acc.Scalars(t)), key=lambda e: e.step)]


class FrozenAndTrained(pl.LightningModule):
    """One frozen layer (changed through ``.data`` at the start of epoch 1, by the optimizer never) and one trained."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(64, 128)
        self.frozen.requires_grad_(False)
        self.trained = nn.Linear(128, 96)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.trained(torch.relu(self.frozen(x))), y)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.frozen.weight.data.add_(0.5 * torch.randn_like(self.frozen.weight))  # invisible to _version

    def configure_optimizers(self):
        return torch.optim.SGD(self.trained.parameters(), lr=0.05)


def test_unchanged_weights_are_reused_and_reanalyzed_once_they_move(tmp_path) -> None:
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randn(128, 96)), batch_size=32)
    callback = HTSRCallback(log_figures_every=None, log_histograms=False, print_summary=False)
    reused = Reused(callback)
    module = FrozenAndTrained()
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback, reused], logger=False, **trainer_kwargs(tmp_path))
    trainer.fit(module, data)
    # baseline: nothing to reuse; epoch 0: frozen reused; epoch 1: frozen moved (.data.add_); epoch 2: reused again
    assert reused.per_analysis == [[], ["frozen"], [], ["frozen"]]
    history = read_history(callback.history_path).pivot(index="analysis", columns="name", values="alpha")
    assert history["frozen"].iloc[0] == history["frozen"].iloc[1] != history["frozen"].iloc[2]
    assert history["frozen"].iloc[3] == pytest.approx(htsr.analyze(module).set_index("name").loc["frozen", "alpha"],
                                                      rel=1e-12)
    assert history["trained"].nunique() == 4
    # an optimizer step (a tracked in-place change) on a trained-then-frozen weight is seen too
    with torch.no_grad():
        before = callback._reuse.split(weight_matrices(module, materialize=False), lambda s: True)[1]
        assert set(before) == {"frozen", "trained"}
        module.trained.weight.add_(1e-3)
        after = callback._reuse.split(weight_matrices(module, materialize=False), lambda s: True)[1]
    assert set(after) == {"frozen"}


def test_reuse_can_be_turned_off(tmp_path) -> None:
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randn(64, 96)), batch_size=32)
    callback = HTSRCallback(log_figures_every=None, log_histograms=False, print_summary=False, reuse_unchanged=False)
    reused = Reused(callback)
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback, reused], logger=False, **trainer_kwargs(tmp_path))
    trainer.fit(FrozenAndTrained(), data)
    assert reused.per_analysis == [[], [], []]


def test_sharded_and_unreadable_weights_get_no_key(tmp_path) -> None:
    """DTensor shards (FSDP2), meta and integer tensors are analyzed every time: they have no reuse key."""
    from lightning_htsr.training.reuse import tensor_key

    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shard = distribute_tensor(torch.randn(8, 4), DeviceMesh("cpu", [0]), [Shard(0)])
        assert type(shard).__name__ == "DTensor" and tensor_key(shard) is None
        assert tensor_key(nn.Parameter(shard)) is None
    finally:
        dist.destroy_process_group()
    assert tensor_key(torch.empty(4, 4, device="meta")) is None
    assert tensor_key(torch.zeros(4, 4, dtype=torch.int8)) is None
    weight = nn.Parameter(torch.randn(4, 4))
    key = tensor_key(weight)
    assert key is not None and tensor_key(weight) == key
    with torch.no_grad():
        weight.mul_(1.0)  # same values, but a tracked in-place write: analyzed again (cheap and safe)
    assert tensor_key(weight) != key
