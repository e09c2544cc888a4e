"""Writing model folders and publishing them: one staged, atomic folder writer and one Hub uploader.

Every writer of a model folder (training's final folder, `visualad convert`, `visualad calibrate`, `visualad
reference`, export) builds it in a temporary sibling folder and swaps it in as a whole, so a kill or a full disk at
any moment leaves either the old folder or the new one, never a mix (e.g. a new README beside old weights).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import VisualADError

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"
# Never uploaded: training checkpoints and logs, and the staging leftovers of this module.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", "*.tmp/**", "*.old/**", ".*.lock"]


class HubUploadError(VisualADError, RuntimeError):
    """An upload that did not happen; the local folder is complete and the message says how to upload it later."""


# ---------------------------------------------------------------------------------------------------------------------
# Atomic replacement


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file below `root` (and `root` itself) to disk before it is renamed into place."""
    root = Path(root)
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


def replace_path(source: Path, target: Path) -> None:
    """Move `source` to `target` atomically. An existing `target` folder is first renamed to `target.old` and removed
    after the new one is in place, so a kill at any point leaves a complete folder under `target` or under
    `target.old`; `recover_interrupted_swap` puts the latter back."""
    source, target = Path(source), Path(target)
    if not (target.is_dir() and source.is_dir()):
        os.replace(source, target)
        fsync_dir(target.parent)
        return
    aside = target.with_name(target.name + ASIDE_SUFFIX)
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(target, aside)
    os.replace(source, target)
    fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_interrupted_swap(target: str | os.PathLike) -> str | None:
    """Finish or undo a `replace_path` that a kill interrupted; returns what was done (for a log line), or None.

    `target.old` without `target`: the kill came between the two renames, so the old folder is restored (never
    deleted). `target.old` beside `target`: the new folder was in place, so the old one is removed.
    """
    target = Path(target)
    aside = target.with_name(target.name + ASIDE_SUFFIX)
    if not aside.exists():
        return None
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)
        return f"removed {aside}, left behind after {target} was replaced"
    os.replace(aside, target)
    fsync_dir(target.parent)
    return f"restored {target} from {aside}: a replacement was interrupted"


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block ends without error, it replaces `target` as a
    whole (atomically, see `replace_path`). On an error (a full disk, an exception) `target` is left untouched and
    the temporary folder removed (kept with `keep_on_error`, for debugging).

        with staged_folder(output_dir) as staging:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(target)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{STAGING_SUFFIX}")
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        replace_path(staging, target)
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_staging(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders `staged_folder` leaves when killed (`.NAME.XXXXXXXX.tmp`) in `parent`."""
    removed = []
    root = Path(parent)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".") and path.name.endswith(STAGING_SUFFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{STAGING_SUFFIX}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# Hub


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload VisualAD model",
    ignore_patterns: Sequence[str] = HUB_IGNORE_PATTERNS,
) -> str:
    """Upload a finished model folder (without checkpoints, logs and staging leftovers); return the repository URL.

    Fails fast with `HubUploadError` when offline (`HF_HUB_OFFLINE=1`, or the Hub unreachable) instead of retrying
    for half a minute; every failure says that the local folder is complete and gives the command to upload it later.
    """
    from huggingface_hub import HfApi, constants, is_offline_mode
    from huggingface_hub.utils import get_session

    later = f"The model is complete in {folder}; upload it later with `hf upload {repo_id} {folder}`."
    if is_offline_mode():
        raise HubUploadError(f"Not uploaded to {repo_id}: HF_HUB_OFFLINE=1 forbids network access. {later}")
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as error:  # any network failure means the same thing here: not reachable now
        raise HubUploadError(f"Not uploaded to {repo_id}: cannot reach {constants.ENDPOINT} ({error}). {later}") from error
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=os.fspath(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns),
        )
    except Exception as error:  # authentication, permissions, quota, network: all leave a complete local folder
        raise HubUploadError(f"Upload to {repo_id} failed: {type(error).__name__}: {str(error)[:300]}. {later}") from error
    logger.info("Uploaded %s to %s", folder, url)
    return str(url)


@contextlib.contextmanager
def quiet_transformers_logging() -> Iterator[None]:
    """Silence transformers' load reports (e.g. the expected "unexpected keys" of a CLIP text tower) for a block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


__all__ = [
    "HUB_IGNORE_PATTERNS",
    "HubUploadError",
    "fsync_dir",
    "fsync_tree",
    "push_folder",
    "quiet_transformers_logging",
    "recover_interrupted_swap",
    "remove_stale_staging",
    "replace_path",
    "staged_folder",
    "write_json",
]
