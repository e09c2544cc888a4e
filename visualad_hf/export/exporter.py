"""`export_model`: a VisualAD model folder -> an ONNX or OpenVINO folder that runs without PyTorch.

The graph (`VisualADScoringGraph`: model + Gaussian smoothing + top-k score) is captured with torch's dynamo-based
exporter (`torch.onnx.export(..., dynamo=True)`), batch dynamic unless a static batch is asked for; int8 is
ONNX Runtime's dynamic quantisation of the weight matrix products; OpenVINO IR is converted from the ONNX graph by
the `openvino` package, in float32. The folder gets the graph, `config.json`, `preprocessor_config.json`,
`export_manifest.json` and a README, and is written atomically (`hub.staged_folder`). After writing, the graph is
run once on random input and compared with the torch model; the differences go into the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configuration_visualad import VisualADConfig
from ..hub import quiet_transformers_logging, staged_folder
from ..image_processing_visualad import VisualADImageProcessor
from .errors import (
    ONNX_EXTRA,
    OPENVINO_EXTRA,
    ExportError,
    ExportUnsupportedError,
    UnknownFormatError,
    require,
)
from .graph import VisualADScoringGraph
from .manifest import (
    INPUT_NAME,
    MANIFEST_NAME,
    OUTPUT_NAMES,
    ExportManifest,
    graph_settings,
    is_exported_folder,
    sha256_file,
    write_config,
    write_processor,
)
from .runtime import FORMATS, README_NAME, ExportedVisualADModel

QUANTIZATIONS = ("int8",)
DEFAULT_OPSET = 18  # torch's exporter emits opset 18 natively; other opsets go through ONNX's version converter
MIN_OPSET, MAX_OPSET = 18, 23
ONNX_FILE = "model.onnx"
OPENVINO_FILES = ("model.xml", "model.bin")
PROTOBUF_LIMIT = 2**31 - 1  # larger graphs keep their weights in an external data file


@dataclass
class ExportResult:
    """What `export_model` wrote: the folder, its manifest, and the parity check against the torch model."""

    folder: Path
    manifest: ExportManifest

    @property
    def parity(self) -> dict[str, Any] | None:
        return self.manifest.parity


def check_options(format: str, opset: int, quantize: str | None, static_batch: int | None) -> None:
    """Refuse impossible settings before anything is loaded."""
    if format not in FORMATS:
        raise UnknownFormatError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UnknownFormatError(f"unknown quantisation {quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ExportUnsupportedError(
            f"--opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET} (torch's exporter starts at "
            f"opset {MIN_OPSET}); choose an opset in that range"
        )
    if static_batch is not None and int(static_batch) < 1:
        raise ExportUnsupportedError(f"static batch size {static_batch} must be at least 1")


def export_model(
    model: str | os.PathLike | torch.nn.Module,
    output: str | os.PathLike,
    *,
    format: str = "onnx",
    opset: int = DEFAULT_OPSET,
    static_batch: int | None = None,
    quantize: str | None = None,
    processor: Any = None,
    check: bool = True,
) -> ExportResult:
    """Export a VisualAD model to `output` (a folder, replaced as a whole).

    Args:
        model: a model folder or Hub id, or a `VisualADModel`.
        output: the folder to write; an existing exported folder there is replaced, any other existing folder kept.
        format: `"onnx"` (ONNX Runtime) or `"openvino"` (OpenVINO IR, converted from the ONNX graph).
        opset: ONNX opset (18..23).
        static_batch: fix the batch size to this value (default: dynamic batch).
        quantize: `"int8"` for ONNX Runtime dynamic quantisation of the weights (int8 MatMuls).
        processor: the image processor to save (default: the model folder's, else one built from the config).
        check: run the written graph once and record its differences from the torch model in the manifest.
    """
    check_options(format, opset, quantize, static_batch)
    require("onnx", ONNX_EXTRA)
    require("onnxscript", ONNX_EXTRA)
    if quantize or check:
        require("onnxruntime", ONNX_EXTRA)
    if format == "openvino":
        require("openvino", OPENVINO_EXTRA)
    output = Path(output)
    if isinstance(model, (str, os.PathLike)) and is_exported_folder(model):
        return derive_export(model, output, format=format, quantize=quantize, opset=opset, static_batch=static_batch,
                             check=check)  # fmt: skip
    model, processor = _load_model_and_processor(model, processor, output)
    graph = VisualADScoringGraph(model).eval()
    size = int(model.config.image_size)
    example = torch.randn(static_batch or 2, 3, size, size, generator=torch.Generator().manual_seed(0))

    with staged_folder(output) as staging:
        onnx_path = staging / ONNX_FILE
        _export_onnx(graph, example, onnx_path, opset=opset, dynamic=static_batch is None)
        if quantize == "int8":
            _quantize_int8(onnx_path)
        files = _graph_files(staging)
        if format == "openvino":
            _convert_openvino(onnx_path, staging)
            files = list(OPENVINO_FILES)
        write_config(model.config, staging)
        write_processor(processor, staging)
        manifest = ExportManifest(
            format=format,
            graph=files[0],
            files={name: sha256_file(staging / name) for name in files},
            opset=int(opset),
            input_size=(size, size),
            batch="dynamic" if static_batch is None else int(static_batch),
            quantize=quantize,
            model=graph_settings(model.config),
            versions=_versions(format),
        )
        manifest.save(staging)
        if check:
            manifest.parity = _parity(
                graph, ExportedVisualADModel.from_pretrained(staging, check_hashes=False), example
            )
            manifest.save(staging)
        (staging / README_NAME).write_text(folder_readme(manifest, model.config, processor), encoding="utf-8")
    return ExportResult(output, manifest)


def _load_model_and_processor(model, processor, output: Path):
    from ..image_processing_visualad import VisualADImageProcessor
    from ..modeling_visualad import VisualADModel

    source = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if source is not None and source.exists() and output.exists() and source.resolve() == output.resolve():
        raise ExportUnsupportedError(
            f"--output {output} is the model folder itself; choose another folder (export replaces --output)"
        )
    _check_output(output)
    if source is not None:
        if processor is None and (source / "preprocessor_config.json").is_file():
            processor = VisualADImageProcessor.from_pretrained(source)
        with quiet_transformers_logging():
            model = VisualADModel.from_pretrained(str(source), dtype=torch.float32)
    model = model.float().eval()
    if processor is None:
        processor = VisualADImageProcessor.from_model_config(model.config)
    return model, processor


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not is_exported_folder(output):
        raise ExportUnsupportedError(
            f"--output {output} exists and is not an exported VisualAD folder; choose a new or empty folder "
            "(export replaces the whole folder)"
        )


def derive_export(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    format: str = "onnx",
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    static_batch: int | None = None,
    check: bool = True,
) -> ExportResult:
    """An int8 and/or OpenVINO folder from an exported float32 ONNX folder, without PyTorch tracing the model again.

    The graph keeps the source's opset and batch mode; `check` compares the new graph with the source graph.
    """
    source, output = Path(source), Path(output)
    base = ExportManifest.load(source)
    if base.format != "onnx" or base.quantize is not None:
        raise ExportUnsupportedError(
            f"{source} is a {base.describe()} export; int8 and OpenVINO folders derive from a float32 ONNX export "
            "only: export from the model folder instead (`visualad export --model MODEL_FOLDER ...`)"
        )
    if int(opset) != base.opset or static_batch != base.static_batch:
        batch = "dynamic batch" if base.static_batch is None else f"batch {base.static_batch}"
        raise ExportUnsupportedError(
            f"{source} holds an opset {base.opset}, {batch} graph; a folder derived from it keeps both: drop "
            "--opset/--static-batch, or export from the model folder"
        )
    if source.resolve() == output.resolve():
        raise ExportUnsupportedError(f"--output {output} is the source folder itself; choose another folder")
    _check_output(output)
    reference = ExportedVisualADModel.from_pretrained(source) if check else None
    with staged_folder(output) as staging:
        for name in (*base.files, "config.json", "preprocessor_config.json"):
            shutil.copy2(source / name, staging / name)
        onnx_path = staging / ONNX_FILE
        if quantize == "int8":
            _quantize_int8(onnx_path)
        files = _graph_files(staging)
        if format == "openvino":
            _convert_openvino(onnx_path, staging)
            files = list(OPENVINO_FILES)
        manifest = dataclasses.replace(
            base,
            format=format,
            graph=files[0],
            files={name: sha256_file(staging / name) for name in files},
            quantize=quantize,
            versions={**_versions(format), "derived_from": f"{source.name} ({base.describe()})"},
            parity=None,
        )
        manifest.save(staging)
        if reference is not None:
            size = manifest.input_size
            example = torch.randn(base.static_batch or 2, 3, *size, generator=torch.Generator().manual_seed(0))
            expected = reference(pixel_values=example)
            manifest.parity = _differences(ExportedVisualADModel.from_pretrained(staging, check_hashes=False),
                                           example, expected.anomaly_map, expected.score, "the source ONNX graph")  # fmt: skip
            manifest.save(staging)
        config = VisualADConfig.from_pretrained(staging)
        processor = VisualADImageProcessor.from_pretrained(staging)
        (staging / README_NAME).write_text(folder_readme(manifest, config, processor), encoding="utf-8")
    return ExportResult(output, manifest)


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter prints progress and warns about missing torchvision ops; keep the command's output short."""
    loggers = [std_logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(std_logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as devnull:
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                devnull.close()
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_onnx(graph: torch.nn.Module, example: torch.Tensor, path: Path, *, opset: int, dynamic: bool) -> None:
    dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim("batch")}} if dynamic else None
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic_shapes,
                opset_version=int(opset),
                optimize=True,
                verbose=False,
            )
    except Exception as error:  # the exporter's own errors are long reports; keep the first line
        raise ExportError(
            f"torch.onnx.export failed for opset {opset} ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
            "try the default opset, or run with VISUALAD_DEBUG=1 for the exporter's report"
        ) from error
    onnx = require("onnx", ONNX_EXTRA)
    proto = program.model_proto
    _check_batch_kept(proto, dynamic)
    proto.graph.doc_string = "VisualAD: pixel_values [B,3,H,W] -> anomaly_map [B,H,W] (smoothed), score [B]"
    external = proto.ByteSize() > PROTOBUF_LIMIT - 2**24
    onnx.save_model(
        proto, str(path), save_as_external_data=external, location=path.name + ".data" if external else None
    )


