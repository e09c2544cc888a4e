"""Crash-safe output folders for batch jobs: a lock, a settings record, an append-only journal and atomic files.

A job killed at any moment (SIGKILL, power loss, a full disk) leaves only complete files under their real names
(each is written to a temporary name and renamed) and a journal of every finished item, one JSON line each, flushed
to disk as it is produced; running the same command again picks up from the journal. A folder is refused when
another process is using it (its lock is held) or when it holds the outputs of a run with other settings.

Layout inside the output folder: `.visualad/lock` (the pid of the running job), `.visualad/settings.json`,
`.visualad/journal.jsonl`, plus the job's own files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

from ..errors import VisualADError
from ..hub import fsync_dir, write_json

try:  # POSIX: the kernel drops the lock when its process dies, so a killed run never blocks the next one
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

STATE_DIR = ".visualad"
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


class OutputFolderError(VisualADError):
    """An output folder that cannot be used as asked; the message says what to do."""


def remove_temporary_files(folder: Path, subfolders: Iterable[str] = ()) -> list[Path]:
    """Remove what a killed writer left behind (`.NAME.XXXXXXXX.tmp` files) directly in `folder` and in its state
    folder, and anywhere below the `subfolders` the job writes (nothing else: `folder` may hold the user's files)."""
    removed = []
    candidates = [path for base in (folder, folder / STATE_DIR) if base.is_dir() for path in base.iterdir()]
    for name in subfolders:
        if (folder / name).is_dir():
            candidates += [Path(root) / entry for root, _, names in os.walk(folder / name) for entry in names]
    for path in candidates:
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class FolderLock:
    """An exclusive lock on an output folder, held for the lifetime of a job: `.visualad/lock` holds the pid.

    On POSIX the file is `flock`ed: the kernel releases the lock when the process ends however it ends, so the lock
    file of a killed job is taken over by the next one (`taken_over_from` names the dead pid). Elsewhere the file is
    created exclusively and a leftover one must be removed by hand (the message says which).
    """

    def __init__(self, folder: str | os.PathLike, command: str = "visualad"):
        self.folder = Path(folder)
        self.path = self.folder / STATE_DIR / "lock"
        self.command = command
        self.taken_over_from: int | None = None
        self._fd: int | None = None

    def _busy(self, pid: int | None) -> OutputFolderError:
        holder = f"pid {pid}" if pid else "another process"
        return OutputFolderError(
            f"{self.folder} is in use by a running {self.command} ({holder}); wait for it to finish, or write to "
            "another folder"
        )

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise OutputFolderError(
                    f"{self.folder} is in use by another {self.command} (pid {_read_pid_file(self.path)}); if none is "
                    f"running, delete {self.path} and run again"
                ) from None
            self._claim(fd)
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = _read_pid(fd)
                os.close(fd)
                raise self._busy(pid) from None
            try:  # the holder may have removed the file between our open and our lock: lock the current file
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        previous = _read_pid(fd)
        if previous and previous != os.getpid():
            self.taken_over_from = previous
        self._claim(fd)
        return self

    def _claim(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before closing: a waiter then sees a removed file and retries
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _read_pid_file(path: Path) -> str:  # pragma: no cover - Windows
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class Journal:
    """Append-only JSON lines, each flushed and fsynced when written; a line cut by a kill is dropped on reading."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = None

    def read(self) -> list[dict[str, Any]]:
        """Every complete entry; a partial last line (a kill mid-write) is cut off the file so appends stay valid."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
                os.fsync(handle.fileno())
        entries = []
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a damaged line: that item is simply redone
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def append(self, entry: Mapping[str, Any]) -> None:
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (kept open for the run; close())
        self._handle.write(json.dumps(entry, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def prepare_output_folder(
    folder: Path,
    settings: Mapping[str, Any],
    *,
    outputs: Iterable[str],
    overwrite: bool,
    command: str,
) -> bool:
    """Check (or reset) `folder` for a job with `settings` whose own files are `outputs`; record the settings.

    Returns True when the folder continues an earlier run with the same settings (its journal is reused). Refuses a
    folder whose run had other settings, or which holds `outputs` of an unknown run, unless `overwrite`, which deletes
    the earlier run's outputs and journal (nothing else in the folder).
    """
    state = folder / STATE_DIR
    outputs = tuple(outputs)
    settings_path = state / "settings.json"
    settings = json.loads(json.dumps(settings))  # as they read back from JSON (tuples become lists)
    previous = _read_settings(settings_path)
    existing = [name for name in outputs if (folder / name).exists()]
    if not overwrite:
        if previous is not None and previous != settings:
            changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
            details = "; ".join(f"{key}: {previous.get(key)!r} then, {settings.get(key)!r} now" for key in changed[:4])
            raise OutputFolderError(
                f"{folder} holds the outputs of a {command} run with other settings ({details}); pass --overwrite to "
                "replace them, or write to another folder"
            )
        if previous is None and existing:
            raise OutputFolderError(
                f"{folder} already holds {', '.join(existing)} from another run (settings unknown); pass --overwrite "
                "to replace them, or write to another folder"
            )
    resumed = previous == settings and not overwrite
    if not resumed:
        for name in existing:
            target = folder / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        (state / "journal.jsonl").unlink(missing_ok=True)
    remove_temporary_files(folder, outputs)
    write_json(settings_path, settings)
    fsync_dir(state)
    return resumed


def _read_settings(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": str(path)}  # differs from any real settings: refused unless --overwrite
    return data if isinstance(data, dict) else {"unreadable": str(path)}


__all__ = [
    "STATE_DIR",
    "FolderLock",
    "Journal",
    "OutputFolderError",
    "prepare_output_folder",
    "remove_temporary_files",
]
