"""Training checkpoints that survive a kill, a full disk and a damaged file; resuming only what can be resumed
exactly.

A checkpoint is the folder `OUTPUT_DIR/checkpoint-STEP/`. It is written under a temporary name and renamed into place
only when every file is on disk, so a folder with the final name is always complete: a process killed during a save
leaves the previous checkpoints untouched and at most a `checkpoint-STEP.tmp` folder, which is removed on the next
start. Deletions (retention) rename first and remove afterwards; a `checkpoint-STEP.old` left by an interrupted
replacement is put back (`hub.recover_interrupted_swap`), never deleted while it is the only copy.

Inside, Accelerate's state (optimizer, scheduler, RNG, gradient scaler) sits next to `model.safetensors`, which holds
only the *trainable* weights (tokens, final LayerNorm, SCA, SAF: 126 MB for ViT-L instead of 1.3 GB with the frozen
backbone), the model's `config.json`, the run's `training_args.yaml`, `checksums.json` (size and SHA-256 of every
file) and `trainer_state.json` (step, epoch, skipped steps, data position, log history).

Resuming checks, before anything is loaded, that the files are as they were written (a damaged newest checkpoint
makes `latest` fall back to the previous complete one, with a warning; a damaged checkpoint given by path stops with
a message naming the file) and that the run is the same: model config, recipe (learning rates, batch size, seed,
...) and data position must match, and every difference is named. A full disk during a save removes the incomplete
checkpoint and ends the run with one line; the checkpoints written before stay usable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import VisualADError
from ..hub import DiskFullError, fsync_dir, fsync_tree, is_disk_full, recover_interrupted_swap, replace_path, write_json
from .arguments import (
    RECIPE_ARGUMENTS,
    TRAINING_ARGS_NAME,
    Arguments,
    arguments_to_dict,
    read_saved_arguments,
    save_arguments,
)
from .state import TRAINER_STATE_NAME, TrainerState

logger = logging.getLogger("visualad_hf.trainer")

CHECKPOINT_PREFIX = "checkpoint"
TRAINABLE_WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CHECKSUMS_NAME = "checksums.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
_STALE_RE = re.compile(rf"^({CHECKPOINT_PREFIX}-\d+)\.(tmp|old|deleting)$")
# Model config fields that say nothing about the trained function (bookkeeping, loading, calibration).
_CONFIG_KEYS_IGNORED = {
    "transformers_version",
    "architectures",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "dtype",
    "torch_dtype",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "attn_implementation",
    "anomaly_threshold",
    "threshold_calibration",
    "auto_map",
    "custom_pipelines",
}


class CheckpointError(VisualADError, ValueError):
    """A checkpoint that cannot be used to resume; the message names the folder or file and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Folders


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}"


