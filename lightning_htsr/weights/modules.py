"""Stage 1 of the pipeline for a live model: an ``nn.Module`` -> its weight matrices, named by dotted module path.

Which modules have weight matrices (:func:`~lightning_htsr.weights.matrix.layer_type_of`), how each one's parameters
split into matrices (attention ``in_proj`` into q/k/v, recurrent weights per gate, convolutions per kernel position),
wrapper names removed from paths, ``peft`` LoRA layers seen through :mod:`~lightning_htsr.weights.adapters`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from torch import Tensor, nn

__all__ = ["clean_name", "weight_matrices"]

from .adapters import LoraView
from .matrix import (
    QKV,
    RNN_GATES,
    Entry,
    Selection,
    WeightAccess,
    WeightMatrix,
    conv_builder,
    expert_note,
    flat_view,
    is_expert_stack,
    join_name,
    layer_type_of,
    matrices_of,
    per_expert,
    rank_problem,
    single_slice,
    split_rows,
)
from .state_dict import gate_counts, state_dict_entry


def _type_selected(layer_type: str, module: nn.Module, layer_types: Sequence[str | type] | str | type | None) -> bool:
    if layer_types is None:
        return True
    if isinstance(layer_types, (str, type)):
        layer_types = [layer_types]
    for t in layer_types:
        if isinstance(t, type):
            if isinstance(module, t):
                return True
        elif t == layer_type or t.lower() == type(module).__name__.lower():
            return True
    return False


def _entries(name: str, module: nn.Module, layer_type: str) -> list[Entry]:
    """How to turn this module's parameters into (suffix, stack) pairs."""
    module_type = type(module).__name__

    def entry(entry_name: str, param: Tensor | None, build: Callable[[Tensor], list[tuple[str, Tensor]]]) -> Entry:
        # a parameter shared by several modules (tied embeddings) is one weight: keyed by identity
        return Entry(entry_name, layer_type, module_type, param, build, id(param) if param is not None else None)

    if layer_type == "other" and module.weight.dim() != 2:
        return [Entry(name or "weight", layer_type, module_type, module.weight, flat_view, None,
                       rank_problem(module.weight))]
    if layer_type in ("linear", "embedding", "other", "transformers_conv1d"):
        return [entry(name or "weight", module.weight, single_slice)]
    if layer_type == "quantized_linear":  # weight() builds a new tensor per call: no identity to tie by
        return [Entry(name or "weight", layer_type, module_type, module.weight(), single_slice, None)]
    if layer_type.startswith("conv"):
        return [entry(name or "weight", module.weight, conv_builder(int(getattr(module, "groups", 1))))]
    if layer_type == "attention_in_proj":
        if module.in_proj_weight is not None:
            return [entry(join_name(name, "in_proj"), module.in_proj_weight, split_rows(QKV))]
        return [entry(join_name(name, f"in_proj.{s}"), getattr(module, f"{s}_proj_weight"), single_slice) for s in QKV]
    if layer_type in ("lstm", "gru", "rnn"):
        gates = RNN_GATES.get(layer_type.upper())
        names = module._flat_weights_names if isinstance(module, nn.RNNBase) else ("weight_ih", "weight_hh")
        return [
            # projections (LSTM proj_size, weight_hr) are not gated
            entry(join_name(name, pname), getattr(module, pname),
                  split_rows(gates) if gates is not None and not pname.startswith("weight_hr") else single_slice)
            for pname in names
            if pname.startswith("weight")
        ]
    if layer_type == "script":
        return _script_entries(name, module)
    return []


def _expert_entries(name: str, module: nn.Module) -> list[Entry]:
    """A module's own mixture-of-experts stacks (:func:`~lightning_htsr.weights.matrix.is_expert_stack`), one
    matrix per expert: the experts of ``transformers``' MoE blocks, which have no ``weight`` of their own."""
    module_type = type(module).__name__
    return [Entry(join_name(name, pname), "experts", module_type, param, per_expert, id(param),
                  note=expert_note(pname))
            for pname, param in module._parameters.items()
            if param is not None and is_expert_stack(join_name(name, pname), param.shape)]


