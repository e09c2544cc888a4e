"""Crafted TorchScript archives: every declared size is checked before anything is decompressed or allocated, and
every bad archive ends in the converter's one-line error naming the file (never a traceback, never gigabytes).

The archives are written by hand (`craft_archive`), a few kilobytes each; the ones that declare gigabytes only
declare them. A valid hand-made archive is read correctly first, so each refusal below is caused by its one change.
"""

from __future__ import annotations

import collections
import io
import pickle
import random
import struct
import sys
import tracemalloc
import types
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import RELEASED_PARITY_DIR

from visualad_hf.cli import main as cli_main
from visualad_hf.convert import ArchiveLimits, ConversionError, load_backbone, load_torchscript_tensors
from visualad_hf.convert import torchscript as reader

# ---------------------------------------------------------------------------------------------------------------------
# Writing archives by hand

_TORCH_MODULE = types.ModuleType("__torch__")


class Module:
    """Pickles as a TorchScript module record: `__torch__.Module` with its attributes as state."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


Module.__module__ = "__torch__"
_TORCH_MODULE.Module = Module


class Storage:
    """Pickles (as a persistent id) as the storage `data/<key>` with `numel` elements of `kind`."""

    def __init__(self, key: str, numel: int, kind=torch.FloatStorage):
        self.key, self.numel, self.kind = key, numel, kind


class Tensor:
    """Pickles as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""

    def __init__(self, storage, size, stride=None, offset: int = 0):
        if stride is None and isinstance(size, tuple):
            stride = tuple(int(torch.tensor(size[i + 1 :]).prod()) for i in range(len(size)))
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None


def pickle_bytes(root) -> bytes:
    buffer = io.BytesIO()
    sys.modules["__torch__"] = _TORCH_MODULE
    try:
        _Pickler(buffer, protocol=2).dump(root)
    finally:
        del sys.modules["__torch__"]
    return buffer.getvalue()


