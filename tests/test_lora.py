"""LoRA adapters: a peft LoRA layer is one matrix named as in the merged model, equal to
analyzing ``merge_and_unload()``; adapters on disk merged while the base streams; no peft import at import time."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import lightning_htsr as htsr
from lightning_htsr.analysis import analyze_matrices, resolve_options
from lightning_htsr.views.cli import main
from lightning_htsr.weights.checkpoints import CheckpointError
from lightning_htsr.weights.matrix import WeightMatrix

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0) -> nn.Module:
    """A small Llama built from a config (no download)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config)


def lora_model(base: nn.Module, targets: list[str], **config: object) -> nn.Module:
    """``base`` wrapped by peft with random (non-zero) A and B."""
    torch.manual_seed(1)
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=targets, **options))
    for name, param in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    return model


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same names in the same order, alpha to 1e-6 relative, same statuses."""
    assert a["name"].tolist() == b["name"].tolist()
    assert a["status"].tolist() == b["status"].tolist()
    np.testing.assert_allclose(a["alpha"].to_numpy(float), b["alpha"].to_numpy(float), rtol=1e-6)
    np.testing.assert_allclose(a["entropy"].to_numpy(float), b["entropy"].to_numpy(float), rtol=1e-6)


def merged_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).merge_and_unload()


def test_linear_and_embedding_equal_merge_and_unload() -> None:
    model = lora_model(tiny_llama(), ["q_proj", "v_proj", "embed_tokens"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    live = htsr.analyze(model)
    assert_same_rows(live, htsr.analyze(merged_copy(model)))
    assert not live["name"].str.contains("lora_|base_layer|base_model").any()
    assert live.set_index("name").loc["model.layers.0.self_attn.q_proj", "note"].startswith("LoRA merged")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the module is not modified


def test_conv_layers_equal_merge_and_unload() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(8, 32, 3), nn.ReLU(), nn.Conv1d(4, 16, 5), nn.Linear(48, 96))
    model = lora_model(base, ["0", "2", "3"])
    live = htsr.analyze(model, min_evals=1)
    assert live["name"].tolist() == ["0", "2", "3"]
    assert_same_rows(live, htsr.analyze(merged_copy(model), min_evals=1))


def test_fan_in_fan_out_gpt2_conv1d() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=32)
    model = lora_model(transformers.GPT2LMHeadModel(config), ["c_attn", "c_fc"], fan_in_fan_out=True)
    assert_same_rows(htsr.analyze(model), htsr.analyze(merged_copy(model)))


def test_rslora_dora_and_two_active_adapters() -> None:
    rs = lora_model(tiny_llama(), ["q_proj", "o_proj"], use_rslora=True, lora_alpha=16)
    assert_same_rows(htsr.analyze(rs), htsr.analyze(merged_copy(rs)))
    dora = lora_model(tiny_llama(), ["q_proj", "up_proj"], use_dora=True)
    with torch.no_grad():
        for name, param in dora.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    assert_same_rows(htsr.analyze(dora), htsr.analyze(merged_copy(dora)))
    two = lora_model(tiny_llama(), ["q_proj", "v_proj"])
    two.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    two.base_model.set_adapter(["default", "second"])
    for name, param in two.named_parameters():
        if "lora_B.second" in name:
            torch.nn.init.normal_(param, std=0.3)
    live = htsr.analyze(two)
    assert "second: r=2" in live.set_index("name").loc["model.layers.0.self_attn.q_proj", "note"]
    assert_same_rows(live, htsr.analyze(copy.deepcopy(two).merge_and_unload(adapter_names=["default", "second"])))


def test_adapters_merged_in_place_by_peft_are_not_added_twice() -> None:
    frozen = tiny_llama()
    model = lora_model(copy.deepcopy(frozen), ["q_proj", "v_proj"])
    expected = htsr.analyze(merged_copy(model))
    model.merge_adapter()  # W += scaling * B @ A inside the LoRA layers
    live = htsr.analyze(model)
    assert_same_rows(live, expected)
    assert "peft merge() had added" in live.set_index("name").loc["model.layers.0.self_attn.q_proj", "note"]
    base = htsr.analyze(model, lora="base")
    np.testing.assert_allclose(base["alpha"].to_numpy(float), htsr.analyze(frozen)["alpha"].to_numpy(float),
                               rtol=1e-4)


def test_delta_and_base_modes() -> None:
    base = tiny_llama()
    frozen = copy.deepcopy(base)
    model = lora_model(base, ["q_proj", "v_proj"])
    assert_same_rows(htsr.analyze(model, lora="base"), htsr.analyze(frozen))
    delta = htsr.analyze(model, lora="delta", min_evals=4)
    assert delta["name"].tolist() == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    update = (q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"]).detach()
    expected = analyze_matrices([WeightMatrix.from_tensor("d", update)], resolve_options(min_evals=4))[0].record
    row = delta.iloc[0]
    assert row["num_evals"] == 64 and row["note"].startswith("LoRA delta")
    assert row["matrix_rank"] == expected["matrix_rank"] == 4  # rank r of 64
    with pytest.raises(ValueError, match="lora must be one of"):
        htsr.analyze(model, lora="both")


OTHER_TUNERS = {
    "loha": lambda t: peft.LoHaConfig(r=4, alpha=8, target_modules=t, init_weights=False),
    "lokr": lambda t: peft.LoKrConfig(r=4, alpha=8, target_modules=t, init_weights=False),
    "ia3": lambda t: peft.IA3Config(target_modules=t, feedforward_modules=[], init_ia3_weights=False),
    "adalora": lambda t: peft.AdaLoraConfig(init_r=8, target_r=4, lora_alpha=8, target_modules=t, total_step=10,
                                            init_lora_weights=False),
    "vera": lambda t: peft.VeraConfig(r=8, target_modules=t, init_weights=False),
    "oft": lambda t: peft.OFTConfig(r=0, oft_block_size=8, target_modules=t, init_weights=False),
    "boft": lambda t: peft.BOFTConfig(boft_block_size=8, target_modules=t, init_weights=False),
}


@pytest.mark.parametrize("tuner", list(OTHER_TUNERS))
def test_other_peft_tuners_equal_merge_and_unload(tuner: str) -> None:
    """LoHa, LoKr, IA3, AdaLoRA, VeRA, OFT, BOFT layers (additive, multiplicative, rotations) are merged by peft's
    own ``merge()`` on a copy: the merged rows equal ``merge_and_unload()``'s, named as in the base model, the base
    rows the frozen model's, the delta rows ``merged - W``; the module is not modified (these were analyzed as the
    unadapted base weight, named ``...q_proj.base_layer``, with no note)."""
    frozen = tiny_llama()
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(frozen), OTHER_TUNERS[tuner](["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    live = htsr.analyze(model)
    assert_same_rows(live, htsr.analyze(merged_copy(model)))
    q = live.set_index("name").loc["model.layers.0.self_attn.q_proj"]
    assert q["note"].startswith(f"peft {tuner.upper()} merged")
    assert q["alpha"] != pytest.approx(htsr.analyze(frozen).set_index("name").loc[q.name, "alpha"], rel=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert_same_rows(htsr.analyze(model, lora="base"), htsr.analyze(frozen))
    delta = htsr.analyze(model, lora="delta", min_evals=4)
    assert delta["name"].tolist() == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    update = (merged_copy(model).model.layers[0].self_attn.q_proj.weight - layer.get_base_layer().weight).detach()
    expected = analyze_matrices([WeightMatrix.from_tensor("d", update)], resolve_options(min_evals=4))[0].record
    assert delta.iloc[0]["matrix_rank"] == expected["matrix_rank"]
    np.testing.assert_allclose(delta.iloc[0]["entropy"], expected["entropy"], rtol=1e-6)


def test_other_tuner_merged_in_place_and_disabled() -> None:
    """A tuner layer peft has merged into W is analyzed as it is (base: ``unmerge()`` on a copy); with the adapters
    disabled, W, and the note says so."""
    frozen = tiny_llama()
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(frozen), OTHER_TUNERS["loha"](["q_proj"]))
    expected = htsr.analyze(merged_copy(model))
    model.merge_adapter()
    assert_same_rows(htsr.analyze(model), expected)
    np.testing.assert_allclose(htsr.analyze(model, lora="base")["alpha"].to_numpy(float),
                               htsr.analyze(frozen)["alpha"].to_numpy(float), rtol=1e-4)
    model.unmerge_adapter()
    with model.disable_adapter():
        live = htsr.analyze(model)
        assert_same_rows(live, htsr.analyze(frozen))
        assert "no active adapter" in live.set_index("name").loc["model.layers.0.self_attn.q_proj", "note"]


def test_state_dict_needs_the_adapter_config(tmp_path) -> None:
    model = lora_model(tiny_llama(), ["q_proj", "v_proj"])
    sd = model.state_dict()
    with pytest.raises(ValueError, match="adapter_config"):
        htsr.analyze_state_dict(sd)
    model.save_pretrained(tmp_path / "adapter")
    merged = merged_copy(model).state_dict()
    assert_same_rows(htsr.analyze_state_dict(sd, adapter_config=tmp_path / "adapter"), htsr.analyze_state_dict(merged))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert_same_rows(htsr.analyze_state_dict(sd, adapter_config=config), htsr.analyze_state_dict(merged))
    base_rows = htsr.analyze_state_dict(sd, lora="base")
    assert "model.layers.0.self_attn.q_proj" in base_rows["name"].tolist()
    assert not base_rows["name"].str.contains("lora_").any()


def test_import_does_not_load_peft_or_transformers() -> None:
    code = "import sys, lightning_htsr; print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base Llama, a LoRA adapter (q/v projections and the embedding) and the merged model, saved by HF."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    model = lora_model(base, ["q_proj", "v_proj", "embed_tokens"])
    model.save_pretrained(root / "adapter")
    merged_copy(model).save_pretrained(root / "merged")
    return root


def test_adapter_on_disk_equals_the_merged_model(saved) -> None:
    assert (saved / "base" / "model.safetensors").is_file()
    merged = htsr.analyze_checkpoint(saved / "merged")
    assert_same_rows(htsr.analyze_checkpoint(saved / "base", adapter=saved / "adapter"), merged)
    assert_same_rows(htsr.analyze_checkpoint(saved / "base", adapter=saved / "adapter", lora="base"),
                     htsr.analyze_checkpoint(saved / "base"))
    delta = htsr.analyze_checkpoint(saved / "base", adapter=saved / "adapter", lora="delta", min_evals=4)
    assert delta["name"].tolist() == ["model.embed_tokens"] + [f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                                               for p in ("q_proj", "v_proj")]
    assert (delta["matrix_rank"] == 4).all()
    assert delta["note"].str.startswith("LoRA delta: scaling * B @ A alone (default: r=4, scaling=2)").all()


def test_adapter_on_disk_through_the_cli(saved, tmp_path, capsys) -> None:
    out = tmp_path / "rows.csv"
    assert main(["analyze", str(saved / "base"), "--adapter", str(saved / "adapter"), "--csv", str(out), "-q"]) == 0
    assert_same_rows(pd.read_csv(out), htsr.analyze_checkpoint(saved / "merged"))
    assert main(["analyze", str(saved / "base"), "--lora", "delta"]) == 2
    assert "--lora needs --adapter" in capsys.readouterr().err


def _broken_adapter(saved, tmp_path, how: str):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / how
    shutil.copytree(saved / "adapter", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    tensors = load_file(bad / "adapter_model.safetensors")
    if how == "unknown_key":
        config["lora_magic"] = 3
    elif how == "no_weights":
        (bad / "adapter_model.safetensors").unlink()
    elif how == "wrong_shape":
        key = next(k for k in tensors if "q_proj.lora_A" in k)
        tensors[key] = torch.zeros(4, 48)
    elif how == "missing_base":
        tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    elif how == "wrong_rank":
        config["r"] = 8
    elif how == "dora":
        config["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(config))
    if (bad / "adapter_model.safetensors").exists():
        save_file(tensors, bad / "adapter_model.safetensors")
    return bad


@pytest.mark.parametrize("how, words", [("unknown_key", "unknown adapter config key(s) lora_magic"),
                                        ("no_weights", "no adapter_model.safetensors"),
                                        ("wrong_shape", "do not fit its base shape"),
                                        ("missing_base", "which the base checkpoint does not have"),
                                        ("wrong_rank", "the config says r=8"),
                                        ("dora", "use_dora=True is not supported")])
def test_mismatched_adapter_is_one_line_and_exit_2(saved, tmp_path, capsys, how, words) -> None:
    bad = _broken_adapter(saved, tmp_path, how)
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
        htsr.analyze_checkpoint(saved / "base", adapter=bad)
    assert main(["analyze", str(saved / "base"), "--adapter", str(bad)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert main(["analyze", str(saved / "base"), "--adapter", str(tmp_path / "nowhere")]) == 2
    assert "no such adapter directory" in capsys.readouterr().err


def test_an_adapter_alone_on_the_command_line_gets_a_hint(saved, capsys) -> None:
    """``analyze ADAPTER_DIR`` lists the factors (they are tensors) and says how to analyze the adapted model."""
    assert main(["analyze", str(saved / "adapter")]) == 0
    err = capsys.readouterr().err
    assert f"{saved / 'adapter'} is a peft adapter" in err and "--adapter" in err
    assert main(["analyze", str(saved / "base"), "--adapter", str(saved / "adapter")]) == 0
    assert "is a peft adapter" not in capsys.readouterr().err


def test_other_tuner_on_disk_is_refused_for_what_it_is(saved, tmp_path, capsys) -> None:
    """A saved LoHa adapter: refused by its peft_type (not by the LoRA config keys it lacks), in one line, exit 2."""
    model = peft.get_peft_model(tiny_llama(), OTHER_TUNERS["loha"](["q_proj"]))
    model.save_pretrained(tmp_path / "loha")
    with pytest.raises(CheckpointError, match="peft_type 'LOHA' is not LORA"):
        htsr.analyze_checkpoint(saved / "base", adapter=tmp_path / "loha")
    assert main(["analyze", str(saved / "base"), "--adapter", str(tmp_path / "loha")]) == 2
    err = capsys.readouterr().err
    assert "is not LORA" in err and len(err.strip().splitlines()) == 1


def test_modules_to_save_live_and_on_disk(tmp_path) -> None:
    """A classifier fine-tune (task_type SEQ_CLS): peft's trained copy of the head is named as the head."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, vocab_size=128, num_labels=3)
    base = transformers.BertForSequenceClassification(config)
    base.save_pretrained(tmp_path / "base")
    model = lora_model(base, ["query", "value"], task_type="SEQ_CLS")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.normal_(std=0.3)
    merged = merged_copy(model)
    live = htsr.analyze(model, min_evals=1)
    assert live["name"].tolist()[-1] == "classifier" and "classifier.original_module" not in live["name"].tolist()
    assert_same_rows(live, htsr.analyze(merged, min_evals=1))
    model.save_pretrained(tmp_path / "adapter")
    merged.save_pretrained(tmp_path / "merged")
    assert_same_rows(htsr.analyze_checkpoint(tmp_path / "base", adapter=tmp_path / "adapter", min_evals=1),
                     htsr.analyze_checkpoint(tmp_path / "merged", min_evals=1))
