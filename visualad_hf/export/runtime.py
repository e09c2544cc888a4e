"""Running an exported folder with ONNX Runtime or OpenVINO, without the torch model.

`ExportedVisualADModel.from_pretrained(folder)` checks the folder (manifest, graph hashes, config and preprocessor
against the graph) and returns a model-like object: `model(pixel_values=...)` gives the fields the torch path's
post-processing reads (`anomaly_map`, plus `score`), so `pipeline("anomaly-detection", model=folder)` and
`visualad detect --model folder` work on it unchanged. Its maps are already smoothed (`is_smoothed`), which the
image processor's post-processing honours.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.utils import logging

from ..configuration_visualad import VisualADConfig
from .errors import (
    ONNX_EXTRA,
    OPENVINO_EXTRA,
    ExportMismatchError,
    InputSizeError,
    NotAnExportedFolderError,
    UnknownFormatError,
    require,
)
from .manifest import MANIFEST_NAME, ExportManifest, check_config, check_files, check_processor, write_config

logger = logging.get_logger(__name__)

FORMATS = ("onnx", "openvino")
README_NAME = "README.md"


@dataclass
class ExportedVisualADOutput:
    """Output of an exported graph: `anomaly_map` `[B, H, W]`, already Gaussian-smoothed, and `score` `[B]`.

    `is_smoothed` tells `post_process_anomaly_detection` not to smooth the map a second time.
    """

    anomaly_map: torch.Tensor
    score: torch.Tensor
    is_smoothed: ClassVar[bool] = True


class OnnxRuntimeSession:
    """An ONNX Runtime session on the folder's graph (CPU unless other execution providers are asked for)."""

    def __init__(self, path: Path, providers: list[str] | None = None, num_threads: int | None = None):
        ort = require("onnxruntime", ONNX_EXTRA)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle worker threads sleep instead of spinning: on a CPU shared with the rest of an inspection pipeline (or
        # other sessions) spinning steals the cores they need, for a gain of microseconds per call.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        unknown = [name for name in providers if name not in available]
        if unknown:
            raise UnknownFormatError(
                f"ONNX Runtime execution provider(s) {unknown} are not available in this onnxruntime build "
                f"(available: {available}); install the matching onnxruntime package (e.g. onnxruntime-gpu) or "
                "choose from the available ones"
            )
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.providers = self.session.get_providers()
        self.input_shape = tuple(self.session.get_inputs()[0].shape)

    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        anomaly_map, score = self.session.run(None, {self.session.get_inputs()[0].name: pixel_values})
        return anomaly_map, score


class OpenVINOSession:
    """An OpenVINO compiled model on the folder's IR, in float32 (OpenVINO would otherwise pick bf16 on some CPUs)."""

    def __init__(self, path: Path, device: str = "CPU", num_threads: int | None = None):
        ov = require("openvino", OPENVINO_EXTRA)
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        self.compiled = core.compile_model(core.read_model(str(path)), device, config)
        self.providers = [f"OpenVINO:{device}"]
        shape = self.compiled.input(0).get_partial_shape()
        self.input_shape = tuple(dimension.get_length() if dimension.is_static else "batch" for dimension in shape)
        self.request = self.compiled.create_infer_request()

    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = self.request.infer({0: pixel_values})
        return results[self.compiled.output(0)].copy(), results[self.compiled.output(1)].copy()


def open_session(folder: Path, manifest: ExportManifest, providers=None, num_threads=None, openvino_device="CPU"):
    path = folder / manifest.graph
    if manifest.format == "onnx":
        return OnnxRuntimeSession(path, providers, num_threads)
    if manifest.format == "openvino":
        return OpenVINOSession(path, openvino_device, num_threads)
    raise UnknownFormatError(
        f"{folder / MANIFEST_NAME} names the format {manifest.format!r}; this visualad-hf runs {', '.join(FORMATS)} "
        "(upgrade visualad-hf or export again)"
    )


class ExportedVisualADModel:
    """A model-like runner of an exported folder (no `nn.Module`): what the pipeline and `visualad detect` use.

    It has the attributes the pipeline reads from a model (`config`, `device`, `dtype`, `to`, `eval`, `can_generate`)
    and returns `ExportedVisualADOutput` from `model(pixel_values=...)`. A static-batch graph takes any batch: the
    batch is cut into graph-sized chunks, the last one padded.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    dtype = torch.float32
    is_smoothed = True

    def __init__(self, folder: Path, manifest: ExportManifest, config: VisualADConfig, session):
        self.folder = folder
        self.manifest = manifest
        self.config = config
        self.session = session
        self.device = torch.device("cpu")
        self.name_or_path = str(folder)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        providers: list[str] | None = None,
        num_threads: int | None = None,
        openvino_device: str = "CPU",
        check_hashes: bool = True,
        dtype: Any = None,
        **unused: Any,
    ) -> ExportedVisualADModel:
        """Open an exported folder.

        Args:
            pretrained_model_name_or_path: a local folder written by `visualad export`.
            providers: ONNX Runtime execution providers (default `["CPUExecutionProvider"]`).
            num_threads: intra-op threads (ONNX Runtime) / inference threads (OpenVINO); default: the runtime's.
            openvino_device: OpenVINO device name (`"CPU"`, `"GPU"`, ...).
            check_hashes: verify every graph file against the manifest's SHA-256 (a second or two for ViT-L).
            dtype: accepted for the pipeline's sake; exported graphs compute in float32.
            unused: other `from_pretrained` arguments the pipeline passes (revision, token, ...), ignored.

        Raises:
            NotAnExportedFolderError: not a local exported folder (so the pipeline tries the torch classes next).
            ExportMismatchError: the folder's config, preprocessor, manifest and graph disagree.
            MissingRuntimeError: the runtime the folder needs is not installed.
        """
        folder = Path(pretrained_model_name_or_path)
        manifest = ExportManifest.load(folder)  # NotAnExportedFolderError when there is none
        from ..image_processing_visualad import VisualADImageProcessor

        try:
            config = VisualADConfig.from_pretrained(folder)
            processor = VisualADImageProcessor.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ExportMismatchError(
                f"{folder}: cannot read config.json / preprocessor_config.json of the exported folder "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); export the model again"
            ) from error
        check_config(folder, manifest, config)
        check_processor(folder, manifest, processor)
        if check_hashes:
            check_files(folder, manifest)
        if dtype not in (None, "auto", torch.float32, "float32"):
            logger.warning(f"{folder} is an exported float32 graph; dtype={dtype} is ignored.")
        session = open_session(folder, manifest, providers, num_threads, openvino_device)
        runner = cls(folder, manifest, config, session)
        runner._check_graph_input(session.input_shape)
        runner.image_processor = processor
        return runner

    def _check_graph_input(self, shape: tuple) -> None:
        """The graph's declared input must be what the manifest says (catches a graph swapped without re-hashing)."""
        expected_batch = self.manifest.static_batch
        if (
            len(shape) != 4
            or tuple(shape[1:]) != (3, *self.manifest.input_size)
            or (expected_batch is not None and shape[0] != expected_batch)
        ):
            raise ExportMismatchError(
                f"{self.folder / self.manifest.graph} takes input of shape {list(shape)} but "
                f"{self.folder / MANIFEST_NAME} says {self.manifest.describe()}; export the model again"
            )

    # -- what the pipeline reads from a model ------------------------------------------------------------------------

    @property
    def providers(self) -> list[str]:
        return list(self.session.providers)

    def to(self, device: str | torch.device | None = None, *args: Any, **kwargs: Any) -> ExportedVisualADModel:
        """Outputs are placed on `device`; the graph itself runs where its providers run (the CPU by default)."""
        if device is not None and not isinstance(device, torch.dtype):
            self.device = torch.device(device)
            if self.device.type != "cpu" and self.session.providers == ["CPUExecutionProvider"]:
                logger.warning(
                    f"The exported graph in {self.folder} runs on ONNX Runtime's CPU provider; outputs are moved to "
                    f"{self.device}. Pass providers=['CUDAExecutionProvider'] (onnxruntime-gpu) to run it on the GPU."
                )
        return self

    training = False

    def eval(self) -> ExportedVisualADModel:
        return self

    def train(self, mode: bool = True) -> ExportedVisualADModel:
        """A graph has no training mode; accepted so that evaluation code can restore a model's mode."""
        return self

    def parameters(self):
        """No trainable parameters: one empty float32 tensor on the output device, which is what code that asks a
        model for its device and dtype (`next(model.parameters())`, e.g. `evaluate_model`) needs."""
        yield torch.empty(0, dtype=self.dtype, device=self.device)

    def can_generate(self) -> bool:
        return False

    def __call__(self, pixel_values: torch.Tensor | np.ndarray, **unused: Any) -> ExportedVisualADOutput:
        """Run the graph on `pixel_values` `[B, 3, H, W]` (the image processor's output)."""
        array = pixel_values.detach().cpu().numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values
        array = np.ascontiguousarray(array, dtype=np.float32)
        self._check_input(array.shape)
        anomaly_map, score = self._run_batched(array)
        return ExportedVisualADOutput(
            anomaly_map=torch.from_numpy(anomaly_map).to(self.device), score=torch.from_numpy(score).to(self.device)
        )

    forward = __call__

    def _check_input(self, shape: tuple[int, ...]) -> None:
        height, width = self.manifest.input_size
        if len(shape) != 4 or tuple(shape[1:]) != (3, height, width) or shape[0] < 1:
            raise InputSizeError(
                f"the exported graph {self.folder / self.manifest.graph} takes pixel_values of shape "
                f"[batch, 3, {height}, {width}], got {list(shape)}; prepare images with the folder's image processor "
                f"(VisualADImageProcessor.from_pretrained({str(self.folder)!r})), or export the model at this size"
            )

    def _run_batched(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.manifest.static_batch
        if size is None or array.shape[0] == size:
            return self.session.run(array)
        maps, scores = [], []
        for start in range(0, array.shape[0], size):
            chunk = array[start : start + size]
            count = chunk.shape[0]
            if count < size:  # pad the last chunk to the graph's batch; the padding's outputs are dropped
                chunk = np.concatenate([chunk, np.zeros((size - count, *chunk.shape[1:]), dtype=chunk.dtype)])
            chunk_maps, chunk_scores = self.session.run(chunk)
            maps.append(chunk_maps[:count])
            scores.append(chunk_scores[:count])
        return np.concatenate(maps), np.concatenate(scores)

    def save_pretrained(self, save_directory: str | os.PathLike, **unused: Any) -> None:
        """Copy the exported folder with the current config (e.g. after `visualad calibrate` set a threshold)."""
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        if target.resolve() != self.folder.resolve():
            for name in (*self.manifest.files, MANIFEST_NAME, README_NAME):
                if (self.folder / name).is_file():
                    shutil.copy2(self.folder / name, target / name)
        write_config(self.config, target)

    def __repr__(self) -> str:
        return f"ExportedVisualADModel({str(self.folder)!r}, {self.manifest.describe()}, providers={self.providers})"


def load_exported(folder: str | os.PathLike, **kwargs: Any) -> ExportedVisualADModel:
    """`ExportedVisualADModel.from_pretrained(folder, **kwargs)`."""
    return ExportedVisualADModel.from_pretrained(folder, **kwargs)


def load_exported_for_inference(folder: str | os.PathLike, device: str = "cpu", **kwargs: Any):
    """The runner and the folder's image processor as `visualad_hf.inference.loading.build_detector` takes them."""
    from ..inference.loading import InferenceModel

    runner = ExportedVisualADModel.from_pretrained(folder, **kwargs).to(device)
    return InferenceModel(runner, runner.image_processor, device)


__all__ = [
    "FORMATS",
    "ExportedVisualADModel",
    "ExportedVisualADOutput",
    "NotAnExportedFolderError",
    "load_exported",
    "load_exported_for_inference",
]