def craft_archive(
    path: Path,
    data_pkl: bytes,
    members: dict[str, bytes] | None = None,
    *,
    compress: bool = False,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A TorchScript-shaped zip: `ts/data.pkl`, `ts/constants.pkl`, `ts/code/`, and `ts/data/<key>` members."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ts/data.pkl", data_pkl)
        archive.writestr("ts/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("ts/code/__torch__.py", "def forward(self):\n    pass\n")
        archive.writestr("ts/version", "3\n")
        for key, content in (members or {}).items():
            archive.writestr(f"ts/data/{key}", content, compress_type=method)
        for name, content in (extra or {}).items():
            archive.writestr(name, content)
    return path


def floats(values) -> bytes:
    return torch.tensor(values, dtype=torch.float32).numpy().tobytes()


def valid_root():
    weight = Tensor(Storage("0", 6), (2, 3))
    bias = Tensor(Storage("1", 2), (2,))
    return Module(visual=Module(proj=Module(weight=weight, bias=bias)), scale=Tensor(Storage("2", 1), ()))


def valid_members() -> dict[str, bytes]:
    return {"0": floats([1, 2, 3, 4, 5, 6]), "1": floats([7, 8]), "2": floats([9])}


@pytest.fixture
def must_not_read(monkeypatch):
    """Fail the test if any storage is read: the refusal must come from the checks, before reading or allocating."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a storage was read before the declared sizes were checked")

    monkeypatch.setattr(reader, "_read_storage", refuse)


def refused(path: Path, match: str, **kwargs) -> str:
    """The archive is refused with a one-line ConversionError that names the file and matches `match`."""
    with pytest.raises(ConversionError, match=match) as error:
        load_torchscript_tensors(path, **kwargs)
    message = str(error.value)
    assert message.startswith(f"{path}:") and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------------
# The hand-made archive is valid, so each refusal below comes from its own change


def test_hand_made_archive_is_read_correctly(tmp_path):
    path = craft_archive(tmp_path / "ok.pt", pickle_bytes(valid_root()), valid_members())
    tensors = load_torchscript_tensors(path)
    assert set(tensors) == {"visual.proj.weight", "visual.proj.bias", "scale"}
    assert torch.equal(tensors["visual.proj.weight"], torch.arange(1.0, 7.0).reshape(2, 3))
    assert torch.equal(tensors["visual.proj.bias"], torch.tensor([7.0, 8.0]))
    assert tensors["scale"].shape == () and tensors["scale"].item() == 9.0
    compressed = craft_archive(tmp_path / "deflated.pt", pickle_bytes(valid_root()), valid_members(), compress=True)
    assert all(torch.equal(tensors[k], v) for k, v in load_torchscript_tensors(compressed).items())


def test_transposed_and_offset_views_are_read_like_torch(tmp_path):
    storage = Storage("0", 6)
    root = Module(t=Tensor(storage, (3, 2), (1, 3)), tail=Tensor(storage, (2,), (1,), offset=4))
    path = craft_archive(tmp_path / "views.pt", pickle_bytes(root), {"0": floats(range(6))})
    tensors = load_torchscript_tensors(path)
    base = torch.arange(6.0)
    assert torch.equal(tensors["t"], base.as_strided((3, 2), (1, 3)))
    assert torch.equal(tensors["tail"], torch.tensor([4.0, 5.0]))


# ---------------------------------------------------------------------------------------------------------------------
# Declared sizes: zip members, storages, views, totals


def test_compressed_bomb_member_is_refused_before_decompressing(tmp_path):
    """A real deflate bomb: 128 MiB of zeros in a member of about 130 KB; refused from the zip directory alone."""
    path = tmp_path / "bomb.pt"
    numel = (128 << 20) // 4
    craft_archive(path, pickle_bytes(Module(weight=Tensor(Storage("0", numel), (numel,)))))
    member = zipfile.ZipInfo("ts/data/0")
    member.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "a") as archive, archive.open(member, "w", force_zip64=True) as handle:
        chunk = bytes(1 << 20)
        for _ in range(128):
            handle.write(chunk)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        message = refused(path, r"ts/data/0' would expand from .* to 128\.0 MiB \(ratio \d+, more than 32\)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "decompression bomb" in message
    assert peak < 8 << 20  # nothing was decompressed


def test_total_of_members_is_bounded_by_the_file_size(tmp_path, must_not_read):
    """With the per-member ratio check out of the way, the total bound alone still refuses the archive."""
    path = tmp_path / "many.pt"
    numel = (8 << 20) // 4
    members = {str(i): bytes(numel * 4) for i in range(3)}
    root = Module(**{f"w{i}": Tensor(Storage(str(i), numel), (numel,)) for i in range(3)})
    craft_archive(path, pickle_bytes(root), members, compress=True)
    limits = ArchiveLimits(max_compression_ratio=1e9, slack_bytes=0)
    refused(path, r"zip members declare 24\.0 MiB in total, more than 4 times the file's own", limits=limits)


def test_declared_64_gib_storage_is_refused_without_allocating(tmp_path, must_not_read):
    numel = (64 << 30) // 4
    root = Module(weight=Tensor(Storage("0", numel), (1 << 16, 1 << 16 << 2)))
    path = craft_archive(tmp_path / "huge.pt", pickle_bytes(root), {"0": floats([1.0])})
    refused(path, r"storage 0 declares 17179869184 x torch\.float32 \(64\.0 GiB\) but its member ts/data/0 holds 4 "
                  r"bytes")  # fmt: skip


def test_four_byte_storage_viewed_as_16384_squared_is_refused(tmp_path, must_not_read):
    root = Module(weight=Tensor(Storage("0", 1), (16384, 16384), (0, 0)))
    path = craft_archive(tmp_path / "expand.pt", pickle_bytes(root), {"0": floats([1.0])})
    refused(path, r"tensor weight \(size \[16384, 16384\], stride \[0, 0\], offset 0: 268435456 elements .*does "
                  r"not fit in its storage 0 of 1 elements")  # fmt: skip


@pytest.mark.parametrize(
    "size, stride, offset, match",
    [
        ((2, 3), (3, 1), 1, r"up to element 6\) does not fit in its storage 0 of 6 elements"),
        ((3, 3), (3, 1), 0, r"9 elements up to element 8\) does not fit"),
        ((2, 3), (4, 1), 0, r"up to element 6\) does not fit"),
        ((0,), (1,), 7, r"starts at element 7 of a storage of 6"),
        ((2, 3), (3,), 0, r"size \[2, 3\] but stride \[3\]: their lengths differ"),
        ((2, 3), (3, -1), 0, r"stride \(3, -1\) holds something other than non-negative integers"),
        ((2.0, 3), (3, 1), 0, r"size \(2\.0, 3\) holds something other than non-negative integers"),
        ((2, 3), (3, 1), -1, r"storage offset is -1, not a non-negative integer"),
        ("big", (1,), 0, r"size is 'big', not a tuple of at most 64 integers"),
        ((1,) * 65, (1,) * 65, 0, r"not a tuple of at most 64 integers"),
    ],
)
def test_views_outside_their_storage_are_refused(size, stride, offset, match, tmp_path, must_not_read):
    root = Module(weight=Tensor(Storage("0", 6), size, stride, offset))
    path = craft_archive(tmp_path / "view.pt", pickle_bytes(root), {"0": floats(range(6))})
    refused(path, match)


def test_many_views_of_one_storage_are_bounded_in_total(tmp_path, must_not_read):
    """Each view fits its 1 MiB storage, but 40 copies of it would exceed the budget (4 x file + 16 MiB)."""
    numel = (1 << 20) // 4
    storage = Storage("0", numel)
    root = Module(**{f"copy{i}": Tensor(storage, (numel,)) for i in range(40)})
    path = craft_archive(tmp_path / "copies.pt", pickle_bytes(root), {"0": bytes(numel * 4)})
    refused(path, r"its tensors declare 40\.0 MiB, more than 4 times the file's own 1\.0 MiB; refused before")


def test_storage_declared_twice_differently_is_refused(tmp_path, must_not_read):
    root = Module(a=Tensor(Storage("0", 6), (6,)), b=Tensor(Storage("0", 600), (600,)))
    path = craft_archive(tmp_path / "twice.pt", pickle_bytes(root), {"0": floats(range(6))})
    refused(path, r"storage 0 is declared twice, as 6 x torch\.float32 and as 600 x torch\.float32")


def test_stored_member_whose_sizes_disagree_is_refused(tmp_path):
    path = craft_archive(tmp_path / "stored.pt", pickle_bytes(valid_root()), valid_members())
    data = bytearray(path.read_bytes())
    # Patch the uncompressed size of ts/data/0 in the central directory (offset 24 of its entry) to 1 GiB.
    entry = data.rindex(b"PK\x01\x02", 0, data.rindex(b"ts/data/0") + 1)
    struct.pack_into("<I", data, entry + 24, 1 << 30)
    path.write_bytes(bytes(data))
    refused(path, r"ts/data/0' is stored uncompressed but declares 1073741824 bytes and occupies 24")


# ---------------------------------------------------------------------------------------------------------------------
# Broken structure: zip, members, pickle


def test_missing_data_member(tmp_path, must_not_read):
    members = valid_members()
    del members["1"]
    path = craft_archive(tmp_path / "missing.pt", pickle_bytes(valid_root()), members)
    refused(path, r"tensor visual\.proj\.bias needs the data member ts/data/1, which the archive lacks")


def test_short_data_member(tmp_path, must_not_read):
    members = dict(valid_members(), **{"0": floats([1, 2, 3])})
    path = craft_archive(tmp_path / "short.pt", pickle_bytes(valid_root()), members)
    refused(path, r"storage 0 declares 6 x torch\.float32 \(24 bytes\) but its member ts/data/0 holds 12 bytes")


def test_truncated_zip(tmp_path):
    path = craft_archive(tmp_path / "cut.pt", pickle_bytes(valid_root()), valid_members())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(path, r"not a readable zip archive")
    with pytest.raises(ConversionError, match=r"cut\.pt: starts like a zip archive but its end .* is truncated"):
        load_backbone(path)


def test_corrupted_member_bytes_fail_the_crc(tmp_path):
    path = craft_archive(tmp_path / "crc.pt", pickle_bytes(valid_root()), valid_members())
    data = path.read_bytes()
    start = data.index(floats([1, 2, 3, 4, 5, 6]))
    path.write_bytes(data[:start] + b"\xff" * 4 + data[start + 4 :])
    refused(path, r"not a readable zip archive \(Bad CRC-32")


@pytest.mark.parametrize(
    "data_pkl, match",
    [
        (b"\x80\x02\xff\xfe\xfd.", r"data\.pkl is not a valid pickle"),
        (b"garbage that is not a pickle", r"data\.pkl is not a valid pickle"),
        (pickle_bytes(valid_root())[:-40], r"data\.pkl is not a valid pickle"),
        (b"\x80\x02N" + b"r" + struct.pack("<I", 0xFFFFFFFF) + b".", r"asks for memo slot 4294967295 at byte 3"),
        (b"\x80\x02" + b"ctorch\nFloatStorage\n" + b"}" + b"b" + b".", r"AttributeError|TypeError"),
        (b"\x80\x02" + b"ctorch\nFloatStorage\n" + b")" + b"R" + b".", r"TypeError"),
        (b"\x80\x02" + b"N" * 10 + b".", r"holds no tensors"),
        (b"\x80\x02" + b"cposix\nsystem\n" + b".", r"refers to posix\.system, which the safe reader does not allow"),
        (b"\x80\x02" + b"(X\x07\x00\x00\x00storageN" + b"t" + b"Q" + b".", r"unexpected persistent id"),
    ],
    ids=[
        "bad-opcode", "not-a-pickle", "truncated", "memo-bomb", "build-on-dtype", "call-dtype", "no-tensors",
        "forbidden-global", "bad-persistent-id",
    ],
)
def test_wrong_pickles(data_pkl, match, tmp_path):
    path = craft_archive(tmp_path / "pickle.pt", data_pkl, valid_members())
    tracemalloc.start()
    try:
        refused(path, match)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def _nested_modules(depth: int) -> bytes:
    """`Module(child=Module(child=...))`, `depth` levels, written opcode by opcode (a pickler would recurse)."""
    level = b"c__torch__\nModule\n)\x81}X\x05\x00\x00\x00child"
    return b"\x80\x02" + level * depth + b"N" + b"sb" * depth + b"."


def test_deep_nesting_is_refused_without_recursion(tmp_path):
    path = craft_archive(tmp_path / "deep.pt", _nested_modules(50_000), valid_members())
    refused(path, r"module tree is nested more than 100 levels deep")
    lists = b"\x80\x02" + b"]" * 50_000 + b"a" * 49_999 + b"."  # lists in lists: not modules, so no tensors
    path = craft_archive(tmp_path / "lists.pt", lists, valid_members())
    refused(path, r"holds no tensors")


def test_tensor_on_something_other_than_a_storage(tmp_path):
    root = Module(weight=Tensor(123, (1,), (1,)))
    path = craft_archive(tmp_path / "nostorage.pt", pickle_bytes(root), valid_members())
    refused(path, r"a tensor is built on int, not on a storage of the archive")


def test_oversized_pickle_and_big_endian(tmp_path):
    path = craft_archive(tmp_path / "ok.pt", pickle_bytes(valid_root()), valid_members())
    refused(path, r"its data\.pkl declares .* more than the 10 bytes", limits=ArchiveLimits(max_pickle_bytes=10))
    big_endian = {"ts/byteorder": b"big"}
    path = craft_archive(tmp_path / "be.pt", pickle_bytes(valid_root()), valid_members(), extra=big_endian)
    refused(path, r"big-endian archives are not supported")


# ---------------------------------------------------------------------------------------------------------------------
# Fuzzing: random damage to a real TorchScript CLIP never escapes as anything but a ConversionError


def _rezip(source: Path, target: Path, change) -> Path:
    """Copy the archive, passing each member's (name, bytes) through `change` (None drops the member)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            changed = change(info.filename, old.read(info))
            if changed is not None:
                new.writestr(info.filename, changed)
    return target


def _outcome(path: Path) -> str:
    try:
        load_torchscript_tensors(path)
    except ConversionError as error:
        message = str(error)
        assert message.startswith(f"{path}:") and "\n" not in message, message
        return "refused"
    return "read"


def test_fuzzed_archives_end_in_a_conversion_error_or_a_clean_read(tmp_path):
    source = RELEASED_PARITY_DIR / "clip_openai.pt"
    with zipfile.ZipFile(source) as archive:
        pkl_name = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        names = archive.namelist()
    rng = random.Random(1234)
    outcomes = collections.Counter()
    for trial in range(60):
        target = tmp_path / f"fuzz{trial}.pt"
        kind = trial % 4
        if kind == 0:  # flip a few bytes of data.pkl (re-zipped, so the unpickler sees them)

            def flip(name, content):
                if name != pkl_name:
                    return content
                content = bytearray(content)
                for _ in range(rng.randint(1, 4)):
                    content[rng.randrange(len(content))] = rng.randrange(256)
                return bytes(content)

            _rezip(source, target, flip)
        elif kind == 1:  # cut data.pkl short
            cut = rng.randrange(1, 4000)
            _rezip(source, target, lambda name, content, cut=cut: content[:cut] if name == pkl_name else content)
        elif kind == 2:  # drop one member
            dropped = rng.choice(names)
            _rezip(source, target, lambda name, content, dropped=dropped: None if name == dropped else content)
        else:  # damage the file itself: truncate or overwrite a stretch
            data = bytearray(source.read_bytes())
            if rng.random() < 0.5:
                data = data[: rng.randrange(len(data))]
            else:
                start = rng.randrange(len(data) - 64)
                data[start : start + 64] = bytes(rng.randrange(256) for _ in range(64))
            target.write_bytes(bytes(data))
        outcomes[_outcome(target)] += 1
    assert outcomes["refused"] >= 30  # most damage is detected; the rest (e.g. a dropped code file) reads cleanly


# ---------------------------------------------------------------------------------------------------------------------
# Through the command line: one line, exit status 2, nothing written


def test_crafted_backbone_ends_in_one_line_from_the_cli(tmp_path, capsys):
    root = Module(visual=Module(conv1=Module(weight=Tensor(Storage("0", 1), (16384, 16384), (0, 0)))))
    bomb = craft_archive(tmp_path / "ViT-crafted.pt", pickle_bytes(root), {"0": floats([1.0])})
    output = tmp_path / "out"
    status = cli_main(
        ["convert", "--backbone", str(bomb), "--checkpoint", str(RELEASED_PARITY_DIR / "visualad_official.pth"),
         "--output", str(output)]
    )  # fmt: skip
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(f"visualad convert: error: {bomb}: cannot read the TorchScript archive safely")
    assert "Traceback" not in "\n".join(error)
    assert not output.exists() and not list(tmp_path.glob(".out.*"))


def test_zip_checks_also_guard_torch_save_files(tmp_path):
    """A `torch.save` zip (not TorchScript) with a bomb member is refused before torch.load decompresses it."""
    from visualad_hf.convert import read_state_dict

    path = tmp_path / "saved.pt"
    torch.save({"visual.conv1.weight": torch.zeros(2)}, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("saved/extra", bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(ConversionError, match=r"saved\.pt: zip member 'saved/extra' would expand"):
        read_state_dict(path)