def is_checkpoint_name(name: str) -> bool:
    """Whether `name` is a checkpoint folder or one of its save/delete leftovers (the trainer's own entries)."""
    return bool(_CHECKPOINT_RE.match(name) or _STALE_RE.match(name))


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
    """The checkpoint named by `spec`: `None`, `"latest"` (highest complete step in `output_dir`, `None` if there is
    none) or a path to a checkpoint folder. Files are not checked here (see `choose_checkpoint`)."""
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
    """Clean up after interrupted saves and deletions: remove `checkpoint-N.tmp` and `checkpoint-N.deleting`; a
    `checkpoint-N.old` is restored as `checkpoint-N` when that is missing (a replacement was cut between its two
    renames) and removed only when `checkpoint-N` is in place. Returns the removed folders."""
    root = Path(output_dir)
    removed = []
    if not root.is_dir():
        return removed
    for path in sorted(root.iterdir()):
        match = _STALE_RE.match(path.name)
        if not match or not path.is_dir():
            continue
        if match.group(2) == "old":
            done = recover_interrupted_swap(root / match.group(1))
            if done and done.startswith("restored"):
                logger.warning("%s", done)
            else:
                removed.append(path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def temporary_checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where a checkpoint is written before it is renamed into place (the same name on every process)."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}.tmp"


def finalize_checkpoint(tmp_dir: Path, trainer_state: dict[str, Any]) -> Path:
    """Record the size and SHA-256 of every file of the fully written `tmp_dir` (`checksums.json`), write
    `trainer_state.json`, flush everything to disk and rename the folder to its final name. An existing checkpoint of
    the same step is replaced (moved aside first, then removed)."""
    match = re.match(rf"^({CHECKPOINT_PREFIX}-\d+)\.tmp$", tmp_dir.name)
    if match is None:
        raise ValueError(f"{tmp_dir} is not a temporary checkpoint folder")
    write_json(tmp_dir / CHECKSUMS_NAME, {"files": file_checksums(tmp_dir)})
    write_json(tmp_dir / TRAINER_STATE_NAME, trainer_state)
    fsync_tree(tmp_dir)
    final = tmp_dir.with_name(match.group(1))
    replace_path(tmp_dir, final)
    fsync_dir(final.parent)
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


# ---------------------------------------------------------------------------------------------------------------------
# Integrity


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """`{relative path: {"size", "sha256"}}` of every file below `folder` (the checksum and state files excepted)."""
    sums = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in (CHECKSUMS_NAME, TRAINER_STATE_NAME) and not path.name.endswith(".tmp"):
            sums[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return sums


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINER_STATE_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); resume from another checkpoint.") from error
    if not isinstance(data, dict) or "global_step" not in data:
        raise CheckpointError(f"{path} is not a trainer state (no global_step); resume from another checkpoint.")
    return data


def verify_checkpoint(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's trainer state, after checking every file against `checksums.json`; raises `CheckpointError`
    naming the first damaged or missing file. (Checkpoints written before checksums existed are not checked.)"""
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    sums_path = checkpoint / CHECKSUMS_NAME
    if not sums_path.is_file():
        return state
    try:
        expected = json.loads(sums_path.read_text())["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{sums_path} cannot be read ({error}): the checkpoint is damaged.") from error
    for name, entry in sorted(expected.items()):
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is damaged.")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path} is damaged: {size} bytes, {entry['size']} were written.")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} is damaged: its content differs from what was written (SHA-256).")
    return state


def choose_checkpoint(output_dir: str | os.PathLike, spec: str | None, *, warn: bool = True) -> Path | None:
    """The checkpoint to resume from, checked (`verify_checkpoint`): a damaged newest checkpoint makes `latest` fall
    back to the previous complete one, with a warning; a damaged checkpoint given by path raises, naming the file."""
    if spec != "latest":
        path = resolve_checkpoint(output_dir, spec)
        if path is not None:
            try:
                verify_checkpoint(path)
            except CheckpointError as error:
                raise CheckpointError(
                    f"{error} Resume from an earlier checkpoint (`--resume_from_checkpoint latest` skips damaged ones) "
                    "or start afresh with --overwrite_output_dir."
                ) from error
        return path
    problems: list[str] = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems and warn:
            logger.warning("Skipped damaged checkpoint(s): %s Resuming from %s instead.", " ".join(problems), path)
        return path
    if problems:
        raise CheckpointError(
            f"No usable checkpoint in {output_dir}: {' '.join(problems)} Start afresh with --overwrite_output_dir "
            "(or another --output_dir)."
        )
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Trainable weights


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
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors reports a damaged header or size as one of several error types
        raise CheckpointError(f"{path} cannot be read ({error}); resume from another checkpoint.") from error
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


def register_heads_only_checkpointing(accelerator) -> None:
    """Make `save_state`/`load_state` store only the trainable weights of the model (the frozen backbone is rebuilt
    from its source on resume), next to Accelerate's optimizer, scheduler and RNG states."""

    def save_hook(models, weights, directory):
        for model in models:
            if accelerator.is_main_process:
                save_trainable_weights(accelerator.unwrap_model(model), directory)
        weights.clear()  # Accelerate must not write the full model (1.3 GB with a ViT-L backbone)

    def load_hook(models, directory):
        while models:
            load_trainable_weights(accelerator.unwrap_model(models.pop()), directory)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def raise_if_any_failed(
    accelerator, error: BaseException | None, *, what: str, disk_full: str, cleanup: Path | None = None
) -> None:
    """Agree across processes on whether a save (`what`) failed, so that no process waits forever for one that gave
    up; remove the incomplete `cleanup` folder and raise: `DiskFullError(disk_full)` for a full disk, else the error
    itself (on the processes where it happened; the others raise a `CheckpointError` pointing to it)."""
    failed = error is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(failed), device=accelerator.device)
        failed = float(accelerator.reduce(flag, reduction="sum")) > 0
    if not failed:
        return
    if cleanup is not None and accelerator.is_main_process:
        shutil.rmtree(cleanup, ignore_errors=True)
    if error is None:
        raise CheckpointError(f"Another process failed while {what}; see its message.")
    if is_disk_full(error):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        raise DiskFullError(f"The disk is full{where}: {disk_full}") from error
    raise error


def _attempt(function: Callable[..., Any], *args, **kwargs) -> BaseException | None:
    try:
        function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - handed to `raise_if_any_failed`, which re-raises it here
        return error
    return None


def _write_run_settings(directory: Path, arguments: Arguments | None, config) -> None:
    """The model config and training arguments a resumed run is compared with."""
    if config is not None:
        config.to_json_file(directory / CONFIG_NAME, use_diff=False)
    if arguments is not None:
        save_arguments(arguments, directory / TRAINING_ARGS_NAME)


def save_checkpoint(
    accelerator,
    output_dir: Path,
    state: TrainerState,
    save_total_limit: int | None,
    *,
    arguments: Arguments | None = None,
    config=None,
) -> Path:
    """Write `OUTPUT_DIR/checkpoint-STEP/` atomically, with the model config and the training arguments, then apply
    the retention limit. A failed save (a full disk) removes the incomplete folder and raises; older checkpoints are
    untouched."""
    tmp_dir = temporary_checkpoint_dir(output_dir, state.global_step)
    final = checkpoint_dir(output_dir, state.global_step)
    previous = list_checkpoints(output_dir)
    kept = f"{previous[-1][1].name} is intact" if previous else "there is no earlier checkpoint"
    disk_full = (
        f"writing {final.name} in {output_dir} failed; the incomplete checkpoint was removed and {kept}. "
        "Free some space and run the same command with --resume_from_checkpoint latest."
    )
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = _attempt(accelerator.save_state, str(tmp_dir))
    if error is None and accelerator.is_main_process:
        error = _attempt(_write_run_settings, tmp_dir, arguments, config)
    raise_if_any_failed(accelerator, error, what=f"writing {final}", disk_full=disk_full, cleanup=tmp_dir)
    if accelerator.is_main_process:
        error = _attempt(finalize_checkpoint, tmp_dir, state.to_dict())
    raise_if_any_failed(accelerator, error, what=f"writing {final}", disk_full=disk_full, cleanup=tmp_dir)
    if accelerator.is_main_process:
        removed = rotate_checkpoints(output_dir, save_total_limit)
        logger.info("Saved %s%s", final, f"; removed {[p.name for p in removed]}" if removed else "")
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------------------
# Resuming


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        if key.startswith("_") or key in _CONFIG_KEYS_IGNORED:
            continue
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Model config fields that differ between a checkpoint and this run, as `"name: saved -> current"`; fields only
    one side has (a newer package version) are not compared."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{key} is {old[key]!r} in the checkpoint, {new[key]!r} in this run" for key in old.keys() & new.keys()
            if _normalise(old[key]) != _normalise(new[key])]  # fmt: skip


