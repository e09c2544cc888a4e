"""Writing model folders and publishing them: one staged, atomic folder writer and one Hub uploader.

Every writer of a model folder (training's final folder, `visualad convert`, `visualad calibrate`, `visualad
reference`, export) builds it in a temporary sibling folder and swaps it in as a whole, so a kill or a full disk at
any moment leaves either the old folder or the new one, never a mix (e.g. a new README beside old weights).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import VisualADError

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"
# Never uploaded: training checkpoints and logs, and the staging leftovers of this module.
HUB_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    "logs/**",
    "*.tmp/**",
    "*.old/**",
    ".*.lock",
    ".visualad-*",
]
# `staged_contents` bookkeeping inside the folder it writes into (hidden, never uploaded).
CONTENTS_MANIFEST = ".visualad-contents.json"  # the names the last swap installed
CONTENTS_JOURNAL = ".visualad-swap.json"  # present only while a swap is under way
CONTENTS_STAGING = ".visualad-staging.tmp"
CONTENTS_ASIDE = ".visualad-previous.old"


class HubUploadError(VisualADError, RuntimeError):
    """An upload that did not happen; the local folder is complete and the message says how to upload it later."""


class DiskFullError(VisualADError, OSError):
    """A save that ran out of disk space; the message says what was kept intact and how to continue."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is the operating system's "no space left" (or "quota exceeded")."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


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


def installed_contents(folder: str | os.PathLike) -> list[str]:
    """The entries the last `staged_contents` swap installed in `folder` (empty when there was none)."""
    try:
        data = json.loads((Path(folder) / CONTENTS_MANIFEST).read_text())
        return [str(name) for name in data["entries"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


@contextlib.contextmanager
def staged_contents(folder: str | os.PathLike, *, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """`staged_folder` for a folder whose other entries must stay: a training output folder holds the final model
    beside `checkpoint-*/` and `logs/`, which a whole-folder swap would have to move (and a kill could strand).

    Yields an empty staging folder inside `folder`. When the block ends without error, its entries replace the
    entries of the same names in `folder`, together with the entries the previous swap installed (listed in
    `.visualad-contents.json`) and those named in `replaces` (for folders written before that list existed), as one
    recoverable transaction:

    1. the staged files are flushed to disk and the list of names is added to them;
    2. a journal (`.visualad-swap.json`: the new and the old names) is written atomically: from here on a kill is
       undone by `recover_interrupted_contents_swap`;
    3. the old entries are renamed into `.visualad-previous.old/`, then the new ones renamed in (renames within one
       folder: no copying, no disk space needed);
    4. the journal is removed (the swap is done) and so are the old entries.

    A kill at any moment therefore leaves the old set or the new set, never a mix (such as a new README beside old
    weights): with a journal, the next `staged_contents` or `recover_interrupted_contents_swap` puts the old set
    back; without one, leftovers are the finished swap's and are removed. An error in the block (a full disk)
    changes nothing in `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover_interrupted_contents_swap(folder)
    staging = folder / CONTENTS_STAGING
    staging.mkdir()
    try:
        yield staging
        names = sorted({path.name for path in staging.iterdir()} | {CONTENTS_MANIFEST})
        write_json(staging / CONTENTS_MANIFEST, {"entries": names})
        fsync_tree(staging)
        _swap_contents(folder, staging, names, {*replaces, *installed_contents(folder)})
    except BaseException:
        recover_interrupted_contents_swap(folder)  # undoes a swap that had started; removes the staging folder
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_contents(folder: Path, staging: Path, names: list[str], replaces: set[str]) -> None:
    old = sorted(name for name in {*names, *replaces} if os.path.lexists(folder / name))
    aside = folder / CONTENTS_ASIDE
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    write_json(folder / CONTENTS_JOURNAL, {"new": names, "old": old})
    fsync_dir(folder)
    for name in old:
        os.replace(folder / name, aside / name)
    for name in names:
        os.replace(staging / name, folder / name)
    fsync_dir(folder)
    os.unlink(folder / CONTENTS_JOURNAL)  # the swap is done
    fsync_dir(folder)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def recover_interrupted_contents_swap(folder: str | os.PathLike) -> str | None:
    """Undo a `staged_contents` swap that a kill interrupted (its journal is still there): the entries already moved
    in go back to the staging folder, the old ones back in place. Without a journal, remove what a finished swap or
    an interrupted staging left behind. Returns what was done (for a log line), or None. Safe to run again if killed.
    """
    folder = Path(folder)
    journal, staging, aside = folder / CONTENTS_JOURNAL, folder / CONTENTS_STAGING, folder / CONTENTS_ASIDE
    for path in folder.glob(f".{CONTENTS_JOURNAL}.*{STAGING_SUFFIX}"):  # `write_json` of a journal, cut short
        path.unlink(missing_ok=True)
    if not journal.exists():
        leftovers = [path for path in (staging, aside) if path.exists()]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return f"removed {', '.join(p.name for p in leftovers)} left by an interrupted save" if leftovers else None
    record = json.loads(journal.read_text())  # written atomically: complete or absent
    staging.mkdir(exist_ok=True)
    for name in record["new"]:  # every old entry was moved aside before the first new one was moved in
        if not os.path.lexists(staging / name) and os.path.lexists(folder / name):
            os.replace(folder / name, staging / name)
    if aside.is_dir():
        for path in aside.iterdir():
            os.replace(path, folder / path.name)
    fsync_dir(folder)
    os.unlink(journal)
    fsync_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    return f"restored the previous contents of {folder}: a save was interrupted"


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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling, fsync and rename: `path` is either absent, the old file
    or the complete new one, never a truncated file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{STAGING_SUFFIX}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to `path` atomically (`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


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
def no_progress_bars() -> Iterator[None]:
    """No transformers "Loading weights" bar for a block: a command's own progress and one-line errors stay readable."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


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
    "DiskFullError",
    "HubUploadError",
    "fsync_dir",
    "fsync_tree",
    "installed_contents",
    "is_disk_full",
    "no_progress_bars",
    "push_folder",
    "quiet_transformers_logging",
    "recover_interrupted_contents_swap",
    "recover_interrupted_swap",
    "remove_stale_staging",
    "replace_path",
    "staged_contents",
    "staged_folder",
    "write_bytes_atomic",
    "write_json",
]
