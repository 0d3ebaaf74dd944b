"""Stage 0 of the offline pipeline: checkpoint files -> named tensors, read one at a time.

:func:`open_checkpoint` accepts a file, several files, a directory in the Hugging Face layout
(``model.safetensors.index.json`` + ``*.safetensors`` shards, ``pytorch_model.bin.index.json`` +
``pytorch_model-*.bin`` shards, or a single ``model.safetensors``/``pytorch_model.bin``) or an ``*.index.json``
file. Opening reads only headers (names, shapes, dtypes); :meth:`Checkpoint.tensors` then streams the tensors:

* ``.safetensors``: ``safetensors.safe_open`` + ``get_tensor``, one tensor at a time.
* ``torch.save`` zip files (``.pt``, ``.bin``, Lightning ``.ckpt``): ``torch.load(mmap=True, weights_only=True)``,
  so a tensor's bytes are paged in only when it is read.
* TorchScript archives: ``torch.jit.load`` (deserializes the TorchScript module; runs neither its ``forward`` nor
  any Python code from the file), then its ``state_dict()``.
* Legacy (non-zip) ``torch.save`` files cannot be memory-mapped: they are loaded whole.

Both memory-mapping readers keep the pages they touched resident until the file is unmapped, so a reader is
reopened after every :data:`READ_BUDGET` bytes: peak memory stays bounded by the budget plus the tensor at hand,
not by the file. Nothing here raises anything but :class:`CheckpointError` (one line naming the file and what is
wrong) for a bad input.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "READ_BUDGET",
    "Checkpoint",
    "CheckpointError",
    "FileMap",
    "TensorInfo",
    "open_checkpoint",
]

#: Bytes read through one memory map before it is dropped and reopened: the pages a map has touched stay resident
#: until it is unmapped, so this bounds them. Reopening costs a header parse (safetensors) or unpickling the
#: tensor index (torch zip files), milliseconds against the seconds a large matrix's eigenvalues take.
READ_BUDGET = 64 * 2**20

#: Keys under which checkpoints nest the state dict, tried in this order: Lightning and most trainers
#: (``state_dict``), PyTorch tutorials (``model_state_dict``), Resemblyzer (``model_state``), fairseq / timm / YOLO
#: (``model``), DeepSpeed (``module``), BasicSR / Real-ESRGAN (``params``, ``params_ema``), others (``net``).
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model_state", "model", "module", "params",
                                    "params_ema", "net", "network")

#: Prefixes added by wrappers (``DistributedDataParallel``, ``torch.compile``), removed when every key has them.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_KINDS = ("a Lightning .ckpt, a torch.save'd state_dict (.pt, .pth, .bin), a TorchScript archive, a .safetensors "
          "file, an *.index.json or a Hugging Face model directory")

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_SHARD_GLOBS = ("*.safetensors", "pytorch_model*.bin")

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message is one line naming the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint's header says about one tensor (nothing is read).

    Attributes:
        name: Name in the merged state dict (wrapper prefixes removed).
        key: Key inside its file (inside the nested state dict for ``torch.save`` files).
        shape: Shape.
        dtype: Stored dtype.
        file: The file holding it.
    """

    name: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        """Stored size in bytes."""
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * (torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else
                        torch.iinfo(self.dtype).bits // 8 if self.dtype != torch.bool else 1)


# ------------------------------------------------------------------------------------------------ one file


def _sniff(path: Path) -> str:
    """``"zip"``, ``"torchscript"``, ``"safetensors"``, ``"text"`` (printable ASCII: not a checkpoint) or ``"pickle"``
    (anything else), by content."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "zip"  # torch.load will say what is wrong
        return "torchscript" if any(n.endswith("/constants.pkl") or "/code/" in n for n in names) else "zip"
    if len(head) >= 10 and head[8:9] == b"{":
        header_size = int.from_bytes(head[:8], "little")
        if 0 < header_size <= path.stat().st_size - 8:
            return "safetensors"
    if path.suffix.lower() == ".safetensors":
        return "safetensors"
    if head and not head.startswith(b"\x80") and all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        return "text"  # a pickle (torch.save's legacy format) starts with the PROTO opcode 0x80
    return "pickle"


def _short_error(err: BaseException, limit: int = 240) -> str:
    """One line describing a load error, without torch's multi-paragraph advice."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if len(line) > 120 and ". " in line:  # torch appends advice after the first sentence
        line = line.split(". ", 1)[0]
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _check_file(path: Path) -> str:
    """The file's kind (see :func:`_sniff`), after checking it exists, is a file and is not empty."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: the file is empty")
        kind = _sniff(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the file ({err.strerror or err})") from None
    if kind == "text":
        raise CheckpointError(f"{path}: a text file, not a checkpoint; expected {_KINDS}")
    return kind


def _torch_load(path: Path, kind: str, trust_pickle: bool) -> Any:
    """``torch.load`` on the CPU (memory-mapped for zip files, ``weights_only`` unless trusted)."""
    try:
        if kind == "torchscript":
            return torch.jit.load(str(path), map_location="cpu")
        with warnings.catch_warnings():  # a legacy pickle's protocol warning: the error (if any) says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found and not trust_pickle:
            raise CheckpointError(
                f"{path}: refusing to unpickle: the checkpoint contains Python objects other than tensors and plain "
                f"containers (first: {found.group(1)}), and unpickling them can run arbitrary code from the file. "
                "If you trust its source, pass --trust-pickle") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_short_error(err)}); expected {_KINDS}; "
                              "the file may be truncated or corrupt") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to load the checkpoint") from None
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, KeyError, ... on bad files
        what = "TorchScript archive" if kind == "torchscript" else "checkpoint"
        raise CheckpointError(f"{path}: not a readable {what} ({_short_error(err)}); expected {_KINDS}; "
                              "the file may be truncated or corrupt") from None


def load_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """Load a whole checkpoint file on the CPU without running Python code from it (unless trusted).

    Args:
        path: The file (``.safetensors``, ``torch.save`` zip or legacy pickle, TorchScript archive).
        trust_pickle: Allow unpickling arbitrary Python objects (only for files from a trusted source).

    Returns:
        Whatever the file holds (normally a ``dict``; a TorchScript archive gives its ``ScriptModule``).

    Raises:
        CheckpointError: When the file is missing, a directory, unreadable, empty, corrupt, or needs
            ``trust_pickle``.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; expected a checkpoint file")
    kind = _check_file(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - SafetensorError and friends: the file is damaged
            raise _bad_safetensors(path, err) from None
    return _torch_load(path, kind, trust_pickle)


def _bad_safetensors(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file ({_short_error(err)}); the file may be truncated "
                           "or corrupt")


def _describe(obj: Any) -> str:
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}" if type(obj).__module__ != "builtins" else \
        f"a {type(obj).__name__}"


def _has_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values())


