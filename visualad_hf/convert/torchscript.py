"""Reading a TorchScript archive (OpenAI's `ViT-L-14-336px.pt`) without running it and without trusting it.

`torch.jit.load` would compile and run the archive's code, and `torch.load(weights_only=True)` refuses such archives,
so `data.pkl` is parsed by a restricted unpickler that knows tensors and nothing else. A crafted file must not be
able to make that cost more memory than the file is worth either, so every size it declares is checked before
anything is decompressed or allocated, in this order:

1. the zip members (`check_zip_members`): their declared uncompressed sizes together stay within the budget
   (`ArchiveLimits.budget`: a few times the file's own size), no member expands more than `max_compression_ratio`,
   stored members are as long as they say, and `data.pkl` is no larger than `max_pickle_bytes`;
2. the pickle's opcodes (read with `pickletools`, nothing executed): memo slots are bounded by the pickle's length
   (CPython's unpickler allocates a memo array as long as the largest index: 8 bytes of pickle could ask for 64 GiB);
3. the unpickled tree, in which storages and tensors are still placeholders: the module tree is at most `max_depth`
   deep, each storage has its data member, at least as long as declared, each tensor view lies inside its storage
   and holds no more elements than it, and the views add up to no more than the budget;
4. only then are the storages read (exactly their declared bytes, in chunks) and the tensors built.

Every refusal is a `ConversionError` naming the file.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import reprlib
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from .common import ConversionError

_DAMAGED = "the file is damaged or not what it claims to be; download it again"


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds a weights archive must respect before any of it is decompressed or allocated.

    PyTorch writes archives uncompressed, so a real file needs about its own size in memory; the defaults allow four
    times that (plus 16 MiB, so small files with small metadata members pass), which no real checkpoint reaches and
    which keeps a crafted archive from costing more than a few times its size.
    """

    max_expansion: float = 4.0  # decompressed bytes (all members, and all tensors built) per byte of file
    slack_bytes: int = 16 << 20
    max_compression_ratio: float = 32.0  # per member; float weights compress by about 1.1
    ratio_exempt_bytes: int = 1 << 20  # members smaller than this may compress better (metadata, constant tables)
    max_pickle_bytes: int = 64 << 20  # `data.pkl` of OpenAI's ViT-L/14@336px is about 100 KB
    max_depth: int = 100  # nesting of module records; OpenAI's CLIP is 6 deep
    max_name_chars: int = 1024  # a tensor's dotted name

    def budget(self, file_size: int) -> int:
        """The most bytes the reader may decompress (and, separately, build as tensors) for a file of this size."""
        return int(self.max_expansion * file_size) + self.slack_bytes


DEFAULT_LIMITS = ArchiveLimits()


class _Refused(Exception):
    """A bound or format rule the archive breaks; the message is the reason (the file name is added later)."""


def _size(value: int) -> str:
    """Bytes for a reader: 1.6 MB, 1.0 GiB."""
    if value >= 1 << 30:
        return f"{value / (1 << 30):.1f} GiB"
    if value >= 1 << 20:
        return f"{value / (1 << 20):.1f} MiB"
    if value >= 1 << 10:
        return f"{value / (1 << 10):.1f} KiB"
    return f"{value} bytes"


# ---------------------------------------------------------------------------------------------------------------------
# 1. Zip members


