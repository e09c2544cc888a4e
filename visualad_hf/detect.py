"""`visualad detect`: score images and folders, write one overlay panel per image and a results table.

```bash
visualad detect --model path/or/hub-id images/ extra.jpg --out results/ [--threshold T] [--batch-size 8]
```

Writes `results/overlays/<relative path>.png` (image | heatmap | overlay, with the score and, when a threshold is
known, the decision), `results/results.csv` and `results/results.json`. A file that cannot be read (missing, empty,
not an image, truncated, or over `--max-pixels`) is reported with its path and reason and the run goes on; the exit
status is 1 when any file failed, 0 otherwise (2 for a usage error such as no images found).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .data.layouts import is_hidden, is_image_file
from .image_processing_visualad import ImageLoadError, to_pil_image
from .visualization import render_panel

RESULT_FIELDS = ("path", "status", "score", "is_anomalous", "threshold", "overlay", "error")


@dataclass
class InputFile:
    """A file to score: `path` as found, `name` its path relative to the folder given (unique within a run)."""

    path: Path
    name: Path


@dataclass
class DetectionRecord:
    path: str
    status: str  # "ok" or "error"
    score: float | None = None
    is_anomalous: bool | None = None
    threshold: float | None = None
    overlay: str | None = None
    error: str | None = None


def find_images(inputs: Sequence[str | Path]) -> tuple[list[InputFile], list[DetectionRecord]]:
    """Expand files and folders (recursively, image extensions in any case, hidden entries skipped, sorted).

    Returns the files to score and an error record for every input that does not exist. A file named explicitly is
    always scored, whatever its extension, so that a mislabelled or broken file is reported rather than skipped.
    """
    found: list[InputFile] = []
    missing: list[DetectionRecord] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            base = path.resolve().name or "input"
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                if file.is_file() and is_image_file(file) and not any(is_hidden(part) for part in relative.parts):
                    found.append(InputFile(file, Path(base) / relative))
        elif path.is_file():
            found.append(InputFile(path, Path(path.name)))
        else:
            missing.append(DetectionRecord(str(raw), "error", error="no such file or folder"))
    return _unique_names(found), missing


def _unique_names(files: list[InputFile]) -> list[InputFile]:
    taken: set[Path] = set()
    for file in files:
        name, counter = file.name, 1
        while name.with_suffix(".png") in taken:
            counter += 1
            name = file.name.with_name(f"{file.name.stem}-{counter}{file.name.suffix}")
        file.name = name
        taken.add(name.with_suffix(".png"))
    return files


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="VisualAD model folder or Hub id")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--threshold", type=float, default=None, help="decision threshold (default: the model's calibrated one)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model precision"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=Image.MAX_IMAGE_PIXELS,
        help=f"refuse images with more pixels than this (default {Image.MAX_IMAGE_PIXELS:,}, Pillow's limit)",
    )
    parser.add_argument(
        "--heatmap-range",
        type=float,
        nargs=2,
        metavar=("VMIN", "VMAX"),
        default=None,
        help="fixed colour scale for all heatmaps (default: each map's own min..max)",
    )
    parser.add_argument("--no-overlays", action="store_true", help="write only results.csv/json")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_detector(model: str, device: str | None, dtype: str):
    """The anomaly-detection pipeline for a model folder or Hub id."""
    import torch
    from transformers import pipeline

    import visualad_hf  # noqa: F401  (registers the task)

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return pipeline("anomaly-detection", model=model, device=device, dtype=getattr(torch, dtype))


def load_for_detection(files: Sequence[InputFile], bit_depth_scaling: str, max_pixels: int | None):
    """Read each file; yields `(file, image or None, ImageLoadError or None)`."""
    for file in files:
        try:
            yield file, to_pil_image(file.path, bit_depth_scaling=bit_depth_scaling, max_pixels=max_pixels), None
        except ImageLoadError as error:
            yield file, None, error


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        print("--batch-size must be at least 1", file=sys.stderr)
        return 2
    files, records = find_images(args.inputs)
    if not files:
        print(f"No images found in {', '.join(map(str, args.inputs))}.", file=sys.stderr)
        _report_failures(records)
        return 2
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own bomb check (which refuses twice its limit) must not undercut a larger --max-pixels.
        Image.MAX_IMAGE_PIXELS = max(args.max_pixels, pillow_limit or 0)
        detected, threshold = detect_files(files, args)
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    records += detected

    write_results(args.out, records, model=args.model, threshold=threshold)
    failed = [record for record in records if record.status != "ok"]
    print(
        f"{len(records) - len(failed)} image(s) scored, {len(failed)} failed; results in {args.out}/results.csv",
        file=sys.stderr,
    )
    _report_failures(failed)
    return 1 if failed else 0


def detect_files(files: Sequence[InputFile], args: argparse.Namespace) -> tuple[list[DetectionRecord], float | None]:
    """Score `files` in batches, writing overlay panels as it goes.

    Returns one record per file (failures included) and the threshold used (`--threshold`, else the model's).
    """
    from tqdm.auto import tqdm

    detector = build_detector(args.model, args.device, args.dtype)
    threshold = args.threshold if args.threshold is not None else detector.model.config.anomaly_threshold
    value_range = tuple(args.heatmap_range) if args.heatmap_range else None
    bit_depth = detector.image_processor.bit_depth_scaling
    records: list[DetectionRecord] = []
    with tqdm(total=len(files), unit="img", desc="visualad detect", disable=args.quiet) as progress:
        for chunk in _chunks(files, args.batch_size):
            loaded = list(load_for_detection(chunk, bit_depth, args.max_pixels))
            images = [image for _, image, error in loaded if error is None]
            results = iter(detector(images, batch_size=args.batch_size, threshold=threshold) if images else [])
            for file, image, error in loaded:
                if error is not None:
                    records.append(DetectionRecord(str(file.path), "error", error=error.reason))
                    continue
                result = next(results)
                record = DetectionRecord(
                    str(file.path), "ok", result["score"], result.get("is_anomalous"), result["threshold"]
                )
                if not args.no_overlays:
                    record.overlay = str(Path("overlays") / file.name.with_suffix(".png"))
                    target = args.out / record.overlay
                    target.parent.mkdir(parents=True, exist_ok=True)
                    render_panel(
                        image,
                        result["anomaly_map"],
                        result["score"],
                        threshold,
                        title=str(file.path),
                        value_range=value_range,
                    ).save(target)
                records.append(record)
            progress.update(len(chunk))
    return records, threshold


def _report_failures(records: Sequence[DetectionRecord]) -> None:
    for record in records:
        print(f"error: {record.path}: {record.error}", file=sys.stderr)


def write_results(out: Path, records: Sequence[DetectionRecord], *, model: str, threshold: float | None) -> None:
    """`results.csv` (one row per input) and `results.json` (the same rows plus a summary)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(record) for record in records]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows({key: ("" if value is None else value) for key, value in row.items()} for row in rows)
    summary = {
        "model": model,
        "threshold": threshold,
        "num_images": len(rows),
        "num_ok": sum(row["status"] == "ok" for row in rows),
        "num_failed": sum(row["status"] != "ok" for row in rows),
        "num_anomalous": sum(bool(row["is_anomalous"]) for row in rows),
    }
    with open(out / "results.json", "w", encoding="utf-8") as handle:
        json.dump({"summary": summary, "results": rows}, handle, indent=2)
        handle.write("\n")


__all__ = ["DetectionRecord", "InputFile", "add_arguments", "build_detector", "find_images", "run", "write_results"]
