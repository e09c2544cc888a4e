"""Reading any weights file without executing it: TorchScript archives, `torch.save` files, safetensors.

Pickles load with `torch.load(weights_only=True)` and never fall back to unsafe loading; TorchScript archives go to
the restricted reader in `torchscript`; a zip's declared member sizes are checked before `torch.load` opens it.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from .common import ConversionError
from .torchscript import check_zip_members, is_torchscript_archive, load_torchscript_tensors


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: TorchScript archive, `torch.save` pickle (weights only) or safetensors.

    A `{"state_dict": {...}}` wrapper is unwrapped. Non-tensor entries are dropped.
    """
    source = os.fspath(path)
    if source.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(source)
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{source}: not a readable safetensors file ({error}).") from error
    if is_torchscript_archive(source):
        return load_torchscript_tensors(source)
    loaded = torch_load_weights_only(source, what="weights file")
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{source}: holds a {type(loaded).__name__}, not a state dict of tensors.")
    return {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def torch_load_weights_only(source: str, what: str) -> Any:
    """`torch.load(source, weights_only=True)` with every failure turned into a `ConversionError` that says why."""
    with open(source, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise ConversionError(
            f"{source}: a Git LFS pointer, not the file itself; fetch it with `git lfs pull` in the clone (or download "
            "the file from the repository's web page)."
        )
    is_zip = zipfile.is_zipfile(source)
    if not is_zip and head.startswith(b"PK\x03\x04"):
        raise ConversionError(
            f"{source}: starts like a zip archive but its end (the zip directory) is missing: the file is truncated; "
            "download or copy it again."
        )
    if not is_zip and not head.startswith(b"\x80"):  # torch.save: a zip, or a legacy pickle
        raise ConversionError(f"{source}: not a PyTorch {what} (neither a torch.save zip archive nor a pickle).")
    if is_zip:
        try:
            with zipfile.ZipFile(source) as archive:
                check_zip_members(archive, os.path.getsize(source), source)
        except zipfile.BadZipFile as error:
            raise ConversionError(f"{source}: not a readable zip archive ({error}); download it again.") from error
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        reason = detail.group(1).strip() if detail else str(error).strip().splitlines()[0]
        raise ConversionError(
            f"{source}: this {what} cannot be loaded with torch.load(weights_only=True) ({reason}). It holds objects "
            "other than tensors and plain containers, and loading those could execute code from the file, so this "
            "converter refuses it (it never falls back to unsafe loading). Where you trust the file, re-save its "
            "tensors: torch.save({k: v for k, v in obj.items() if ...}, 'clean.pth')."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(
            f"{source}: not a readable PyTorch {what} ({type(error).__name__}: {str(error)[:200]}); "
            "is it truncated, or a different kind of file?"
        ) from error


__all__ = ["read_state_dict", "torch_load_weights_only"]
