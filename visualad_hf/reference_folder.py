"""`visualad reference`'s library side: a model folder plus a few-shot reference bank built from good images.

```python
from visualad_hf.reference_folder import write_reference_model

write_reference_model("path/to/visualad", ["good/"], "path/to/visualad-with-bank")   # model + bank + processor
```

The output folder is the input model (weights, config, image processor, model card) saved again with
`reference_bank.safetensors` beside it; `pipeline("anomaly-detection", model=...)`, `visualad detect` and
`VisualADModel.from_pretrained` then use the bank. It is written in a staging folder and swapped in whole.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .few_shot import REFERENCE_BANK_FILE, REFERENCE_FUSIONS, ReferenceBankError

# Files of a model folder that `save_pretrained` does not write but that belong with the model.
COPIED_FILES = ("README.md",)


@dataclass
class ReferenceFolder:
    output: Path
    num_images: int
    bank_bytes: int
    images: list[str]


def find_normal_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files of `inputs` (files, or folders searched recursively; hidden entries skipped), sorted."""
    from .data.layouts import is_hidden, is_image_file

    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found += sorted(f for f in path.rglob("*") if f.is_file() and is_image_file(f)
                            and not any(is_hidden(p) for p in f.relative_to(path).parts))  # fmt: skip
        elif path.is_file():
            found.append(path)
        else:
            raise ReferenceBankError(f"{path}: no such file or folder; pass folders or files of good images to --normal")
    if not found:
        raise ReferenceBankError(
            f"no images in {', '.join(map(str, inputs))}; --normal needs good images (png, jpg, bmp, tif, webp)"
        )
    return found


def write_reference_model(
    model_id: str | os.PathLike,
    normal: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    batch_size: int = 8,
    device: str = "auto",
    fusion: str | None = None,
    weight: float | None = None,
    max_images: int | None = None,
) -> ReferenceFolder:
    """Load `model_id`, build its reference bank from the good images in `normal` (at most `max_images`, the
    first in sorted order) and write the model with the bank to `output`."""
    from .hub import staged_folder
    from .image_io import load_image
    from .inference import load_model_for_inference

    files = find_normal_images(normal)[:max_images]
    model, processor, _ = load_model_for_inference(str(model_id), device=device)
    if fusion is not None and fusion not in REFERENCE_FUSIONS:
        raise ReferenceBankError(f"fusion {fusion!r} is unknown; choose one of {', '.join(REFERENCE_FUSIONS)}")
    if weight is not None and not weight >= 0:
        raise ReferenceBankError(f"weight {weight} must be a number >= 0 (the bank distance's weight in 'add' fusion)")
    if fusion is not None:
        model.config.reference_fusion = fusion
    if weight is not None:
        model.config.reference_weight = float(weight)
    images = [load_image(str(file)) for file in files]  # ImageLoadError names the file
    names = [str(file) for file in files]
    model.set_reference(images, image_processor=processor, batch_size=batch_size, names=names)
    source = Path(model_id)
    with staged_folder(output) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
    return ReferenceFolder(Path(output), len(files), model.reference_bank.nbytes(), names)


__all__ = ["REFERENCE_BANK_FILE", "ReferenceFolder", "find_normal_images", "write_reference_model"]