def _check_batch_kept(proto, dynamic: bool) -> None:
    """torch's exporter silently fixes a dimension it could not keep dynamic; refuse such a graph."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if dynamic and dims[0].HasField("dim_value"):
        raise ExportError(
            f"the exported graph fixed the batch dimension to {dims[0].dim_value}: this backbone's code depends on the "
            "batch size (SigLIP2 NaFlex resizes its position table per image); export with --static-batch N"
        )


def _graph_files(folder: Path) -> list[str]:
    names = [ONNX_FILE]
    if (folder / (ONNX_FILE + ".data")).is_file():
        names.append(ONNX_FILE + ".data")
    return names


def _quantize_int8(path: Path) -> None:
    """ONNX Runtime dynamic quantisation: int8 weights for MatMul/Gemm with constant weights, activations quantised
    per batch at run time. Attention's activation-activation products stay float32."""
    quantization = require("onnxruntime.quantization", ONNX_EXTRA)
    fp32 = path.with_name("model-fp32.onnx")
    path.rename(fp32)
    root = std_logging.getLogger()
    level = root.level
    root.setLevel(std_logging.ERROR)  # its advice to pre-process is for static quantisation with calibration data
    try:
        quantization.quantize_dynamic(
            str(fp32),
            str(path),
            weight_type=quantization.QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)
        fp32.unlink(missing_ok=True)
        fp32.with_name(fp32.name + ".data").unlink(missing_ok=True)