def _script_entries(name: str, module: nn.Module) -> list[Entry]:
    """A TorchScript module's own parameters, read by name and shape like a state dict (its Python class is gone;
    ``original_name`` says what it was)."""
    params = {join_name(name, key): value for key, value in module.named_parameters(recurse=False)}
    gates = gate_counts({key: tuple(value.shape) for key, value in params.items()})
    module_type = str(getattr(module, "original_name", type(module).__name__))
    entries = [state_dict_entry(key, value, gates, id(value), module_type) for key, value in params.items()]
    return [e for e in entries if e is not None]


#: Wrapper names that distributed strategies and ``torch.compile`` insert into module paths.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "_forward_module.")


def clean_name(name: str) -> str:
    """A module path without the wrapper parts of :data:`_WRAPPER_PARTS` (FSDP, activation checkpointing,
    ``torch.compile``, Lightning's forward wrapper)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    for part in _WRAPPER_PARTS:  # a wrapper at the very end of a path has no trailing dot
        if name.endswith(part[:-1]):
            name = name[: -len(part) + 1].rstrip(".")
    return name


def weight_matrices(
    model: nn.Module,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    layer_types: Sequence[str | type] | str | type | None = None,
    min_evals: int = 0,
    max_evals: int | None = None,
    access: WeightAccess | None = None,
    select: Callable[[str], bool] | None = None,
    materialize: bool = True,
    lora: str = "merged",
) -> list[WeightMatrix]:
    """List the weight matrices of ``model`` in ``named_modules()`` order.

    Args:
        model: Any ``nn.Module``.
        include: Regex (or list of regexes) a matrix name must match (``re.search``) to be kept.
        exclude: Regex (or list) whose matches are dropped.
        layer_types: Keep only these layer types: :data:`LAYER_TYPES` strings, class names (``"Linear"``) or
            module classes (one or a list).
        min_evals: Matrices with fewer pooled eigenvalues are kept as skipped records.
        max_evals: Matrices with more pooled eigenvalues are kept as skipped records (``None``: no limit).
        access: How parameters are read (default :class:`WeightAccess`: DTensors are gathered with
            ``full_tensor()``, a collective every rank must run).
        select: Keep only matrices whose :attr:`WeightMatrix.source` passes (the callback's share of a
            distributed analysis). Sharded parameters are still gathered when not selected, so that every rank
            takes part in every collective.
        materialize: ``False`` lists names and shapes only (``slices`` stays ``None``; no weight is read or
            gathered): a cheap plan.
        lora: A ``peft`` LoRA layer is one matrix named by the base model's path, computed on ``"merged"``
            (``W + scaling * B @ A``, default), ``"delta"`` (the update alone; only adapted matrices are listed) or
            ``"base"`` (the frozen ``W``); see :mod:`lightning_htsr.weights.adapters`.

    Returns:
        One :class:`WeightMatrix` per matrix, skipped ones included. A parameter shared by several modules (tied
        embeddings) appears once, under its first name; the other names are in ``aliases``.

    Example:
        >>> from torch import nn
        >>> mats = weight_matrices(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Conv2d(3, 8, 3)))
        >>> [(m.name, m.layer_type, m.N, m.M, m.num_slices) for m in mats]
        [('0', 'linear', 64, 32, 1), ('2', 'conv2d', 8, 3, 9)]
    """
    access = access or WeightAccess()
    selection = Selection(include, exclude, min_evals, max_evals)
    seen: dict[Hashable, list[WeightMatrix]] = {}
    out: list[WeightMatrix] = []
    view = LoraView(model, lora)
    for module_name, module in model.named_modules():
        target = view.target(module_name, module)  # a LoRA layer's base layer; None inside a LoRA layer
        layer_type = layer_type_of(target) if target is not None else None
        name = clean_name(view.name(module_name))
        if layer_type is None and target is not None:
            layer_type, entries = "experts", _expert_entries(name, target)
        else:
            entries = _entries(name, target, layer_type) if layer_type is not None else []
        if not entries or not _type_selected(layer_type, target, layer_types):
            continue
        entries = view.adapt(module_name, module, entries)
        for entry in entries:
            out.extend(matrices_of(entry, selection, access, select, materialize, seen))
    return out