def _as_mapping(obj: Any) -> Any:
    """Modules (``torch.save(model)``, TorchScript) become their ``state_dict()``."""
    return obj.state_dict() if isinstance(obj, (nn.Module, torch.jit.ScriptModule)) else obj


def _nested(obj: Mapping[Any, Any]) -> Mapping[Any, Any] | None:
    """The state dict nested under the first of :data:`STATE_DICT_KEYS` that holds tensors (or nests further)."""
    for key in STATE_DICT_KEYS:
        inner = _as_mapping(obj.get(key))
        if isinstance(inner, Mapping) and (_has_tensors(inner) or
                                           any(isinstance(inner.get(k), Mapping) for k in STATE_DICT_KEYS)):
            return inner
    return None


def extract_state_dict(obj: Any, path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The ``{name: tensor}`` mapping inside a loaded checkpoint.

    Accepts a state dict, a dict nesting one under any of :data:`STATE_DICT_KEYS` (several levels deep), and a
    whole module (``torch.save(model)`` with ``--trust-pickle``, or a TorchScript archive).

    Args:
        obj: What :func:`load_checkpoint` returned.
        path: The file, for messages.

    Returns:
        The tensors by name (non-tensor entries dropped; wrapper prefixes kept, see :func:`open_checkpoint`).

    Raises:
        CheckpointError: When ``obj`` is not a mapping or holds no tensors.
    """
    obj = _as_mapping(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: unsupported content: {_describe(obj)}; expected a state_dict (a dict of "
                              "tensors), a Lightning checkpoint or a safetensors file")
    for _ in range(4):
        inner = _nested(obj)
        if inner is None:
            break
        obj = inner
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        raise CheckpointError(f"{path}: unsupported content: a dict without tensors (keys: {keys or 'none'}); "
                              f"expected a state_dict, or a dict holding one under "
                              f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}")
    return tensors


# ------------------------------------------------------------------------------------------------ readers


class _SafetensorsFile:
    """A ``.safetensors`` file: header via ``safe_open``, tensors via ``get_tensor``."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self._safe_open = safe_open
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            self.shapes = {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype())
                           for k in handle.keys()}
        except Exception as err:  # noqa: BLE001 - SafetensorError: damaged header or size mismatch
            raise _bad_safetensors(path, err) from None

    def infos(self) -> list[TensorInfo]:
        """Names, shapes and dtypes from the header."""
        return [TensorInfo(k, k, shape, _SAFETENSORS_DTYPES.get(dtype, torch.uint8), self.path)
                for k, (shape, dtype) in self.shapes.items()]

    def open(self) -> Callable[[str], Tensor]:
        """A getter over a fresh memory map (dropped with the getter)."""
        handle = self._safe_open(str(self.path), framework="pt", device="cpu")
        return handle.get_tensor


