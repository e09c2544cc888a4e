"""Loading a VisualAD model for inference, with one-line errors for the mistakes people make with models and devices.

`load_model_for_inference(model, device, dtype)` is the one loader behind `visualad detect`, `visualad calibrate` and
`visualad evaluate`: a wrong path, a Hub id while offline, a folder that is not a model (or holds another kind of
model), `cuda` on a machine without a GPU or `gpu` as a device name all raise a `VisualADError` subclass whose
message names the input and the fix, instead of a transformers traceback ("Repo id must be in the form ...").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..data.layouts import is_image_file
from ..errors import VisualADError
from ..hub import no_progress_bars, quiet_transformers_logging

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MODEL_FOLDER_HINT = (
    "a VisualAD model folder holds config.json and model.safetensors (written by training, `visualad convert` or "
    "save_pretrained)"
)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(VisualADError, OSError):
    """A model that cannot be loaded: the message names it and says what to pass instead."""


class DeviceError(VisualADError, ValueError):
    """A device name this machine cannot use."""


class InferenceModel(NamedTuple):
    """A model ready for inference (eval mode, on `device`) and its image processor."""

    model: Any  # VisualADModel
    image_processor: Any  # VisualADImageProcessor
    device: str


def resolve_device(device: str | torch.device | None) -> str:
    """The torch device name for `device` (`None`/`auto`: a CUDA GPU when visible, else the CPU), checked against
    this machine so that a wrong name fails here with the fix rather than deep inside a forward pass."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name in ("gpu", "cuda:gpu") or name.startswith("gpu:"):
        raise DeviceError(f"{device!r} is not a device name; use cuda (or cuda:0, cuda:1, ...) or cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("mps was asked for but this machine has no usable Apple GPU; use --device cpu")
        return name
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise DeviceError(f"{device!r} is not a device name; use cuda:N with a number N, or cpu")
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{device} was asked for but no CUDA GPU is visible to PyTorch (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'no'}); use --device cpu, or install a CUDA build of PyTorch"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"{device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return name
    raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"dtype {dtype} is not supported for inference; use float32, bfloat16 or float16")
        return dtype
    try:
        return DTYPES[str(dtype).strip().lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def _looks_like_a_path(name: str) -> bool:
    """Whether `name` can only be meant as a path (a Hub id is `name` or `owner/name`)."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.splitdrive(name)[0] != ""
        or name.endswith(("/", ".json", ".safetensors", ".bin", ".pth", ".pt", ".onnx"))
    )


def _holds_images(folder: Path, limit: int = 2000) -> bool:
    """Whether one of the first `limit` files below `folder` is an image (bounded: `folder` may be a dataset)."""
    seen = 0
    for _, _, names in os.walk(folder):
        for name in names:
            if is_image_file(Path(name)):
                return True
            seen += 1
            if seen >= limit:
                return False
    return False


def check_model_folder(folder: Path, name: str) -> None:
    """Refuse a local path that is not a VisualAD model folder, saying what it is instead."""
    if folder.is_file():
        raise ModelLoadError(f"{name} is a file, not a model folder; pass the folder that holds it ({MODEL_FOLDER_HINT})")
    config_path = folder / "config.json"
    if not config_path.is_file():
        children = sorted(p.parent.name for p in folder.glob("*/config.json"))
        if children:
            hint = f"; it has model folders inside: {', '.join(children[:5])} (pass one of them)"
        elif _holds_images(folder):
            hint = "; it holds images: pass them as inputs, and the model folder with --model"
        else:
            hint = ""
        raise ModelLoadError(f"{name} is not a model folder: it has no config.json ({MODEL_FOLDER_HINT}){hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{config_path} is not valid JSON ({error}); the model folder is damaged") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "visualad":
        what = f"a {model_type!r} model" if model_type else "a config.json without model_type"
        raise ModelLoadError(
            f"{name} holds {what}, not a VisualAD model; pass a VisualAD folder (a backbone gets VisualAD heads "
            "with training or VisualADModel.from_backbone)"
        )
    if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        raise ModelLoadError(
            f"{name} has a config.json but no weights (model.safetensors); the folder is incomplete: save or copy "
            "the model again"
        )


def check_model_source(model: str | os.PathLike) -> str:
    """`model` as `from_pretrained` should get it: a checked local folder, or a syntactically valid Hub id."""
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.exists():
        check_model_folder(path, name)
        return str(path)
    if _looks_like_a_path(name):
        raise ModelLoadError(
            f"no such model folder: {name} (looked in {Path.cwd()}); check the path, or pass a Hub id like owner/name"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelLoadError(
            f"{name!r} is neither a local folder nor a Hub id (a Hub id is owner/name, with letters, digits, "
            "'-', '_' and '.'); check the spelling"
        ) from None
    return name


def _hub_error(name: str, error: Exception) -> ModelLoadError:
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        return ModelLoadError(
            f"{name} is not a local folder and not in the Hugging Face cache, and offline mode (HF_HUB_OFFLINE=1) "
            f"forbids downloading it; download it where there is network (`hf download {name}`) or pass a local folder"
        )
    return ModelLoadError(
        f"could not load {name} from the Hub ({type(error).__name__}: {str(error).splitlines()[0][:200]}); check the "
        "id, your network and, for a private model, `hf auth login`"
    )


def load_model_for_inference(
    model: str | os.PathLike, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "float32"
) -> InferenceModel:
    """A VisualAD model (folder or Hub id) in eval mode on `device`, with its image processor.

    The processor is the folder's `preprocessor_config.json`, or, when the folder has none, the one matching the
    model config (`VisualADImageProcessor.from_model_config`). Every mistake raises `ModelLoadError` or `DeviceError`
    (both `VisualADError`) with a one-line message.
    """
    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    from ..configuration_visualad import VisualADConfig
    from ..image_processing_visualad import VisualADImageProcessor
    from ..modeling_visualad import VisualADModel

    device_name = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    source = check_model_source(model)
    local = Path(source).exists()
    with quiet_transformers_logging(), no_progress_bars():
        try:
            config = VisualADConfig.from_pretrained(source)
            if config.model_type != "visualad":
                raise ModelLoadError(f"{source} holds a {config.model_type!r} model, not a VisualAD model")
            loaded = VisualADModel.from_pretrained(source, config=config, dtype=torch_dtype)
        except VisualADError:
            raise
        except (OSError, ValueError, KeyError) as error:
            if not local:
                raise _hub_error(source, error) from error
            raise ModelLoadError(
                f"could not load the model in {source} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "the folder is damaged or was written by an incompatible version: save or convert it again"
            ) from error
        except Exception as error:  # safetensors header errors, size mismatches: a damaged or mismatched folder
            raise ModelLoadError(
                f"could not load the weights in {source} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "the weights are damaged or do not match config.json"
            ) from error
        try:
            processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError):
            processor = None
    if not isinstance(processor, VisualADImageProcessor):
        hf_logging.get_logger(__name__).warning(
            f"{source} has no VisualAD preprocessor_config.json; using the processor that matches its config.json."
        )
        processor = VisualADImageProcessor.from_model_config(loaded.config)
    return InferenceModel(loaded.to(device_name).eval(), processor, device_name)


def build_detector(model: str | os.PathLike, device: str | torch.device | None = "auto", dtype="float32"):
    """The `"anomaly-detection"` pipeline for a model folder or Hub id: what `visualad detect`/`calibrate` run.

    One function on purpose: other model formats (e.g. exported ONNX folders) hook in here.
    """
    from transformers import pipeline

    from ..export import is_exported_folder, load_exported_for_inference
    from ..pipeline_anomaly_detection import AnomalyDetectionPipeline  # noqa: F401  (the task is registered)

    if is_exported_folder(Path(os.fspath(model)).expanduser()):  # an ONNX / OpenVINO folder of `visualad export`
        loaded = load_exported_for_inference(model, resolve_device(device))
    else:
        loaded = load_model_for_inference(model, device, dtype)
    return pipeline(
        "anomaly-detection", model=loaded.model, image_processor=loaded.image_processor, device=loaded.device
    )


def local_model_folder(model: str | os.PathLike) -> Path | None:
    """The folder a model was loaded from: the local folder itself, or the Hub cache's snapshot of the id (None
    when it is not cached)."""
    path = Path(os.fspath(model)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(os.fspath(model), local_files_only=True))
    except Exception:  # noqa: BLE001  (not cached, or not a valid id: nothing to copy)
        return None


__all__ = [
    "DeviceError",
    "InferenceModel",
    "ModelLoadError",
    "build_detector",
    "check_model_source",
    "load_model_for_inference",
    "local_model_folder",
    "resolve_device",
    "resolve_dtype",
]
