"""Inference on files and folders: loading a model with clear errors, scoring batches where one bad file never stops
the run, crash-safe resumable output folders (`visualad detect`), and threshold calibration of a model folder
(`visualad calibrate`). The commands' argument parsing lives in `visualad_hf.commands`."""

from .calibration import (
    CalibrationInputError,
    CalibrationRun,
    calibrate_from_inputs,
    check_calibration_output,
    save_calibrated_model,
    score_inputs,
)
from .detection import DetectionRecord, DetectionSummary, default_colour_scale, detect_to_folder, write_results
from .inputs import InputFile, MissingInput, ScoredFile, find_images, read_image, score_files
from .loading import (
    DeviceError,
    InferenceModel,
    ModelLoadError,
    build_detector,
    load_model_for_inference,
    resolve_device,
)
from .output_folder import FolderLock, Journal, OutputFolderError

__all__ = [
    "CalibrationInputError",
    "CalibrationRun",
    "DetectionRecord",
    "DetectionSummary",
    "DeviceError",
    "FolderLock",
    "InferenceModel",
    "InputFile",
    "Journal",
    "MissingInput",
    "ModelLoadError",
    "OutputFolderError",
    "ScoredFile",
    "build_detector",
    "calibrate_from_inputs",
    "check_calibration_output",
    "default_colour_scale",
    "detect_to_folder",
    "find_images",
    "load_model_for_inference",
    "read_image",
    "resolve_device",
    "save_calibrated_model",
    "score_files",
    "score_inputs",
    "write_results",
]
