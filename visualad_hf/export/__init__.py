"""Deployment: export a VisualAD model to ONNX / OpenVINO, and run exported folders without PyTorch.

```python
from visualad_hf.export import export_model, load_exported

export_model("path/to/model", "model-onnx")                        # also: format="openvino", quantize="int8", ...
runner = load_exported("model-onnx")                               # ONNX Runtime on the CPU (providers=... to change)
outputs = runner(pixel_values=pixel_values)                        # .anomaly_map [B,H,W] (smoothed), .score [B]
```

`pipeline("anomaly-detection", model="model-onnx")` and `visualad detect --model model-onnx` recognise an exported
folder by its `export_manifest.json` and run it with `ExportedVisualADModel`. Importing this package needs neither
onnx nor onnxruntime; they are imported when an export or a session needs them.
"""

from .errors import (
    ExportError,
    ExportMismatchError,
    ExportUnsupportedError,
    InputSizeError,
    MissingRuntimeError,
    NotAnExportedFolderError,
    UnknownFormatError,
)
from .exporter import DEFAULT_OPSET, QUANTIZATIONS, ExportResult, export_model
from .manifest import MANIFEST_NAME, ExportManifest, is_exported_folder
from .runtime import FORMATS, ExportedVisualADModel, ExportedVisualADOutput, load_exported, load_exported_for_inference

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "MANIFEST_NAME",
    "QUANTIZATIONS",
    "ExportError",
    "ExportManifest",
    "ExportMismatchError",
    "ExportResult",
    "ExportUnsupportedError",
    "ExportedVisualADModel",
    "ExportedVisualADOutput",
    "InputSizeError",
    "MissingRuntimeError",
    "NotAnExportedFolderError",
    "UnknownFormatError",
    "export_model",
    "is_exported_folder",
    "load_exported",
    "load_exported_for_inference",
]
