"""LoRA adapters, live and on disk: one matrix per adapted layer, named as in the base model.

A LoRA-wrapped layer holds a frozen weight ``W`` and per adapter two factors ``A`` (``r x in``) and ``B``
(``out x r``); it computes with ``W + scaling * B @ A``. This module is the one place that knows about it:

* :class:`LoraView`: ``named_modules()`` of a Hugging Face ``peft`` model seen through its LoRA layers (``Linear``,
  ``Embedding``, ``Conv1d/2d/3d`` and ``transformers``' ``Conv1D`` base layers): each is one entry named by the base
  model's path (the name it has after ``merge_and_unload()``: without ``base_model.model.`` and ``.base_layer``), its
  factors are not entries of their own; a ``modules_to_save`` copy in use is named as the module it replaces. Layers of
  the other tuners (LoHa, LoKr, IA3, AdaLoRA, VeRA, OFT, BOFT, ...) are named the same way and computed by peft's own
  ``merge()``/``unmerge()`` on a copy of the layer. Detected by duck typing: ``peft`` is never imported.
* :func:`effective_weight`: the merge math (``lora="merged"``: ``W + sum scaling * B @ A`` over the active adapters,
  DoRA's magnitude for ``Linear`` layers; ``"delta"``: the update alone, rank ``r``; ``"base"``: ``W``), computed
  on copies: the module is never modified.
* :class:`AdapterFiles` / :func:`read_adapter`: a saved adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) merged into a base checkpoint streamed one tensor at a time, and the LoRA factors
  of a bare ``peft`` state dict (:func:`state_dict_adapter`).

LitGPT's ``LoRALinear``/``LoRAQKVLinear`` are not covered: ``pip install litgpt`` would replace the installed
``huggingface_hub`` and ``jsonargparse`` with older versions.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from .checkpoints import CheckpointError
from .matrix import AdaptError

if TYPE_CHECKING:
    from .matrix import WeightAccess

__all__ = ["LORA_MODES", "AdapterFiles", "LoraFactors", "LoraMode", "LoraView", "effective_weight",
           "is_peft_tuner_layer", "read_adapter", "state_dict_adapter"]

LoraMode = Literal["merged", "delta", "base"]
#: The values of the ``lora=`` option.
LORA_MODES: tuple[str, ...] = ("merged", "delta", "base")

#: Base layer types whose LoRA update this module merges (others are listed as ordinary modules).
_MERGEABLE = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "transformers_conv1d")


def check_lora_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`LORA_MODES`, else a ``ValueError`` naming them.

    Example:
        >>> check_lora_mode("delta")
        'delta'
    """
    if mode not in LORA_MODES:
        raise ValueError(f"lora must be one of {', '.join(map(repr, LORA_MODES))}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's update of one weight: ``scaling * B @ A`` in the weight's layout.

    Attributes:
        adapter: Adapter name (``"default"``).
        A: ``(r, in)``, or ``(r, in, *kernel)`` for convolutions; ``(r, num_embeddings)`` for embeddings.
        B: ``(out, r)`` (trailing kernel dimensions of size 1 allowed).
        scaling: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        transposed: The weight is stored ``(in, out)`` (``fan_in_fan_out``, GPT-2's ``Conv1D``, embeddings).
        magnitude: DoRA's magnitude vector (one per output), or ``None``.
    """

    adapter: str
    A: Tensor
    B: Tensor
    scaling: float
    transposed: bool = False
    magnitude: Tensor | None = None

    @property
    def rank(self) -> int:
        """The adapter's rank ``r``."""
        return int(self.A.shape[0])

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors the update is computed from (for change detection)."""
        return (self.A, self.B) + ((self.magnitude,) if self.magnitude is not None else ())

    def gathered(self, access: WeightAccess) -> LoraFactors:
        """The factors with their full values (a collective for sharded ones: every rank must call it)."""
        magnitude = access.gather(self.magnitude).detach() if self.magnitude is not None else None
        return dataclasses.replace(self, A=access.gather(self.A).detach(), B=access.gather(self.B).detach(),
                                   magnitude=magnitude)


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """float32 at least (the analysis upcasts anyway; bf16 sums would round the update away)."""
    return torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32


def lora_delta(factors: LoraFactors, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``scaling * B @ A`` reshaped to a weight of ``shape`` (stored layout).

    Example:
        >>> f = LoraFactors("default", torch.ones(1, 3), torch.ones(2, 1), scaling=0.5)
        >>> lora_delta(f, (2, 3), torch.float32)
        tensor([[0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000]])
    """
    a, b = factors.A.to(dtype), factors.B.to(dtype)
    delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * factors.scaling  # (out, in * kernel)
    if factors.transposed:
        return delta.T.reshape(shape)
    return delta.reshape(shape)


def _dora(weight: Tensor, factors: LoraFactors) -> Tensor:
    """DoRA's merged weight of a ``Linear``: ``m / ||W'||_row * W'`` with ``W' = W + update`` (``out x in``)."""
    lin = weight.T if factors.transposed else weight
    norm = torch.linalg.vector_norm(lin, dim=1)
    out = (factors.magnitude.to(lin.dtype) / norm).unsqueeze(1) * lin  # type: ignore[union-attr]
    return out.T if factors.transposed else out


def effective_weight(weight: Tensor, factors: Iterable[LoraFactors], mode: str = "merged") -> Tensor:
    """The weight a LoRA layer computes with (``"merged"``), its update alone (``"delta"``) or ``weight``
    (``"base"``); never modifies ``weight``. Meta tensors (a plan) come back as they are: the shape is ``W``'s.

    Adapters are applied in order, as ``peft``'s ``merge_and_unload()`` does; a DoRA adapter
    (``magnitude`` set) rescales the rows of ``W + update`` to its magnitude. The result is float32 at least.

    Args:
        weight: The frozen weight (stored layout).
        factors: The active adapters' factors.
        mode: ``"merged"``, ``"delta"`` or ``"base"``.

    Returns:
        A new tensor of ``weight``'s shape (``weight`` itself for ``"base"`` and meta tensors).

    Example:
        >>> w = torch.eye(2)
        >>> f = LoraFactors("default", torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [2.0]]), scaling=0.5)
        >>> effective_weight(w, [f]).tolist(), effective_weight(w, [f], "delta").tolist()
        ([[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 0.0]])
    """
    factors = list(factors)
    if mode == "base" or weight.device.type == "meta" or not factors:
        return weight
    dtype = _compute_dtype(weight)
    if mode == "delta" and all(f.magnitude is None for f in factors):
        return sum((lora_delta(f, weight.shape, dtype) for f in factors[1:]),
                   lora_delta(factors[0], weight.shape, dtype))
    merged = weight.to(dtype)
    for f in factors:
        merged = merged + lora_delta(f, weight.shape, dtype)
        if f.magnitude is not None:
            merged = _dora(merged, f)
    return merged - weight.to(dtype) if mode == "delta" else merged


def lora_note(factors: list[LoraFactors], mode: str) -> str:
    """What the row of an adapted matrix was computed on (its ``note``).

    Example:
        >>> lora_note([LoraFactors("default", torch.zeros(8, 4), torch.zeros(4, 8), 2.0)], "merged")
        'LoRA merged: W + scaling * B @ A (default: r=8, scaling=2)'
    """
    what = {"merged": "W + scaling * B @ A", "delta": "scaling * B @ A alone", "base": "the frozen W"}[mode]
    parts = ", ".join(f"{f.adapter}: r={f.rank}, scaling={f.scaling:g}" + (", DoRA" if f.magnitude is not None
                                                                          else "") for f in factors)
    return f"LoRA {mode}: {what} ({parts})"


# ------------------------------------------------------------------------------------------------ live modules


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a ``peft`` LoRA layer (a ``base_layer`` plus ``lora_A``/``lora_B`` dicts and a
    ``scaling`` dict), by duck typing."""
    return (isinstance(getattr(module, "base_layer", None), nn.Module)
            and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "scaling", None), dict))


def base_layer(module: nn.Module) -> nn.Module:
    """The innermost ``base_layer`` of a (possibly nested) LoRA layer."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _active(module: nn.Module) -> list[str]:
    """Names of the adapters the layer computes with (none when adapters are disabled)."""
    if getattr(module, "disable_adapters", False):
        return []
    names = getattr(module, "active_adapters", None) or getattr(module, "active_adapter", None) or []
    return [names] if isinstance(names, str) else list(names)


def live_factors(module: nn.Module, layer_type: str) -> tuple[list[LoraFactors], str]:
    """The active adapters' factors of a ``peft`` LoRA layer, and a note on what could not be merged."""
    out, notes = [], []
    transposed = layer_type in ("embedding", "transformers_conv1d") or bool(getattr(module, "fan_in_fan_out", False))
    magnitudes = getattr(module, "lora_magnitude_vector", {}) or {}
    for name in _active(module):
        if name in module.lora_A:
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
        elif name in (getattr(module, "lora_embedding_A", None) or {}):
            a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
        else:
            continue
        magnitude = magnitudes[name].weight if name in magnitudes else None
        if magnitude is not None and layer_type not in ("linear", "transformers_conv1d"):
            notes.append(f"DoRA magnitude of {name} not applied (only Linear layers): analyzed W + scaling * B @ A")
            magnitude = None
        out.append(LoraFactors(name, a, b, float(module.scaling[name]), transposed, magnitude))
    if getattr(module, "merged", False):
        notes.append("peft merge() had added the adapters into W: base = W - update")
    return out, "; ".join(notes)


class LoraView:
    """``model.named_modules()`` through its ``peft`` LoRA layers (see the module docstring).

    Args:
        model: Any module; without LoRA layers the view changes nothing.
        mode: ``lora=`` (:data:`LORA_MODES`). ``"delta"`` lists the adapted matrices only (none without LoRA
            layers).
    """

    def __init__(self, model: nn.Module, mode: str = "merged") -> None:
        self.mode = check_lora_mode(mode)
        self._drops: list[str] = []  # paths of wrapper levels to drop from names (PeftModel, LoraModel)
        self._layers: set[str] = set()
        self._tuners: set[str] = set()  # layers of other peft tuners (LoHa, IA3, AdaLoRA, ...): merged by peft
        self._hidden: list[str] = []  # subtrees not listed: a LoRA layer's parts, modules_to_save's unused copy
        for path, module in model.named_modules():
            child = _wrapped_child(module)
            if child is not None:
                self._drops.append(f"{path}.{child}" if path else child)
            if is_lora_layer(module) and _layer_type(base_layer(module)) in _MERGEABLE:
                self._layers.add(path)
                self._hidden.append(path)
            elif is_peft_tuner_layer(module) and not self._inside_hidden(path):
                self._tuners.add(path)
                self._hidden.append(path)
            elif _is_modules_to_save(module):
                drops, hidden = _modules_to_save_paths(path, module)
                self._drops.extend(drops)
                self._hidden.extend(hidden)
        self._drops.sort(key=len, reverse=True)
        self.active = bool(self._layers)

    def name(self, path: str) -> str:
        """The base model's name of a module path (wrapper levels dropped).

        Example:
            >>> from torch import nn
            >>> LoraView(nn.Linear(2, 2)).name("fc")
            'fc'
        """
        for drop in self._drops:
            if path == drop or path.startswith(drop + "."):
                parent = drop.rpartition(".")[0]
                path = (parent + path[len(drop):]).strip(".")
        return path

    def target(self, path: str, module: nn.Module) -> nn.Module | None:
        """The module whose weight the entry at ``path`` analyzes: the base layer of a LoRA layer, ``module``
        itself, or ``None`` (inside a LoRA layer, or not adapted under ``"delta"``)."""
        if path in self._layers or path in self._tuners:
            return base_layer(module)
        if self._inside_hidden(path):
            return None
        return None if self.mode == "delta" else module

    def _inside_hidden(self, path: str) -> bool:
        return any(path == hidden or path.startswith(hidden + ".") for hidden in self._hidden)

    def adapt(self, path: str, module: nn.Module, entries: list[Any]) -> list[Any]:
        """The entries of a LoRA layer with the merge attached (``adapt``, ``note``, ``extra`` fields); others
        unchanged."""
        if path in self._tuners:
            return _tuner_entries(module, self.mode, entries)
        if path not in self._layers:
            return entries
        factors, note = live_factors(module, _layer_type(base_layer(module)))
        if not factors:
            note = "; ".join(filter(None, ["LoRA: no active adapter, analyzed W", note]))
            return [dataclasses.replace(e, note=note) for e in entries]
        if "not applied" in note:
            warnings.warn(f"lightning-htsr: {self.name(path)}: {note}", UserWarning, stacklevel=4)
        note = "; ".join(filter(None, [lora_note(factors, self.mode), note]))
        problem = _grouped_problem(base_layer(module))
        if getattr(module, "merged", False) and any(f.magnitude is not None for f in factors):
            problem = problem or "DoRA adapters merged into W by peft merge(): W cannot be split again; unmerge() first"
        mode, merged_in = self.mode, bool(getattr(module, "merged", False))

        def adapt(weight: Tensor, access: WeightAccess, wanted: bool) -> Tensor:
            full = [f.gathered(access) for f in factors]  # collectives for sharded factors: on every rank
            if not wanted:
                return weight
            if merged_in:  # W holds the adapters already
                return weight if mode == "merged" else \
                    _unmerged(weight, full) if mode == "base" else effective_weight(weight, full, "delta")
            return effective_weight(weight, full, mode)

        extra = tuple(t for f in factors for t in f.tensors())
        needed = mode != "base" or merged_in
        return [dataclasses.replace(e, adapt=adapt if needed else None, note=note, extra=extra if needed else (),
                                    problem=e.problem or problem) for e in entries]


def is_peft_tuner_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer of another ``peft`` tuner than the LoRA this module merges itself (LoHa, LoKr,
    IA3, AdaLoRA, VeRA, OFT, BOFT, ...; also LoRA on a base layer :data:`_MERGEABLE` does not cover): a
    ``base_layer`` with a weight, ``merge``/``unmerge`` and ``active_adapters``, by duck typing."""
    base = getattr(module, "base_layer", None)
    return (isinstance(base, nn.Module) and callable(getattr(module, "merge", None))
            and callable(getattr(module, "unmerge", None)) and hasattr(module, "active_adapters")
            and isinstance(getattr(base_layer(module), "weight", None), Tensor)  # not MultiheadAttention's in_proj
            and _layer_type(base_layer(module)) is not None)


def _tuner_kind(module: nn.Module) -> str:
    """``"LOHA"`` for ``peft.tuners.loha.layer.Linear`` (peft's ``peft_type`` spelling), else the class name."""
    parts = type(module).__module__.split(".")
    return parts[2].upper() if parts[:2] == ["peft", "tuners"] and len(parts) > 2 else type(module).__name__


def _tuner_entries(module: nn.Module, mode: str, entries: list[Any]) -> list[Any]:
    """The entries of another tuner's layer: its weights computed by ``peft``'s own ``merge()`` / ``unmerge()`` on a
    copy of the layer (the module is never modified), or a ``problem`` saying why they cannot be."""
    kind, active = _tuner_kind(module), _active(module)
    merged_in = bool(getattr(module, "merged", False))
    if not active and not merged_in:
        return [dataclasses.replace(e, note=f"peft {kind}: no active adapter, analyzed W") for e in entries]
    adapters = ", ".join(active) or "merged"
    what = {"merged": "the merged weight", "delta": "merged weight - W", "base": "the frozen W"}[mode]
    note = f"peft {kind} {mode}: {what}, by peft's merge() ({adapters})"
    if mode == "base" and not merged_in:
        return [dataclasses.replace(e, note=note) for e in entries]
    if any(hasattr(p, "full_tensor") for p in module.parameters()):
        problem = f"peft {kind} layer with sharded weights: not merged (only LoRA layers are merged when sharded)"
        return [dataclasses.replace(e, problem=e.problem or problem, note=note) for e in entries]

    def adapt(weight: Tensor, access: WeightAccess, wanted: bool) -> Tensor:
        if not wanted:  # merged only where analyzed (not in a plan, nor for another rank's matrix)
            return weight
        try:
            base, merged = _peft_weights(module, active, merged_in)
        except Exception as exc:  # noqa: BLE001 - whatever peft raises, the row says why and the run goes on
            raise AdaptError(f"peft {kind}: merge() failed ({type(exc).__name__}: {exc})") from None
        if mode == "merged":
            return merged
        return base if mode == "base" else merged - base

    extra = tuple(p for n, p in module.named_parameters() if not n.startswith("base_layer."))
    return [dataclasses.replace(e, adapt=adapt, note=note, extra=extra) for e in entries]


def _peft_weights(module: nn.Module, active: list[str], merged_in: bool) -> tuple[Tensor, Tensor]:
    """``(W, merged W)`` of a ``peft`` tuner layer in float32 at least (a bf16 merge would round small updates
    away), from ``merge()`` (or ``unmerge()`` when merged) on a copy of the layer."""
    twin = copy.deepcopy(module)
    weight = base_layer(twin).weight
    if weight.is_floating_point() and weight.dtype in (torch.float16, torch.bfloat16):
        twin = twin.float()
    with torch.no_grad():
        before = base_layer(twin).weight.detach().clone()
        if merged_in:
            twin.unmerge()
            return base_layer(twin).weight.detach(), before
        twin.merge(adapter_names=active)
        return before, base_layer(twin).weight.detach()


def _is_modules_to_save(module: nn.Module) -> bool:
    """A ``peft`` ``ModulesToSaveWrapper``: the original module and a trained copy per adapter."""
    return isinstance(getattr(module, "original_module", None), nn.Module) and \
        isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict)


def _modules_to_save_paths(path: str, module: nn.Module) -> tuple[list[str], list[str]]:
    """``(drops, hidden)`` of a ``modules_to_save`` wrapper: the copy in use is named as the module it replaces
    (``<path>.modules_to_save.<adapter>`` -> ``<path>``), the other copies are not listed."""
    active = [name for name in _active(module) if name in module.modules_to_save][:1]
    if not active:
        return [f"{path}.original_module"], [f"{path}.modules_to_save"]
    hidden = [f"{path}.original_module"] + [f"{path}.modules_to_save.{name}" for name in module.modules_to_save
                                             if name != active[0]]
    return [f"{path}.modules_to_save.{active[0]}", f"{path}.modules_to_save"], hidden


def _unmerged(weight: Tensor, factors: list[LoraFactors]) -> Tensor:
    """The frozen ``W`` of a weight that peft's ``merge()`` had added the (plain LoRA) updates into."""
    return weight.to(_compute_dtype(weight)) - effective_weight(weight, factors, "delta")


def _is_tuner(module: Any) -> bool:
    """A ``peft`` tuner (``LoraModel``): it lists the modules it adapted and wraps the model as ``.model``."""
    return hasattr(module, "targeted_module_names") and isinstance(getattr(module, "model", None), nn.Module)


def _wrapped_child(module: nn.Module) -> str | None:
    """The child whose name ``merge_and_unload()`` drops: a ``PeftModel``'s ``base_model`` (the tuner), a tuner's
    ``model``."""
    if hasattr(module, "peft_config") and _is_tuner(getattr(module, "base_model", None)):
        return "base_model"
    return "model" if _is_tuner(module) else None


def _layer_type(module: nn.Module) -> str | None:
    from .matrix import layer_type_of

    return layer_type_of(module)


def _grouped_problem(module: nn.Module) -> str | None:
    groups = int(getattr(module, "groups", 1) or 1)
    return f"LoRA on a grouped convolution (groups={groups}) cannot be merged (peft cannot either)" \
        if groups > 1 else None


# ------------------------------------------------------------------------------------------------ on disk

_FACTOR = re.compile(r"^(?P<path>.+?)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$|"
                     r"^(?P<epath>.+?)\.(?P<ekind>lora_embedding_A|lora_embedding_B)(?:\.(?P<eadapter>[^.]+))?$")
_DORA = re.compile(r"\.lora_magnitude_vector(\.|$)")
_PEFT_PREFIX = "base_model.model."

#: ``adapter_config.json`` keys of peft's ``LoraConfig`` (0.21) and ``PeftConfig``; others are refused.
KNOWN_CONFIG_KEYS = frozenset({
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path", "bias",
    "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
    "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
    "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern",
    "revision", "runtime_config", "target_modules", "target_parameters", "task_type", "trainable_token_indices",
    "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config",
})
#: Keys that change the weights in ways not merged here: refused unless empty or false.
_UNSUPPORTED_KEYS = ("use_dora", "layer_replication", "target_parameters", "trainable_token_indices",
                     "alora_invocation_tokens", "use_bdlora")


def base_name(key: str) -> str:
    """A ``peft`` tensor name as the merged model names it (``base_model.model.`` and ``.base_layer`` removed).

    Example:
        >>> base_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        'model.layers.0.self_attn.q_proj.weight'
    """
    key = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    return key.replace(".base_layer.", ".")


@dataclass
class AdapterFiles:
    """A LoRA adapter's scaling and factors, keyed by the base tensor they update (``<path>.weight``).

    Attributes:
        factors: ``{base tensor name: [LoraFactors, ...]}``.
        replaced: Whole tensors the adapter carries (``modules_to_save``, embeddings it adapted), by base name.
        source: Where it was read from, for messages.
    """

    factors: dict[str, list[LoraFactors]] = field(default_factory=dict)
    replaced: dict[str, Tensor] = field(default_factory=dict)
    source: str = "adapter"

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Every adapted or replaced tensor exists in the base with a matching shape, else :class:`CheckpointError`.

        Args:
            shapes: The base checkpoint's tensor shapes by name.
        """
        for name, tensor in self.replaced.items():
            if name not in shapes:
                raise CheckpointError(f"{self.source}: carries {name!r}, which the base checkpoint does not have")
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise CheckpointError(f"{self.source}: {name!r} has shape {tuple(tensor.shape)}, the base's is "
                                      f"{tuple(shapes[name])}")
        for name, factors in self.factors.items():
            if name not in shapes:
                raise CheckpointError(f"{self.source}: adapts {name!r}, which the base checkpoint does not have "
                                      "(a different base model, or one whose checkpoint names its weights otherwise "
                                      "than the model in memory, as transformers 5 does for a few architectures: "
                                      "then load both with peft and analyze the model)")
            for f in factors:
                try:
                    lora_delta(dataclasses.replace(f, A=torch.empty(f.A.shape, device="meta"),
                                                   B=torch.empty(f.B.shape, device="meta")), shapes[name],
                               torch.float32)
                except RuntimeError:
                    raise CheckpointError(
                        f"{self.source}: the LoRA factors of {name!r} (A {tuple(f.A.shape)}, B {tuple(f.B.shape)}) "
                        f"do not fit its base shape {tuple(shapes[name])} (a different base model?)") from None

    def note(self, name: str, mode: str) -> str:
        """The ``note`` of the matrix read from base tensor ``name`` (empty when not adapted)."""
        factors = self.factors.get(name)
        return lora_note(factors, mode) if factors else ""

    def keeps(self, name: str, mode: str) -> bool:
        """Whether a base tensor is listed under ``mode`` (``"delta"``: adapted ones only)."""
        return mode != "delta" or name in self.factors

    def apply(self, items: Iterable[tuple[str, Tensor]], mode: str) -> Iterator[tuple[str, Tensor]]:
        """The base tensors with the adapter applied, one at a time (memory: the tensor at hand).

        Args:
            items: ``(name, tensor)`` of the base checkpoint.
            mode: :data:`LORA_MODES`.

        Yields:
            ``(name, tensor)``: adapted tensors merged per ``mode``, the others as they are (dropped under
            ``"delta"``).
        """
        for name, tensor in items:
            if not self.keeps(name, mode):
                continue
            tensor = self.replaced.get(name, tensor)
            factors = self.factors.get(name)
            yield name, effective_weight(tensor, factors, mode) if factors else tensor


def _scaling(config: Mapping[str, Any], path: str) -> tuple[int, float]:
    """``(r, scaling)`` of one adapted module, with ``rank_pattern``/``alpha_pattern`` as peft matches them."""

    def pattern(patterns: Mapping[str, Any], default: Any) -> Any:
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    r = int(pattern(config.get("rank_pattern") or {}, config.get("r", 8)))
    alpha = float(pattern(config.get("alpha_pattern") or {}, config.get("lora_alpha", 8)))
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json``, checked: a LoRA config with known keys and nothing this module cannot merge."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the adapter config ({err.strerror or err})") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object (peft's LoraConfig)")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":  # before the keys: other tuners have other keys
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters merge "
                              "from files (load it with peft and analyze the model: other tuners merge live)")
    unknown = sorted(set(config) - KNOWN_CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unknown adapter config key(s) {', '.join(unknown)} (known: peft 0.21's "
                              "LoraConfig); refusing to guess what they change")
    for key in _UNSUPPORTED_KEYS:
        if config.get(key):
            raise CheckpointError(f"{path}: {key}={config[key]!r} is not supported (plain LoRA only)")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive number, got {value!r}")
    return config


def state_dict_adapter(tensors: Mapping[str, Tensor], config: Mapping[str, Any], *,
                       source: str = "adapter") -> tuple[AdapterFiles, dict[str, Tensor]]:
    """Split ``peft`` tensors into LoRA factors (by base tensor name) and the rest (renamed to base names).

    Accepts both the names of a saved adapter (``base_model.model.<path>.lora_A.weight``) and of a live
    ``peft_model.state_dict()`` (``<path>.lora_A.<adapter>.weight``, ``<path>.base_layer.weight``).

    Args:
        tensors: The tensors.
        config: ``adapter_config.json``'s content (``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out``,
            ``rank_pattern``, ``alpha_pattern``).
        source: For messages.

    Returns:
        ``(adapter, others)``: the adapter's factors and the non-LoRA tensors by base name.

    Raises:
        CheckpointError: A factor without its partner, a rank that disagrees with the config, DoRA tensors.
    """
    pairs: dict[tuple[str, str], dict[str, Tensor]] = {}
    embeddings: set[tuple[str, str]] = set()
    others: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if _DORA.search(key):
            raise CheckpointError(f"{source}: DoRA magnitude {key!r}: DoRA adapters are not supported on disk")
        match = _FACTOR.match(key)
        if match is None:
            others[base_name(key)] = value
            continue
        where = (base_name(match["path"] or match["epath"]), match["adapter"] or match["eadapter"] or "default")
        pairs.setdefault(where, {})[(match["kind"] or match["ekind"])[-1]] = value
        if match["ekind"]:
            embeddings.add(where)
    names = sorted({name for _, name in pairs})
    if len(names) > 1:
        raise CheckpointError(f"{source}: factors of several adapters ({', '.join(names)}); one adapter config "
                              "gives one scaling: keep one adapter's tensors")
    adapter = AdapterFiles(source=source)
    for (path, name), found in pairs.items():
        if "A" not in found or "B" not in found:
            raise CheckpointError(f"{source}: {path}: lora_{'B' if 'A' in found else 'A'} is missing")
        r, scaling = _scaling(config, path)
        if found["A"].shape[0] != r or found["B"].shape[1] != r:
            raise CheckpointError(f"{source}: {path}: factors of rank {found['A'].shape[0]}/{found['B'].shape[1]}, "
                                  f"the config says r={r}")
        transposed = (path, name) in embeddings or bool(config.get("fan_in_fan_out"))
        adapter.factors.setdefault(f"{path}.weight", []).append(LoraFactors(name, found["A"], found["B"], scaling,
                                                                            transposed))
    return adapter, others


def read_adapter(directory: str | os.PathLike[str]) -> AdapterFiles:
    """Read a ``peft`` LoRA adapter saved with ``save_pretrained``: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (or ``adapter_model.bin``).

    Args:
        directory: The adapter directory (or its ``adapter_config.json``).

    Returns:
        The factors by base tensor name; tensors the adapter carries whole (``modules_to_save``, the embeddings
        peft saves with an adapted embedding) in ``replaced``.

    Raises:
        CheckpointError: Missing or invalid files, unknown config keys, unsupported adapter kinds, unpaired
            factors or ranks that disagree with the config (one line naming the file).
    """
    from .checkpoints import load_checkpoint

    root = Path(directory)
    root = root.parent if root.name == "adapter_config.json" else root
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such adapter directory (expected adapter_config.json and "
                              "adapter_model.safetensors)")
    config_path = root / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{root}: no adapter_config.json in the adapter directory")
    config = _read_config(config_path)
    files = [root / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (root / n).is_file()]
    if not files:
        raise CheckpointError(f"{root}: no adapter_model.safetensors (or adapter_model.bin) in the adapter directory")
    tensors = load_checkpoint(files[0])
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise CheckpointError(f"{files[0]}: expected a flat dict of tensors")
    adapter, others = state_dict_adapter(tensors, config, source=str(files[0]))
    if not adapter.factors:
        raise CheckpointError(f"{files[0]}: no LoRA factors (lora_A/lora_B) in the adapter")
    adapter.replaced = others
    return adapter


def state_dict_lora(state_dict: Mapping[str, Any], mode: str,
                    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
                    ) -> tuple[Iterable[tuple[str, Tensor]], dict[str, tuple[int, ...]], bool]:
    """A state dict's tensors as :func:`~lightning_htsr.analyze_state_dict` reads them, LoRA factors merged.

    Args:
        state_dict: ``{name: tensor}``; without LoRA factors it passes through unchanged.
        mode: :data:`LORA_MODES`.
        config: The adapter config (a dict, ``adapter_config.json`` or its directory): the scaling.

    Returns:
        ``(items, shapes, tie)``: ``(name, tensor)`` pairs (merged one at a time), every listed tensor's shape,
        and whether tied tensors may be recognized by storage (not for merged tensors, which are freed).

    Raises:
        ValueError: LoRA factors without ``config`` under ``"merged"``/``"delta"``.
        CheckpointError: An invalid config or factors that do not fit.
    """
    tensors = {str(k): v for k, v in state_dict.items() if isinstance(v, Tensor)}
    if not any(_FACTOR.match(k) or _DORA.search(k) for k in tensors):
        return tensors.items(), {k: tuple(v.shape) for k, v in tensors.items()}, True
    if config is None:
        if mode != "base":
            raise ValueError("the state dict holds LoRA factors (lora_A/lora_B) but not their scaling: pass "
                             "adapter_config= (the adapter's adapter_config.json) to merge them, or lora='base'")
        base = {base_name(k): v for k, v in tensors.items() if not (_FACTOR.match(k) or _DORA.search(k))}
        return base.items(), {k: tuple(v.shape) for k, v in base.items()}, True
    if not isinstance(config, Mapping):
        path = Path(config)
        config = _read_config(path / "adapter_config.json" if path.is_dir() else path)
    adapter, others = state_dict_adapter(tensors, config, source="state_dict")
    shapes = {k: tuple(v.shape) for k, v in others.items()}
    adapter.check(shapes)
    return adapter.apply(others.items(), mode), {k: s for k, s in shapes.items() if adapter.keeps(k, mode)}, False
