"""Input files of batch jobs (`visualad detect`, `visualad calibrate`): finding them, reading them, scoring them in
batches where one bad file or one failing batch becomes an error for that file only and the run goes on."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.layouts import is_hidden, is_image_file
from ..image_io import ImageLoadError, to_pil_image


@dataclass
class InputFile:
    """A file to score: `path` as found, `name` its path relative to the folder given (unique within a run)."""

    path: Path
    name: Path


@dataclass
class MissingInput:
    """An input path that does not exist."""

    path: str
    error: str = "no such file or folder"


@dataclass
class ScoredFile:
    """One file's outcome: the pipeline's result, or why there is none (`error`); `image` is kept for overlays."""

    file: InputFile
    result: dict[str, Any] | None = None
    image: Image.Image | None = None
    error: str | None = None


def find_images(
    inputs: Sequence[str | Path], *, exclude: Sequence[str | Path] = ()
) -> tuple[list[InputFile], list[MissingInput]]:
    """Expand files and folders (recursively, image extensions in any case, hidden entries skipped, sorted).

    Returns the files to score and the inputs that do not exist. A file named explicitly is always scored, whatever
    its extension, so that a mislabelled or broken file is reported rather than skipped. Files below an `exclude`
    folder (e.g. the run's own output folder inside an input folder: its overlays are no inputs) are skipped.
    """
    found: list[InputFile] = []
    missing: list[MissingInput] = []
    skipped = [Path(folder).resolve() for folder in exclude]
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            base = path.resolve().name or "input"
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                if any(is_hidden(part) for part in relative.parts) or not (file.is_file() and is_image_file(file)):
                    continue
                if not any(file.resolve().is_relative_to(folder) for folder in skipped):
                    found.append(InputFile(file, Path(base) / relative))
        elif path.is_file():
            found.append(InputFile(path, Path(path.name)))
        else:
            missing.append(MissingInput(str(raw)))
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


def read_image(path: Path, bit_depth_scaling: str = "range", max_pixels: int | None = None) -> Image.Image:
    """The file as a PIL image the processor accepts; any failure is an `ImageLoadError` naming the file."""
    try:
        return to_pil_image(path, bit_depth_scaling=bit_depth_scaling, max_pixels=max_pixels)
    except ImageLoadError:
        raise
    except Exception as error:  # a decoder bug or an odd mode must not end the whole run
        raise ImageLoadError(str(path), f"cannot read ({type(error).__name__}: {error})") from error


@contextlib.contextmanager
def pillow_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Let Pillow's own bomb check (which refuses twice its limit) not undercut a larger `max_pixels`."""
    limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and limit is not None:
        Image.MAX_IMAGE_PIXELS = max(max_pixels, limit)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def score_files(
    detector,
    files: Sequence[InputFile],
    *,
    batch_size: int = 8,
    max_pixels: int | None = None,
    keep_images: bool = False,
    **call_kwargs: Any,
) -> Iterator[ScoredFile]:
    """Score `files` with an anomaly-detection pipeline, `batch_size` at a time, yielding one `ScoredFile` per file
    in order as soon as its batch is done.

    A file that cannot be read gets its `ImageLoadError` reason. A batch whose forward pass fails (e.g. out of
    memory) is retried one image at a time, so only the image that fails alone gets the error. `call_kwargs` go to
    the pipeline (`threshold=`, `return_anomaly_map=`).
    """
    bit_depth = getattr(detector.image_processor, "bit_depth_scaling", "range")
    for chunk in _chunks(files, batch_size):
        outcomes = []
        for file in chunk:
            try:
                outcomes.append(ScoredFile(file, image=read_image(file.path, bit_depth, max_pixels)))
            except ImageLoadError as error:
                outcomes.append(ScoredFile(file, error=error.reason))
        readable = [outcome for outcome in outcomes if outcome.error is None]
        if readable:
            _run_batch(detector, readable, batch_size, call_kwargs)
        for outcome in outcomes:
            if not keep_images:
                outcome.image = None
            yield outcome


def _run_batch(detector, outcomes: list[ScoredFile], batch_size: int, call_kwargs: dict[str, Any]) -> None:
    try:
        results = detector([outcome.image for outcome in outcomes], batch_size=batch_size, **call_kwargs)
    except Exception as error:  # noqa: BLE001  (any failure of one batch must not end the run; it is reported)
        if len(outcomes) == 1:
            outcomes[0].error = f"scoring failed ({_describe(error)})"
            return
        for outcome in outcomes:  # find the image that fails: the others still get their result
            _run_batch(detector, [outcome], 1, call_kwargs)
        return
    for outcome, result in zip(outcomes, results, strict=True):
        if math.isfinite(result["score"]):
            outcome.result = result
        else:  # fp16 overflow, or an image the model cannot handle: not a score to act on
            outcome.error = f"the model gave a non-finite score ({result['score']}); try --dtype float32"


__all__ = ["InputFile", "MissingInput", "ScoredFile", "find_images", "pillow_pixel_limit", "read_image", "score_files"]