class _TorchFile:
    """A ``torch.save`` file (zip: memory-mapped, reopened per budget; legacy pickle: loaded once) or a
    TorchScript archive."""

    def __init__(self, path: Path, kind: str, trust_pickle: bool) -> None:
        self.path, self.kind, self.trust_pickle = path, kind, trust_pickle
        tensors = self._load()
        self._kept = tensors if kind != "zip" else None  # nothing to gain by reloading what is not mapped
        self._infos = [TensorInfo(k, k, tuple(v.shape), v.dtype, path) for k, v in _untied(tensors).items()]

    def _load(self) -> dict[str, Tensor]:
        return extract_state_dict(_torch_load(self.path, self.kind, self.trust_pickle), self.path)

    def infos(self) -> list[TensorInfo]:
        """Names, shapes and dtypes (tied tensors listed once, under their first name)."""
        return self._infos

    def open(self) -> Callable[[str], Tensor]:
        """A getter over a fresh memory map (zip) or the loaded tensors."""
        return (self._kept if self._kept is not None else self._load()).__getitem__


def _untied(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop tensors sharing storage with an earlier one (tied weights are analyzed once, under the first name)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for key, value in tensors.items():
        tie = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and tie in seen:
            continue
        seen.add(tie)
        out[key] = value
    return out


def _open_file(path: Path, trust_pickle: bool) -> _SafetensorsFile | _TorchFile:
    kind = _check_file(path)
    return _SafetensorsFile(path) if kind == "safetensors" else _TorchFile(path, kind, trust_pickle)


# ------------------------------------------------------------------------------------------------ many files


def _index_files(index: Path) -> list[Path]:
    """The shard files named by a Hugging Face ``*.index.json`` (``weight_map`` values), in order of first use."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(str(v) for v in weight_map.values()))
    except OSError as err:
        raise CheckpointError(f"{index}: cannot read the file ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a checkpoint index (a JSON object with a 'weight_map' of tensor name "
                              f"-> shard file expected; {_short_error(err)})") from None
    if not names:
        raise CheckpointError(f"{index}: the index's weight_map is empty")
    return sorted((index.parent / n for n in names), key=lambda p: p.name)


def _directory_files(directory: Path) -> list[Path]:
    """The checkpoint files of a model directory: an index's shards, a single file, or every shard found."""
    for name in _INDEX_FILES:
        if (directory / name).is_file():
            return _index_files(directory / name)
    for name in _SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name]
    for pattern in _SHARD_GLOBS:
        found = sorted(directory.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{directory}: no checkpoint in this directory (looked for {', '.join(_INDEX_FILES)}, "
                          f"{', '.join(_SINGLE_FILES)}, {', '.join(_SHARD_GLOBS)})")


def _expand(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(_directory_files(path))
        elif path.name.endswith(".index.json"):
            files.extend(_index_files(path))
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def _strip_prefix(infos: list[TensorInfo]) -> list[TensorInfo]:
    for prefix in _WRAPPER_PREFIXES:
        if infos and all(i.name.startswith(prefix) for i in infos):
            return [TensorInfo(i.name[len(prefix):], i.key, i.shape, i.dtype, i.file) for i in infos]
    return infos


class Checkpoint:
    """The tensors of one or more checkpoint files: headers read, values streamed on demand.

    Args:
        files: Opened files, in reading order.
        read_budget: Bytes read through one memory map before it is reopened.
    """

    def __init__(self, files: Sequence[_SafetensorsFile | _TorchFile], read_budget: int = READ_BUDGET) -> None:
        self.files = list(files)
        self.read_budget = read_budget
        infos: dict[str, TensorInfo] = {}
        for file in self.files:
            for info in file.infos():
                infos.setdefault(info.name, info)  # a name in two shards: the first wins
        self.infos = _strip_prefix(list(infos.values()))

    @property
    def paths(self) -> list[Path]:
        """The files."""
        return [f.path for f in self.files]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by name."""
        return {i.name: i.shape for i in self.infos}

    def tensors(self, wanted: Callable[[TensorInfo], bool] | None = None) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` one at a time, file by file; only tensors passing ``wanted`` are read.

        Args:
            wanted: Filter on the header (e.g. only weight matrices, only this rank's share).

        Yields:
            CPU tensors in their stored dtype; drop each before asking for the next to keep memory bounded.

        Raises:
            CheckpointError: When a file turns out to be damaged while reading.
        """
        for file in self.files:
            todo = [i for i in self.infos if i.file == file.path and (wanted is None or wanted(i))]
            yield from self._read(file, todo)

    def file_map(self, path: Path) -> FileMap:
        """A :class:`FileMap` of one of the files, for reading its tensors by name in any order."""
        return FileMap(next(f for f in self.files if f.path == path), self.read_budget)

    def _read(self, file: _SafetensorsFile | _TorchFile, todo: Iterable[TensorInfo]) -> Iterator[tuple[str, Tensor]]:
        mapped = FileMap(file, self.read_budget)
        for info in todo:
            tensor = mapped.read(info)
            yield info.name, tensor
            del tensor


class FileMap:
    """Reads one checkpoint file's tensors through one memory map, reopened after ``read_budget`` bytes (a map keeps
    the pages it touched resident); a damaged file is a :class:`CheckpointError` naming it."""

    def __init__(self, file: _SafetensorsFile | _TorchFile, read_budget: int) -> None:
        self.file, self.read_budget = file, read_budget
        self._get: Callable[[str], Tensor] | None = None
        self._used = 0

    def read(self, info: TensorInfo) -> Tensor:
        """The tensor of ``info`` (a tensor of this file) on the CPU, in its stored dtype."""
        try:
            if self._get is None or self._used > self.read_budget:
                self._get, self._used = None, 0  # drop the old map first
                self._get = self.file.open()
            tensor = self._get(info.key)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors / torch errors on a damaged file
            raise CheckpointError(f"{self.file.path}: cannot read tensor {info.key!r} ({_short_error(err)}); the "
                                  "file may be truncated or corrupt") from None
        self._used += info.nbytes
        return tensor


def open_checkpoint(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                    trust_pickle: bool = False, read_budget: int = READ_BUDGET) -> Checkpoint:
    """Open a checkpoint for streaming: files, a model directory or an ``*.index.json``; headers only.

    Args:
        paths: One path or several (their tensors are merged into one checkpoint).
        trust_pickle: Allow ``torch.save`` files that pickle arbitrary Python objects (runs code from the file).
        read_budget: Bytes read through one memory map before it is reopened.

    Returns:
        The :class:`Checkpoint`.

    Raises:
        CheckpointError: When a path is missing, empty, damaged or holds no tensors.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = _expand([Path(p) for p in paths])
    if not files:
        raise CheckpointError("no checkpoint given")
    return Checkpoint([_open_file(f, trust_pickle) for f in files], read_budget)
