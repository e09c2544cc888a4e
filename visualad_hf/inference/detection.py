"""Scoring images into an output folder (what `visualad detect` runs): overlay panels and a results table,
crash-safe and resumable.

Every finished image is appended to the folder's journal (`output_folder.Journal`) right after its overlay panel is
in place (written to a temporary name and renamed), so a kill loses at most the images in flight; `results.csv` (one
row per input) and `results.json` (the same rows, the settings and a summary) are written atomically at the end.
Running the same command again skips the images the journal holds (a file is redone when its size, modification
time or overlay name changed) and completes the folder; `overwrite=True` redoes everything.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..hub import write_bytes_atomic, write_json
from ..visualization import ColourScale, map_value_bounds, render_panel
from .inputs import InputFile, MissingInput, pillow_pixel_limit, score_files
from .loading import WEIGHT_FILES
from .output_folder import (
    STATE_DIR,
    FolderLock,
    Journal,
    OutputFolderError,
    prepare_output_folder,
)

RESULT_FIELDS = ("path", "status", "score", "is_anomalous", "threshold", "overlay", "error")
OUTPUTS = ("results.csv", "results.json", "overlays")


@dataclass
class DetectionRecord:
    path: str
    status: str  # "ok" or "error"
    score: float | None = None
    is_anomalous: bool | None = None
    threshold: float | None = None
    overlay: str | None = None
    error: str | None = None


@dataclass
class DetectionSummary:
    """What a run did: one record per input (in input order), how many were taken from an earlier run."""

    output: Path
    records: list[DetectionRecord]
    resumed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[DetectionRecord]:
        return [record for record in self.records if record.status != "ok"]


def model_fingerprint(config) -> str:
    """A short hash of the model's config (threshold included): a changed model is a changed setting."""
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


def _weights_stamp(model: str) -> dict[str, list[int]] | None:
    """Size and modification time of a local model's weight files: weights retrained in place are a new model
    (hashing a 1 GB file on every run would be slow). None for a Hub id (its config hash stands for it)."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    stamps = {}
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin")):
        stat = path.stat()
        stamps[path.name] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def default_colour_scale(config) -> ColourScale:
    """The colour range of overlays when none is given: the model's full map range (`map_value_bounds`)."""
    return map_value_bounds(len(config.feature_layers))


