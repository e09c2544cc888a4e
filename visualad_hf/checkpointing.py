"""Training checkpoints that survive a kill: atomic folders, retention, `latest`, and heads-only model weights.

A checkpoint is the folder `OUTPUT_DIR/checkpoint-STEP/`. It is written under a temporary name and renamed into place
only when every file is on disk, so a folder with the final name is always complete: a process killed during a save
leaves the previous checkpoints untouched and at most a `checkpoint-STEP.tmp` folder, which is ignored and removed on
the next start. Deletions (retention) rename first and remove afterwards, for the same reason.

Inside, Accelerate's state (optimizer, scheduler, RNG, gradient scaler) sits next to `model.safetensors`, which holds
only the *trainable* weights (tokens, final LayerNorm, SCA, SAF: 126 MB for ViT-L instead of 1.3 GB with the frozen
backbone), and `trainer_state.json` (step, epoch, skipped steps, data position, log history).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import VisualADError
from .hub import fsync_dir as _fsync_dir
from .hub import fsync_tree as _fsync_tree
from .hub import replace_path

CHECKPOINT_PREFIX = "checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINABLE_WEIGHTS_NAME = "model.safetensors"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
_STALE_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-\d+\.(tmp|old|deleting)$")


class CheckpointError(VisualADError, ValueError):
    """A checkpoint that cannot be used to resume; the message names the folder and the fix."""


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as `(step, path)`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str | os.PathLike, spec: str | None) -> Path | None:
    """The checkpoint to resume from: `None`, `"latest"` (highest complete step in `output_dir`, `None` if there is
    none) or a path to a checkpoint folder."""
    if spec is None or spec == "":
        return None
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(
            f"--resume_from_checkpoint {spec}: no such folder. Pass a checkpoint folder "
            f"(e.g. {checkpoint_dir(output_dir, 500)}) or 'latest'."
        )
    if not (path / TRAINER_STATE_NAME).is_file():
        raise CheckpointError(
            f"{path} has no {TRAINER_STATE_NAME}: it is not a complete checkpoint (a save interrupted by a kill leaves "
            "a '.tmp' folder). Pass another checkpoint or 'latest'."
        )
    return path


def remove_stale_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Remove what interrupted saves and deletions left behind (`checkpoint-N.tmp`, `.old`, `.deleting`)."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if _STALE_RE.match(path.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def temporary_checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where a checkpoint is written before it is renamed into place (the same name on every process)."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}.tmp"


def finalize_checkpoint(tmp_dir: Path, trainer_state: dict[str, Any]) -> Path:
    """Write `trainer_state.json` into the fully written `tmp_dir`, flush everything to disk and rename the folder to
    its final name. An existing checkpoint of the same step is replaced (moved aside first, then removed)."""
    match = re.match(rf"^({CHECKPOINT_PREFIX}-\d+)\.tmp$", tmp_dir.name)
    if match is None:
        raise ValueError(f"{tmp_dir} is not a temporary checkpoint folder")
    write_json(tmp_dir / TRAINER_STATE_NAME, trainer_state)
    _fsync_tree(tmp_dir)
    final = tmp_dir.with_name(match.group(1))
    replace_path(tmp_dir, final)
    _fsync_dir(final.parent)
    return final


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most `save_total_limit` remain (None or <= 0 keeps all)."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = []
    for _, path in checkpoints[: max(0, len(checkpoints) - save_total_limit)]:
        delete_checkpoint(path)
        removed.append(path)
    return removed


def delete_checkpoint(path: Path) -> None:
    """Rename, then remove: a kill midway leaves a `.deleting` folder, never a half-deleted `checkpoint-N`."""
    doomed = path.with_name(path.name + ".deleting")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINER_STATE_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); resume from another checkpoint.") from error


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that receive gradients (for VisualAD: tokens, final LayerNorm, SCA, SAF), detached, contiguous."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable_weights(model: nn.Module, directory: str | os.PathLike) -> Path:
    path = Path(directory) / TRAINABLE_WEIGHTS_NAME
    save_file({k: v.cpu() for k, v in trainable_state_dict(model).items()}, str(path), metadata={"format": "pt"})
    return path


def load_trainable_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint's trainable weights into `model`, refusing a checkpoint of another architecture."""
    path = Path(directory) / TRAINABLE_WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not a complete training checkpoint.")
    state = load_file(str(path))
    expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    mismatched = [
        f"{name} {tuple(state[name].shape)} vs {tuple(p.shape)}"
        for name, p in expected.items()
        if name in state and state[name].shape != p.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path} does not match the model being trained (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {mismatched[:5]}). Resume with the same model settings as the run that wrote it, or "
            "start a new output_dir."
        )
    with torch.no_grad():
        for name, parameter in expected.items():
            parameter.copy_(state[name].to(parameter.device, parameter.dtype))


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


__all__ = [
    "CheckpointError",
    "checkpoint_dir",
    "delete_checkpoint",
    "finalize_checkpoint",
    "list_checkpoints",
    "load_trainable_weights",
    "read_trainer_state",
    "remove_stale_folders",
    "resolve_checkpoint",
    "rotate_checkpoints",
    "save_trainable_weights",
    "temporary_checkpoint_dir",
    "trainable_state_dict",
]