def _convert_openvino(onnx_path: Path, folder: Path) -> None:
    ov = require("openvino", OPENVINO_EXTRA)
    converted = ov.convert_model(str(onnx_path))
    ov.save_model(converted, str(folder / OPENVINO_FILES[0]), compress_to_fp16=False)
    onnx_path.unlink()
    onnx_path.with_name(onnx_path.name + ".data").unlink(missing_ok=True)


def _versions(format: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in (
        "visualad-hf",
        "onnx",
        "onnxscript",
        "onnxruntime",
        *(("openvino",) if format == "openvino" else ()),
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def _parity(graph: VisualADScoringGraph, runner: ExportedVisualADModel, example: torch.Tensor) -> dict[str, Any]:
    """Largest absolute differences of the exported graph from the torch model on the export's example batch."""
    with torch.no_grad():
        maps, scores = graph(example)
    return _differences(runner, example, maps, scores, "the PyTorch model")


def _differences(runner, example, maps, scores, reference: str) -> dict[str, Any]:
    outputs = runner(pixel_values=example)
    return {
        "reference": reference,
        "batch": int(example.shape[0]),
        "input": "standard normal pixel_values, seed 0",
        "max_abs_diff_anomaly_map": float((outputs.anomaly_map - maps).abs().max()),
        "max_abs_diff_score": float((outputs.score - scores).abs().max()),
        "max_abs_anomaly_map": float(maps.abs().max()),
    }


def folder_readme(manifest: ExportManifest, config, processor) -> str:
    """The exported folder's README: what the graph computes and how to run it, with this folder's values."""
    height, width = manifest.input_size
    batch = "any batch size" if manifest.static_batch is None else f"batch size {manifest.static_batch} exactly"
    mean = [round(float(value), 8) for value in processor.image_mean]
    std = [round(float(value), 8) for value in processor.image_std]
    if manifest.format == "onnx":
        session = (
            "import onnxruntime as ort\n"
            f'session = ort.InferenceSession("{manifest.graph}", providers=["CPUExecutionProvider"])\n'
            'anomaly_map, score = session.run(None, {"pixel_values": pixel_values})'
        )
        runtime = 'onnxruntime (`pip install "visualad-hf[onnx]"` or `pip install onnxruntime`)'
    else:
        session = (
            "import openvino as ov\n"
            f'compiled = ov.Core().compile_model("{manifest.graph}", "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}})\n'
            "anomaly_map, score = compiled(pixel_values).values()"
        )
        runtime = 'openvino (`pip install "visualad-hf[openvino]"` or `pip install openvino`)'
    parity = ""
    if manifest.parity:
        parity = (
            f"\nChecked at export against {manifest.parity['reference']} ({manifest.parity['batch']} random inputs): largest "
            f"difference {manifest.parity['max_abs_diff_anomaly_map']:.2e} on the maps and "
            f"{manifest.parity['max_abs_diff_score']:.2e} on the scores.\n"
        )
    return f"""# VisualAD anomaly detector, exported ({manifest.describe()})

Written by `visualad export`. The graph `{manifest.graph}` takes `pixel_values` `[B, 3, {height}, {width}]`
float32 ({batch}) and returns `anomaly_map` `[B, {height}, {width}]` (the anomaly map, Gaussian-smoothed with
sigma {config.gaussian_sigma:g} at model resolution) and `score` `[B]` (the mean of its top {config.topk_ratio:g}
fraction of pixels: the image anomaly score). Decision threshold: {config.anomaly_threshold!r} (`config.json`,
`anomaly_threshold`; `score >= threshold` is anomalous).
{parity}
## With visualad-hf (same outputs as the PyTorch model: score, map at image size, threshold, decision, overlay)

```python
import visualad_hf
from transformers import pipeline

detector = pipeline("anomaly-detection", model="path/to/this/folder")   # runs {runtime.split(" ")[0]}
result = detector("part.png")
```

```bash
visualad detect --model path/to/this/folder images/ --output results/
```

## Without PyTorch: {runtime}

Preprocess as `preprocessor_config.json` says: resize to {width}x{height} with PIL bicubic (in the image's own mode),
convert to RGB, divide by 255, subtract mean {mean}, divide by std {std}, channels first.

```python
import numpy as np
from PIL import Image

image = Image.open("part.png")
array = np.asarray(image.resize(({width}, {height}), Image.BICUBIC).convert("RGB"), dtype=np.float32) / 255.0
pixel_values = ((array - np.array({mean}, dtype=np.float32)) / np.array({std}, dtype=np.float32))
pixel_values = pixel_values.transpose(2, 0, 1)[None].astype(np.float32)
{session}
```

Resize `anomaly_map` bilinearly to the image's size to display it. `{MANIFEST_NAME}` records the format, opset,
input size, batch mode and the SHA-256 of the graph: visualad-hf refuses a folder whose graph or config was changed
after export.
"""


__all__ = [
    "DEFAULT_OPSET",
    "QUANTIZATIONS",
    "ExportResult",
    "check_options",
    "derive_export",
    "export_model",
    "folder_readme",
]