def recipe_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Training arguments of `RECIPE_ARGUMENTS` that differ between a checkpoint and this run. `num_train_epochs` is
    compared only when neither run sets `max_steps` (which overrides it)."""
    names = [name for name in RECIPE_ARGUMENTS if name in saved and name in current]
    if saved.get("max_steps", -1) > 0 or current.get("max_steps", -1) > 0:
        names = [name for name in names if name != "num_train_epochs"]
    return [f"{name} is {saved[name]!r} in the checkpoint, {current[name]!r} in this run" for name in names
            if _normalise(saved[name]) != _normalise(current[name])]  # fmt: skip


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resume_mismatches(checkpoint: Path, saved_state: dict[str, Any], fresh: TrainerState, arguments, config) -> list[str]:
    """Everything that differs between the run that wrote `checkpoint` and this one: model config, recipe, and the
    data position (steps per epoch, batch size, processes, dataset and backbone fingerprints)."""
    problems = []
    unchecked = [name for name in (CONFIG_NAME, TRAINING_ARGS_NAME) if not (checkpoint / name).is_file()]
    if unchecked:
        logger.warning("%s has no %s (written by an older version): that part of the run is not compared.",
                       checkpoint, " or ".join(unchecked))  # fmt: skip
    if (checkpoint / CONFIG_NAME).is_file() and config is not None:
        problems += config_mismatches(_read_json(checkpoint / CONFIG_NAME), config.to_dict())
    if (checkpoint / TRAINING_ARGS_NAME).is_file() and arguments is not None:
        try:
            saved_arguments = read_saved_arguments(checkpoint / TRAINING_ARGS_NAME)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{checkpoint / TRAINING_ARGS_NAME} cannot be read ({error}).") from error
        problems += recipe_mismatches(saved_arguments, arguments_to_dict(arguments))
    for key in TrainerState.RESUME_KEYS:
        if saved_state.get(key) != getattr(fresh, key):
            problems.append(f"its {key} is {saved_state.get(key)!r}, this run's is {getattr(fresh, key)!r}")
    return problems


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); resume from another checkpoint.") from error


def resume(accelerator, checkpoint: Path, fresh: TrainerState, *, arguments=None, config=None) -> TrainerState:
    """Load `checkpoint` into the prepared model, optimizer, scheduler and RNGs, after refusing (with every
    difference named) a run whose model config, recipe or data position differs from the one that wrote it."""
    saved = read_trainer_state(checkpoint)
    problems = resume_mismatches(checkpoint, saved, fresh, arguments, config)
    if problems:
        raise CheckpointError(
            f"Cannot resume exactly from {checkpoint}: {'; '.join(problems)}. Resume with the settings it was written "
            f"with (its {TRAINING_ARGS_NAME} and {CONFIG_NAME}), or start a new --output_dir."
        )
    try:
        accelerator.load_state(str(checkpoint))
    except CheckpointError:
        raise
    except Exception as error:  # a damaged file in a checkpoint without checksums (written by an older version)
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise CheckpointError(
            f"{checkpoint} cannot be loaded ({reason}); resume from an earlier checkpoint or start afresh with "
            "--overwrite_output_dir."
        ) from error
    accelerator.step = 0  # checkpoints are taken at optimizer-step boundaries
    state = TrainerState.from_dict(saved)
    logger.info("Resumed from %s at step %d (epoch %.2f).", checkpoint, state.global_step, state.epoch)
    return state


__all__ = [
    "CHECKSUMS_NAME",
    "TRAINER_STATE_NAME",
    "CheckpointError",
    "checkpoint_dir",
    "choose_checkpoint",
    "config_mismatches",
    "delete_checkpoint",
    "file_checksums",
    "finalize_checkpoint",
    "is_checkpoint_name",
    "list_checkpoints",
    "load_trainable_weights",
    "read_trainer_state",
    "recipe_mismatches",
    "register_heads_only_checkpointing",
    "remove_stale_folders",
    "resolve_checkpoint",
    "resume",
    "rotate_checkpoints",
    "save_checkpoint",
    "save_trainable_weights",
    "temporary_checkpoint_dir",
    "trainable_state_dict",
    "verify_checkpoint",
    "write_json",
]
