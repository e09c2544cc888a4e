"""`export_manifest.json`: what an exported folder's graph is, so that a folder whose parts disagree is caught.

The manifest records the format, opset, input size, batch mode, quantisation, a SHA-256 of every graph file and the
model settings the graph bakes in (input size, smoothing, top-k ratio, backbone shape). Loading compares them with
the folder's `config.json` and `preprocessor_config.json` and with the graph files themselves; settings applied
after the graph (the decision threshold) may change freely.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ExportMismatchError, NotAnExportedFolderError

MANIFEST_NAME = "export_manifest.json"
MANIFEST_VERSION = 1
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("anomaly_map", "score")
_HASH_BLOCK = 1 << 24


@dataclass
class ExportManifest:
    """The contents of `export_manifest.json`.

    `batch` is `"dynamic"` or the fixed batch size; `files` maps each graph file (e.g. `model.onnx`, or `model.xml`
    and `model.bin`) to its SHA-256; `model` holds the config values baked into the graph (`graph_settings`).
    """

    format: str
    graph: str
    files: dict[str, str]
    opset: int
    input_size: tuple[int, int]
    batch: str | int
    quantize: str | None
    model: dict[str, Any]
    input_name: str = INPUT_NAME
    output_names: tuple[str, ...] = OUTPUT_NAMES
    versions: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    manifest_version: int = MANIFEST_VERSION

    @property
    def static_batch(self) -> int | None:
        return None if self.batch == "dynamic" else int(self.batch)

    def describe(self) -> str:
        """One line for logs and errors, e.g. `onnx opset 18, 3x518x518, dynamic batch, fp32`."""
        height, width = self.input_size
        batch = "dynamic batch" if self.static_batch is None else f"batch {self.static_batch}"
        return f"{self.format} opset {self.opset}, 3x{height}x{width}, {batch}, {self.quantize or 'fp32'}"

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        data = asdict(self)
        data["input_size"], data["output_names"] = list(self.input_size), list(self.output_names)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ExportManifest:
        """Read a folder's manifest; `NotAnExportedFolderError` when it has none, `ExportMismatchError` when broken."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise NotAnExportedFolderError(f"{folder} is not an exported VisualAD folder (no {MANIFEST_NAME})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["input_size"] = tuple(int(value) for value in data["input_size"])
            data["output_names"] = tuple(data.get("output_names", OUTPUT_NAMES))
            manifest = cls(**data)
        except (ValueError, TypeError, KeyError) as error:
            raise ExportMismatchError(
                f"{path} is not a valid export manifest ({type(error).__name__}: {error}); export the model again "
                "with `visualad export`"
            ) from error
        if manifest.manifest_version > MANIFEST_VERSION:
            raise ExportMismatchError(
                f"{path} has manifest version {manifest.manifest_version}, newer than this visualad-hf understands "
                f"({MANIFEST_VERSION}); upgrade visualad-hf (pip install -U visualad-hf)"
            )
        return manifest


def is_exported_folder(path: str | Path) -> bool:
    """True for a local folder written by `visualad export` (it holds `export_manifest.json`)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def write_config(config, folder: str | Path) -> Path:
    """`config.json` of an exported folder: the model config without `auto_map`/`custom_pipelines` and without the
    model-side code files a model folder carries for `trust_remote_code`: a graph folder has no torch code to run."""
    data = config.to_dict()
    for key in ("auto_map", "custom_pipelines"):
        data.pop(key, None)
    path = Path(folder) / "config.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def write_processor(processor, folder: str | Path) -> Path:
    """`preprocessor_config.json` of an exported folder, without `auto_map` (no code files; see `write_config`)."""
    data = json.loads(processor.to_json_string())
    data.pop("auto_map", None)
    path = Path(folder) / "preprocessor_config.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def graph_settings(config) -> dict[str, Any]:
    """The `VisualADConfig` values an exported graph bakes in: changing any of them needs a new export."""
    vision = config.vision_config
    return {
        "image_size": int(config.image_size),
        "gaussian_sigma": float(config.gaussian_sigma),
        "topk_ratio": float(config.topk_ratio),
        "feature_layers": [int(layer) for layer in config.feature_layers],
        "backbone": vision.model_type,
        "hidden_size": int(vision.hidden_size),
        "num_hidden_layers": int(vision.num_hidden_layers),
        "patch_size": int(vision.patch_size),
    }


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_config(folder: Path, manifest: ExportManifest, config) -> None:
    """`config.json` must carry the values the graph was exported with."""
    expected, found = manifest.model, graph_settings(config)
    for name in expected:
        if found.get(name) != expected[name]:
            raise ExportMismatchError(
                f"{folder / 'config.json'} has {name}={found.get(name)!r} but the graph {folder / manifest.graph} "
                f"was exported with {name}={expected[name]!r}; export the model again with the new setting "
                "(`visualad export --model MODEL --output DIR`) or restore the exported config.json"
            )


def check_processor(folder: Path, manifest: ExportManifest, processor) -> None:
    """`preprocessor_config.json` must resize to the graph's input size."""
    size = getattr(processor, "size", None)
    height = getattr(size, "height", None) if not isinstance(size, dict) else size.get("height")
    width = getattr(size, "width", None) if not isinstance(size, dict) else size.get("width")
    if (height, width) != tuple(manifest.input_size):
        raise ExportMismatchError(
            f"{folder / 'preprocessor_config.json'} resizes to {height}x{width} but the graph {folder / manifest.graph} "
            f"takes {manifest.input_size[0]}x{manifest.input_size[1]}; restore the exported preprocessor_config.json "
            "or export the model again"
        )


def check_files(folder: Path, manifest: ExportManifest) -> None:
    """Every graph file must exist and have the SHA-256 the manifest recorded."""
    for name, digest in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise ExportMismatchError(
                f"{path} is missing (listed in {folder / MANIFEST_NAME}); copy the whole exported folder, or export "
                "the model again"
            )
        if sha256_file(path) != digest:
            raise ExportMismatchError(
                f"{path} does not match {folder / MANIFEST_NAME} (its SHA-256 differs): the graph was replaced or "
                "damaged; export the model again (`visualad export`) instead of swapping graph files"
            )


__all__ = [
    "INPUT_NAME",
    "MANIFEST_NAME",
    "OUTPUT_NAMES",
    "ExportManifest",
    "check_config",
    "check_files",
    "check_processor",
    "graph_settings",
    "is_exported_folder",
    "sha256_file",
    "write_config",
    "write_processor",
]