def _file_key(file: InputFile, overlay: str | None) -> dict[str, Any]:
    stat = file.path.stat()
    return {"path": str(file.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "overlay": overlay}


def _overlay_name(file: InputFile, overlays: bool) -> str | None:
    return str(Path("overlays") / file.name.with_suffix(".png")) if overlays else None


def detect_to_folder(
    detector,
    files: Sequence[InputFile],
    output: str | os.PathLike,
    *,
    missing: Sequence[MissingInput] = (),
    model: str,
    threshold: float | None = None,
    colour_scale: ColourScale | None = None,
    overlays: bool = True,
    batch_size: int = 8,
    max_pixels: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> DetectionSummary:
    """Score `files` with `detector` into `output` (layout and crash safety: module docstring).

    `threshold` defaults to the model's calibrated one; `colour_scale` to `default_colour_scale`. The folder is locked
    for the run; a folder in use, or holding another run's outputs with other settings, raises `OutputFolderError`.
    `progress(n)` is called as images finish.
    """
    output = Path(output)
    config = detector.model.config
    threshold = threshold if threshold is not None else config.anomaly_threshold
    scale = colour_scale or default_colour_scale(config)
    settings = {
        "command": "visualad detect",
        "model": str(Path(model).resolve()) if Path(model).exists() else model,
        "model_config_sha256": model_fingerprint(config),
        "model_weights": _weights_stamp(model),
        "threshold": threshold,
        "colour_scale": [scale.low, scale.high] if overlays else None,
        "overlays": overlays,
        "max_pixels": max_pixels,
        "dtype": dtype,
    }
    _make_folder(output)
    with FolderLock(output, "visualad detect") as lock:
        notes = [f"took over the lock of pid {lock.taken_over_from}, which is no longer running"] * bool(
            lock.taken_over_from
        )
        resumed = prepare_output_folder(output, settings, outputs=OUTPUTS, overwrite=overwrite, command="visualad detect")
        journal = Journal(output / STATE_DIR / "journal.jsonl")
        try:
            done = _finished_entries(journal, files, overlays) if resumed else {}
            if done:
                notes.append(f"{len(done)} of {len(files)} image(s) were done by an earlier run and are kept")
            if progress and done:
                progress(len(done))
            todo = [file for file in files if str(file.path) not in done]
            with pillow_pixel_limit(max_pixels):
                new = _score_into(
                    detector, todo, output, journal, threshold, scale if overlays else None, batch_size, max_pixels,
                    progress,
                )
        finally:
            journal.close()
        records = [done.get(str(file.path)) or new[str(file.path)] for file in files]
        records += [DetectionRecord(item.path, "error", error=item.error) for item in missing]
        write_results(output, records, model=model, threshold=threshold, settings=settings)
    return DetectionSummary(output, records, resumed=len(done), notes=notes)


def _make_folder(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise OutputFolderError(f"{output} is a file; --output must be a folder (it is created when missing)")
    if (output / "config.json").is_file() and any((output / name).is_file() for name in WEIGHT_FILES):
        raise OutputFolderError(f"{output} is a model folder; write the results to another folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OutputFolderError(f"cannot create the output folder {output} ({error.strerror}); choose another one") from error


def _finished_entries(journal: Journal, files: Sequence[InputFile], overlays: bool) -> dict[str, DetectionRecord]:
    """The journal's successful records that still describe the current files (same size, mtime, overlay name)."""
    entries = {}
    for entry in journal.read():
        if entry.get("record", {}).get("status") == "ok":
            entries[entry.get("key", {}).get("path")] = entry
    done = {}
    for file in files:
        entry = entries.get(str(file.path))
        if entry is None:
            continue
        try:
            key = _file_key(file, _overlay_name(file, overlays))
        except OSError:
            continue
        overlay = entry["record"].get("overlay")
        if entry["key"] == key and (overlay is None or (journal.path.parents[1] / overlay).is_file()):
            done[str(file.path)] = DetectionRecord(**entry["record"])
    return done


def _score_into(
    detector,
    files: Sequence[InputFile],
    output: Path,
    journal: Journal,
    threshold: float | None,
    scale: ColourScale | None,
    batch_size: int,
    max_pixels: int | None,
    progress: Callable[[int], None] | None,
) -> dict[str, DetectionRecord]:
    records: dict[str, DetectionRecord] = {}
    scored = score_files(
        detector, files, batch_size=batch_size, max_pixels=max_pixels, keep_images=scale is not None,
        threshold=threshold, return_anomaly_map=scale is not None,
    )
    for item in scored:
        path = str(item.file.path)
        if item.error is not None:
            record = DetectionRecord(path, "error", error=item.error)
        else:
            result = item.result
            record = DetectionRecord(path, "ok", result["score"], result.get("is_anomalous"), result["threshold"])
            if scale is not None:
                record.overlay = _overlay_name(item.file, True)
                _write_panel(output / record.overlay, item, threshold, scale)
        try:
            key = _file_key(item.file, record.overlay)
        except OSError:  # the file went away while the run was going: its row stands, it is simply not journaled
            key = None
        if key is not None:
            journal.append({"key": key, "record": asdict(record)})
        records[path] = record
        if progress:
            progress(1)
    return records


def _write_panel(target: Path, item, threshold: float | None, scale: ColourScale) -> None:
    panel = render_panel(
        item.image, item.result["anomaly_map"], item.result["score"], threshold, title=str(item.file.path),
        value_range=scale,
    )
    buffer = io.BytesIO()
    panel.save(buffer, format="PNG")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, buffer.getvalue())


def write_results(
    out: str | os.PathLike,
    records: Sequence[DetectionRecord],
    *,
    model: str,
    threshold: float | None,
    settings: dict[str, Any] | None = None,
) -> None:
    """`results.csv` (one row per input) and `results.json` (the same rows, the settings and a summary), each
    written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(record) for record in records]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=RESULT_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: ("" if value is None else value) for key, value in row.items()} for row in rows)
    write_bytes_atomic(out / "results.csv", text.getvalue().encode("utf-8"))
    summary = {
        "model": model,
        "threshold": threshold,
        "num_images": len(rows),
        "num_ok": sum(row["status"] == "ok" for row in rows),
        "num_failed": sum(row["status"] != "ok" for row in rows),
        "num_anomalous": sum(bool(row["is_anomalous"]) for row in rows),
    }
    write_json(out / "results.json", {"summary": summary, "settings": settings or {}, "results": rows})


__all__ = [
    "DetectionRecord",
    "DetectionSummary",
    "default_colour_scale",
    "detect_to_folder",
    "model_fingerprint",
    "write_results",
]