def check_zip_members(
    archive: zipfile.ZipFile, file_size: int, source: str, limits: ArchiveLimits = DEFAULT_LIMITS
) -> None:
    """Refuse a zip whose members declare more than the file can hold, before any member is read.

    Also used before `torch.load` opens a `torch.save` zip (which the C++ reader would decompress in full).
    """
    budget = limits.budget(file_size)
    total = 0
    for info in archive.infolist():
        if info.file_size < 0 or info.compress_size < 0:
            raise ConversionError(f"{source}: zip member {info.filename!r} declares a negative size; {_DAMAGED}.")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise ConversionError(
                f"{source}: zip member {info.filename!r} is stored uncompressed but declares {info.file_size} bytes "
                f"and occupies {info.compress_size}; {_DAMAGED}."
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limits.ratio_exempt_bytes and ratio > limits.max_compression_ratio:
            raise ConversionError(
                f"{source}: zip member {info.filename!r} would expand from {_size(info.compress_size)} to "
                f"{_size(info.file_size)} (ratio {ratio:.0f}, more than {limits.max_compression_ratio:g}); weights do "
                f"not compress like that, so the file is refused as a decompression bomb ({_DAMAGED})."
            )
        total += info.file_size
    if total > budget:
        raise ConversionError(
            f"{source}: its zip members declare {_size(total)} in total, more than {limits.max_expansion:g} times the "
            f"file's own {_size(file_size)}; the file is refused before anything is decompressed ({_DAMAGED})."
        )


def _archive_prefix(archive: zipfile.ZipFile) -> str | None:
    """The folder holding `data.pkl` in a torch zip archive (`archive/`, `ts/`, `ViT-L-14-336px/`…)."""
    for name in archive.namelist():
        if name.endswith("data.pkl") and name.count("/") <= 1:
            return name[: -len("data.pkl")]
    return None


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript zip (it has compiled code and constants next to the pickled data).

    An unreadable zip answers False; the reader that is tried next says what is wrong with it.
    """
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive)
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    return prefix is not None and (
        f"{prefix}constants.pkl" in names or any(name.startswith(f"{prefix}code/") for name in names)
    )


# ---------------------------------------------------------------------------------------------------------------------
# 2. Pickle opcodes


_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _check_pickle_opcodes(data: bytes) -> None:
    """Parse every opcode without executing any; refuse memo indices beyond the pickle's length.

    A real pickle numbers its memo slots 0, 1, 2, … (each costs at least two bytes), so no index reaches its length.
    """
    limit = max(len(data), 256)
    try:
        for opcode, argument, position in pickletools.genops(data):
            if opcode.name in _MEMO_PUTS and isinstance(argument, int) and not 0 <= argument < limit:
                raise _Refused(
                    f"data.pkl asks for memo slot {argument} at byte {position}, beyond its own length of {len(data)} "
                    "bytes (an unpickler would allocate memory for every slot up to it)"
                )
    except (ValueError, EOFError, IndexError, OverflowError) as error:  # pickletools' ways of saying "not a pickle"
        raise _Refused(f"data.pkl is not a valid pickle ({str(error)[:160]})") from error


# ---------------------------------------------------------------------------------------------------------------------
# 3. The restricted unpickler: placeholders only


class _ScriptObject:
    """Stand-in for an object of a TorchScript class (`__torch__.*`): keeps its pickled attributes, runs nothing.

    The attributes live in `attributes`, not in `__dict__`, so a pickled state cannot shadow a method.
    """

    __slots__ = ("attributes",)

    def __init__(self) -> None:
        self.attributes: dict[Any, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.attributes = dict(state) if isinstance(state, dict) else {"_state": state}


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# `torch.jit._pickle` helpers that wrap typed lists and type tags; their values are plain data.
_JIT_PICKLE_HELPERS = {
    "build_intlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
    "build_complexlist",
    "restore_type_tag",
}


def _identity(value: Any, *_: Any) -> Any:
    return value


class _StorageRecord:
    """A storage as the pickle declares it (`data/<key>`, dtype, element count); read only after every check."""

    __slots__ = ("dtype", "key", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _TensorRecord:
    """A tensor view (storage, offset, size, stride) as the pickle declares it."""

    __slots__ = ("offset", "size", "storage", "stride")

    def __init__(self, storage: _StorageRecord, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    @property
    def numel(self) -> int:
        return math.prod(self.size)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise _Refused(f"a tensor's {what} is {reprlib.repr(value)}, not a tuple of at most 64 integers")
    if not all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value):
        raise _Refused(f"a tensor's {what} {reprlib.repr(value)} holds something other than non-negative integers")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRecord:
    """`torch._utils._rebuild_tensor_v2`, replaced: the view's numbers are checked for type and kept, nothing built."""
    if not isinstance(storage, _StorageRecord):
        raise _Refused(f"a tensor is built on {type(storage).__name__}, not on a storage of the archive")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise _Refused(f"a tensor's storage offset is {reprlib.repr(offset)}, not a non-negative integer")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _Refused(f"a tensor has size {list(size)} but stride {list(stride)}: their lengths differ")
    return _TensorRecord(storage, offset, size, stride)


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's `data.pkl` into placeholders; every global but a few is refused.

    Allowed: `torch._utils._rebuild_tensor_v2` (replaced by `_rebuild_tensor`), the `torch.*Storage` type tags,
    `collections.OrderedDict`, the list/type-tag helpers of `torch.jit._pickle` (replaced by the identity), and
    `__torch__.*` classes, which become inert `_ScriptObject` records.
    """

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _StorageRecord] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _JIT_PICKLE_HELPERS:
            return _identity
        raise _Refused(
            f"it refers to {module}.{name}, which the safe reader does not allow (it only rebuilds tensors); where "
            "you trust the file, re-save the weights as a plain state dict: torch.save(model.state_dict(), 'clip.pt')"
        )

    def persistent_load(self, pid: Any) -> _StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"unexpected persistent id {reprlib.repr(pid)}")
        _, dtype, key, _, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise _Refused(f"storage {reprlib.repr(key)} has the type tag {reprlib.repr(dtype)}, not a storage type")
        if not isinstance(key, str) or not key or len(key) > 64 or "/" in key:
            raise _Refused(f"storage key {reprlib.repr(key)} is not a short name inside data/")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise _Refused(f"storage {key} declares {reprlib.repr(numel)} elements, not a non-negative integer")
        known = self.storages.get(key)
        if known is None:
            known = self.storages[key] = _StorageRecord(key, dtype, numel)
        elif (known.dtype, known.numel) != (dtype, numel):
            raise _Refused(
                f"storage {key} is declared twice, as {known.numel} x {known.dtype} and as {numel} x {dtype}"
            )
        return known


def _collect_tensors(root: Any, limits: ArchiveLimits) -> dict[str, _TensorRecord]:
    """Tensor attributes of the module tree by dotted name, walked without recursion and at most `max_depth` deep."""
    out: dict[str, _TensorRecord] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    while stack:
        node, name, depth = stack.pop()
        if isinstance(node, _TensorRecord):
            out[name] = node
            continue
        if not isinstance(node, _ScriptObject) or id(node) in seen:
            continue
        if depth >= limits.max_depth:
            raise _Refused(f"its module tree is nested more than {limits.max_depth} levels deep (at {name[:80]}…)")
        seen.add(id(node))
        attributes = getattr(node, "attributes", None) or {}  # a record the pickle never gave a state has none
        for attribute, value in reversed(list(attributes.items())):
            child = f"{name}.{attribute}" if name else str(attribute)
            if len(child) > limits.max_name_chars:
                raise _Refused(f"a tensor name is longer than {limits.max_name_chars} characters ({child[:60]}…)")
            stack.append((value, child, depth + 1))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 4. Checks on the declared tensors, then reading


def _check_view(name: str, tensor: _TensorRecord) -> None:
    """A view must lie inside its storage and hold no more elements than it (stride-0 views could otherwise expand a
    4-byte storage into gigabytes when copied)."""
    storage = tensor.storage
    numel = tensor.numel
    if numel == 0:
        if tensor.offset > storage.numel:
            raise _Refused(f"tensor {name} starts at element {tensor.offset} of a storage of {storage.numel}")
        return
    last = tensor.offset + sum((size - 1) * stride for size, stride in zip(tensor.size, tensor.stride))
    if last >= storage.numel or numel > storage.numel:
        raise _Refused(
            f"tensor {name} (size {list(tensor.size)}, stride {list(tensor.stride)}, offset {tensor.offset}: "
            f"{numel} elements up to element {last}) does not fit in its storage {storage.key} of {storage.numel} "
            "elements"
        )


def _check_declared(
    tensors: dict[str, _TensorRecord],
    archive: zipfile.ZipFile,
    prefix: str,
    file_size: int,
    limits: ArchiveLimits,
) -> dict[str, tuple[zipfile.ZipInfo, _StorageRecord]]:
    """Every check on what the pickle declares; returns each storage the tensors use with its data member.

    The storages need no total of their own: each is at most its member, and the members' total is bounded already.
    """
    budget = limits.budget(file_size)
    members: dict[str, tuple[zipfile.ZipInfo, _StorageRecord]] = {}
    view_bytes = 0
    for name, tensor in tensors.items():
        _check_view(name, tensor)
        view_bytes += tensor.numel * tensor.storage.dtype.itemsize
        storage = tensor.storage
        if storage.key in members:
            continue
        member = f"{prefix}data/{storage.key}"
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise _Refused(f"tensor {name} needs the data member {member}, which the archive lacks") from None
        if info.file_size < storage.nbytes:
            raise _Refused(
                f"storage {storage.key} declares {storage.numel} x {storage.dtype} ({_size(storage.nbytes)}) but its "
                f"member {member} holds {_size(info.file_size)}"
            )
        members[storage.key] = (info, storage)
    if view_bytes > budget:
        raise _Refused(
            f"its tensors declare {_size(view_bytes)}, more than {limits.max_expansion:g} times the file's own "
            f"{_size(file_size)}; refused before allocating anything"
        )
    return members


_READ_CHUNK = 16 << 20


def _read_storage(archive: zipfile.ZipFile, info: zipfile.ZipInfo, storage: _StorageRecord) -> torch.Tensor:
    """Exactly the storage's declared bytes (already checked against the member and the budget), in chunks."""
    nbytes = storage.nbytes
    if nbytes == 0:
        return torch.empty(0, dtype=storage.dtype)
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    filled = 0
    with archive.open(info) as handle:
        while filled < nbytes:
            chunk = handle.read(min(_READ_CHUNK, nbytes - filled))
            if not chunk:
                raise _Refused(f"member {info.filename} ends after {filled} of its declared {nbytes} bytes")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    return torch.frombuffer(buffer, dtype=storage.dtype)


def load_torchscript_tensors(
    path: str | os.PathLike, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript module archive, by dotted name (`visual.conv1.weight`, …).

    The names are those of `torch.jit.load(path).state_dict()` (plus any plain tensor attributes), but nothing in the
    archive is compiled or run, and nothing is read before the sizes the archive declares have been checked (see
    the module docstring). Any problem is a `ConversionError` naming the file.
    """
    source = os.fspath(path)
    try:
        file_size = os.path.getsize(source)
        with zipfile.ZipFile(source) as archive:
            return _load(archive, source, file_size, limits)
    except ConversionError:
        raise
    except _Refused as error:
        raise ConversionError(f"{source}: cannot read the TorchScript archive safely: {error}.") from error
    except zipfile.BadZipFile as error:
        raise ConversionError(f"{source}: not a readable zip archive ({error}); {_DAMAGED}.") from error
    except Exception as error:  # whatever else a crafted pickle provokes: still the file's fault, not a crash
        raise ConversionError(
            f"{source}: cannot read the TorchScript archive safely ({type(error).__name__}: {str(error)[:200]}); "
            f"{_DAMAGED}."
        ) from error


def _load(archive: zipfile.ZipFile, source: str, file_size: int, limits: ArchiveLimits) -> dict[str, torch.Tensor]:
    prefix = _archive_prefix(archive)
    if prefix is None:
        raise ConversionError(f"{source}: a zip file without data.pkl is not a PyTorch/TorchScript archive.")
    check_zip_members(archive, file_size, source, limits)
    names = set(archive.namelist())
    if f"{prefix}byteorder" in names:
        with archive.open(f"{prefix}byteorder") as handle:
            order = handle.read(16).strip()
        if order not in (b"", b"little"):
            raise ConversionError(f"{source}: big-endian archives are not supported.")
    pickle_info = archive.getinfo(f"{prefix}data.pkl")
    if pickle_info.file_size > limits.max_pickle_bytes:
        raise _Refused(
            f"its data.pkl declares {_size(pickle_info.file_size)}, more than the {_size(limits.max_pickle_bytes)} "
            "a module's description needs"
        )
    data = archive.read(pickle_info)
    _check_pickle_opcodes(data)
    root = _TorchScriptUnpickler(data).load()
    records = _collect_tensors(root, limits)
    if not records:
        raise _Refused("its data.pkl holds no tensors")
    members = _check_declared(records, archive, prefix, file_size, limits)
    flat = {key: _read_storage(archive, info, storage) for key, (info, storage) in members.items()}
    users = collections.Counter(record.storage.key for record in records.values())
    return {
        name: _materialize(record, flat[record.storage.key], users[record.storage.key])
        for name, record in records.items()
    }


def _materialize(record: _TensorRecord, flat: torch.Tensor, users: int) -> torch.Tensor:
    """The tensor of a checked view: the storage itself when it is its only, whole, contiguous user (no second copy
    of the weights in memory), else a copy, so that no two returned tensors share memory."""
    whole = record.offset == 0 and record.numel == flat.numel()
    if users == 1 and whole and torch.empty(record.size, device="meta").stride() == record.stride:
        return flat.view(record.size)
    return flat.as_strided(record.size, record.stride, record.offset).clone()


__all__ = ["DEFAULT_LIMITS", "ArchiveLimits", "check_zip_members", "is_torchscript_archive", "load_torchscript_tensors"]
