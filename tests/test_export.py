"""`visualad export`: ONNX / OpenVINO graphs that reproduce the torch model + post-processing, and run in the
pipeline and `visualad detect` like the torch folder. Exports are slow, so each folder is exported once per module."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAMILIES
from PIL import Image
from transformers import pipeline

import visualad_hf  # noqa: F401  (registers the task)
from visualad_hf import VisualADConfig, VisualADImageProcessor, VisualADModel
from visualad_hf.cli import main as cli_main
from visualad_hf.export import (
    MANIFEST_NAME,
    ExportedVisualADModel,
    ExportManifest,
    ExportMismatchError,
    ExportUnsupportedError,
    InputSizeError,
    MissingRuntimeError,
    UnknownFormatError,
    export_model,
    is_exported_folder,
    load_exported,
)

TOLERANCE = 1e-4
# SigLIP2 NaFlex's embeddings (transformers) resize the position table per image in a Python loop over the batch, so
# its graph can only take a fixed batch; every other family exports with a dynamic batch.
STATIC_BATCH = {"siglip2_naflex": 1}


def family_config(name: str, **overrides) -> VisualADConfig:
    """VisualAD heads on the family's tiny backbone (tests/conftest.py FAMILIES), 5x5 patches, all four layers."""
    family = FAMILIES[name]
    defaults = {"feature_layers": [1, 2, 3, 4], "image_size": 5 * family.patch_size}
    return VisualADConfig(vision_config=family.vision_config(), **{**defaults, **overrides})


def save_model(folder, kind: str, seed: int = 0):
    """A seeded tiny model of backbone family `kind`, with heads moved away from their initialisation."""
    torch.manual_seed(seed)
    config = family_config(kind, anomaly_threshold=0.1)
    model = VisualADModel(config).eval()
    with torch.no_grad():  # residual scale starts at 0.01: make the SCA path matter for the comparison
        for attention in model.spatial_cross_attention:
            attention.residual_scale.fill_(0.5)
    model.save_pretrained(folder)
    VisualADImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


def torch_reference(model_dir, pixel_values):
    """Maps and scores of the torch path: model, then the image processor's post-processing (SPEC §4)."""
    model = VisualADModel.from_pretrained(model_dir).eval()
    processor = VisualADImageProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    results = processor.post_process_anomaly_detection(
        outputs, gaussian_sigma=model.config.gaussian_sigma, topk_ratio=model.config.topk_ratio
    )
    return torch.stack([r["anomaly_map"] for r in results]), torch.tensor([r["score"] for r in results])


def random_pixels(batch: int, size: int = 70, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Model folders per family, and their exports (ONNX, dynamic batch); the CLIP one through `visualad export`."""
    root = tmp_path_factory.mktemp("export")
    result = {}
    for kind in FAMILIES:  # every backbone family the package supports
        model_dir = save_model(root / f"{kind}-model", kind)
        onnx_dir = root / f"{kind}-onnx"
        if kind == "clip":
            assert cli_main(["export", "--model", str(model_dir), "--output", str(onnx_dir)]) == 0
        else:
            export_model(model_dir, onnx_dir, static_batch=STATIC_BATCH.get(kind))
        result[kind] = (model_dir, onnx_dir)
    return result


@pytest.fixture(scope="module")
def int8_dir(folders, tmp_path_factory):
    target = tmp_path_factory.mktemp("int8") / "clip-int8"
    export_model(folders["clip"][0], target, quantize="int8")
    return target


@pytest.fixture(scope="module")
def static_dir(folders, tmp_path_factory):
    """ONNX with a static batch of 2 and opset 20: the non-default settings in one export."""
    target = tmp_path_factory.mktemp("static") / "clip-static"
    export_model(folders["clip"][0], target, static_batch=2, opset=20)
    return target


@pytest.fixture(scope="module")
def openvino_dir(folders, tmp_path_factory):
    """OpenVINO IR derived from the float32 ONNX folder (no second trace), through the command."""
    target = tmp_path_factory.mktemp("openvino") / "clip-openvino"
    assert (
        cli_main(["export", "--model", str(folders["clip"][1]), "--output", str(target), "--format", "openvino"]) == 0
    )
    return target


# ---------------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("kind", list(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_matches_torch(folders, kind, batch):
    model_dir, onnx_dir = folders[kind]
    size = 5 * FAMILIES[kind].patch_size
    pixel_values = random_pixels(batch, size=size)
    maps, scores = torch_reference(model_dir, pixel_values)
    runner = load_exported(onnx_dir)
    assert runner.manifest.batch == STATIC_BATCH.get(kind, "dynamic")
    outputs = runner(pixel_values=pixel_values)
    assert outputs.anomaly_map.shape == (batch, size, size) and outputs.score.shape == (batch,)
    assert (outputs.anomaly_map - maps).abs().max() <= TOLERANCE
    assert (outputs.score - scores).abs().max() <= TOLERANCE
    assert maps.std() > 1e-3  # the maps are not constant: the comparison means something


def test_folder_contents_and_manifest(folders):
    model_dir, onnx_dir = folders["clip"]
    assert is_exported_folder(onnx_dir) and not is_exported_folder(model_dir)
    names = {path.name for path in onnx_dir.iterdir()}
    assert names == {"model.onnx", "config.json", "preprocessor_config.json", "README.md", MANIFEST_NAME}
    manifest = ExportManifest.load(onnx_dir)
    assert (manifest.format, manifest.opset, manifest.batch, manifest.quantize) == ("onnx", 18, "dynamic", None)
    assert manifest.input_size == (70, 70) and set(manifest.files) == {"model.onnx"}
    assert manifest.model["backbone"] == "clip_vision_model" and manifest.model["gaussian_sigma"] == 4.0
    assert manifest.parity["max_abs_diff_anomaly_map"] <= TOLERANCE
    readme = (onnx_dir / "README.md").read_text()
    assert "[B, 3, 70, 70]" in readme and "onnxruntime" in readme and "0.48145466" in readme
    assert json.loads((onnx_dir / "config.json").read_text())["anomaly_threshold"] == 0.1


def test_openvino_matches_torch(folders, openvino_dir):
    manifest = ExportManifest.load(openvino_dir)
    assert (manifest.format, manifest.batch, manifest.opset) == ("openvino", "dynamic", 18)
    assert set(manifest.files) == {"model.xml", "model.bin"}
    assert (
        manifest.parity["reference"] == "the source ONNX graph" and manifest.parity["max_abs_diff_score"] <= TOLERANCE
    )
    runner = load_exported(openvino_dir)
    assert runner.providers == ["OpenVINO:CPU"]
    for batch in (1, 3):
        pixel_values = random_pixels(batch, seed=batch)
        maps, scores = torch_reference(folders["clip"][0], pixel_values)
        outputs = runner(pixel_values=pixel_values)
        assert outputs.anomaly_map.shape == (batch, 70, 70)
        assert (outputs.anomaly_map - maps).abs().max() <= TOLERANCE
        assert (outputs.score - scores).abs().max() <= TOLERANCE


def test_static_batch_graph_takes_any_batch(folders, static_dir):
    import onnx

    manifest = ExportManifest.load(static_dir)
    assert (manifest.format, manifest.batch, manifest.opset) == ("onnx", 2, 20)
    proto = onnx.load(str(static_dir / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert {entry.version for entry in proto.opset_import if entry.domain == ""} == {20}
    runner = load_exported(static_dir)
    for batch in (1, 2, 3):  # 1 and 3 are padded / cut into graph-sized chunks
        pixel_values = random_pixels(batch, seed=batch)
        maps, scores = torch_reference(folders["clip"][0], pixel_values)
        outputs = runner(pixel_values=pixel_values)
        assert outputs.anomaly_map.shape == (batch, 70, 70)
        assert (outputs.anomaly_map - maps).abs().max() <= TOLERANCE
        assert (outputs.score - scores).abs().max() <= TOLERANCE


def test_int8_runs_and_stays_close(folders, int8_dir):
    model_dir, onnx_dir = folders["clip"]
    manifest = ExportManifest.load(int8_dir)
    assert manifest.quantize == "int8"
    # int8 weight matrices; the tiny model's other tensors (SCA position tables, embeddings) stay float32
    assert (int8_dir / "model.onnx").stat().st_size < 0.9 * (onnx_dir / "model.onnx").stat().st_size
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8_dir / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    pixel_values = random_pixels(4)
    maps, scores = torch_reference(model_dir, pixel_values)
    outputs = load_exported(int8_dir)(pixel_values=pixel_values)
    spread = float(maps.max() - maps.min())
    assert (outputs.anomaly_map - maps).abs().max() <= 0.1 * spread
    assert (outputs.score - scores).abs().max() <= 0.1 * spread
    assert not torch.allclose(outputs.anomaly_map, maps, atol=1e-6)  # it is quantised, not the fp32 graph
    # scores keep their order closely: correlation over the batch
    assert np.corrcoef(outputs.score.numpy(), scores.numpy())[0, 1] > 0.9


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline and `visualad detect` on an exported folder


def write_images(root):
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [(50, 40), (70, 70), (33, 61)]
    for index, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"part{index}.png")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), mode="L").save(root / "gray.png")
    return root


def test_pipeline_on_exported_folder_matches_torch(folders, tmp_path):
    model_dir, onnx_dir = folders["clip"]
    images = [Image.open(path) for path in sorted(write_images(tmp_path / "images").iterdir())]
    torch_pipe = pipeline("anomaly-detection", model=str(model_dir), device="cpu")
    onnx_pipe = pipeline("anomaly-detection", model=str(onnx_dir), device="cpu")
    assert isinstance(onnx_pipe.model, ExportedVisualADModel)
    expected = torch_pipe(images, batch_size=3, return_overlay=True)
    found = onnx_pipe(images, batch_size=3, return_overlay=True)
    for want, got, image in zip(expected, found, images, strict=True):
        assert set(got) == set(want) == {"score", "anomaly_map", "threshold", "is_anomalous", "overlay"}
        assert abs(got["score"] - want["score"]) <= TOLERANCE
        assert got["anomaly_map"].shape == (image.height, image.width)
        assert np.abs(got["anomaly_map"] - want["anomaly_map"]).max() <= TOLERANCE
        assert got["threshold"] == want["threshold"] == 0.1 and got["is_anomalous"] == want["is_anomalous"]
        difference = np.abs(np.asarray(got["overlay"], dtype=int) - np.asarray(want["overlay"], dtype=int))
        assert got["overlay"].size == want["overlay"].size and difference.max() <= 1
    single = onnx_pipe(images[0], threshold=1e9)
    assert single["is_anomalous"] is False and single["threshold"] == 1e9


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_detect_on_exported_folder_writes_the_same_results(folders, tmp_path):
    model_dir, onnx_dir = folders["clip"]
    images = write_images(tmp_path / "images")
    for name, folder in (("torch", model_dir), ("onnx", onnx_dir)):
        status = cli_main(
            [
                "detect",
                "--model",
                str(folder),
                str(images),
                "--output",
                str(tmp_path / name),
                "--device",
                "cpu",
                "--quiet",
                "--batch-size",
                "2",
            ]
        )
        assert status == 0
    expected, found = read_rows(tmp_path / "torch" / "results.csv"), read_rows(tmp_path / "onnx" / "results.csv")
    assert len(found) == len(expected) == 4
    for want, got in zip(expected, found, strict=True):
        assert {k: v for k, v in got.items() if k != "score"} == {k: v for k, v in want.items() if k != "score"}
        assert abs(float(got["score"]) - float(want["score"])) <= TOLERANCE
        panel_want = np.asarray(Image.open(tmp_path / "torch" / want["overlay"]), dtype=int)
        panel_got = np.asarray(Image.open(tmp_path / "onnx" / got["overlay"]), dtype=int)
        assert panel_got.shape == panel_want.shape
        assert np.mean(panel_got != panel_want) < 0.01  # the printed score's last digit may differ
    summary = json.loads((tmp_path / "onnx" / "results.json").read_text())["summary"]
    assert summary["num_ok"] == 4 and summary["threshold"] == 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Errors: one line each, naming the file and the fix


def test_wrong_input_size_is_refused(folders):
    runner = load_exported(folders["clip"][1])
    with pytest.raises(InputSizeError, match=r"takes pixel_values of shape \[batch, 3, 70, 70\], got \[1, 3, 56, 56\]"):
        runner(pixel_values=random_pixels(1, size=56))
    with pytest.raises(InputSizeError, match="image processor"):
        runner(pixel_values=torch.zeros(3, 70, 70))


def copy_folder(source, target):
    shutil.copytree(source, target)
    return target


def test_config_that_does_not_match_the_graph_is_refused(folders, tmp_path):
    folder = copy_folder(folders["clip"][1], tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    config["gaussian_sigma"] = 2.0
    (folder / "config.json").write_text(json.dumps(config))
    message = r"config.json has gaussian_sigma=2.0 but the graph .*model.onnx was exported with gaussian_sigma=4.0"
    with pytest.raises(ExportMismatchError, match=message):
        load_exported(folder)
    with pytest.raises(ExportMismatchError, match=message):  # the pipeline does not swallow it
        pipeline("anomaly-detection", model=str(folder), device="cpu")
    # the threshold is applied after the graph: changing it is fine
    config["gaussian_sigma"], config["anomaly_threshold"] = 4.0, 0.3
    (folder / "config.json").write_text(json.dumps(config))
    assert load_exported(folder).config.anomaly_threshold == 0.3


def test_graph_replaced_or_damaged_is_refused(folders, tmp_path):
    folder = copy_folder(folders["clip"][1], tmp_path / "swapped")
    shutil.copy(folders["dinov2"][1] / "model.onnx", folder / "model.onnx")
    with pytest.raises(
        ExportMismatchError, match=r"model.onnx does not match .*export_manifest.json \(its SHA-256 differs\)"
    ):
        load_exported(folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(ExportMismatchError, match=r"model.onnx is missing"):
        load_exported(folder)
    preprocessor = copy_folder(folders["clip"][1], tmp_path / "resized")
    data = json.loads((preprocessor / "preprocessor_config.json").read_text())
    data["size"] = {"height": 56, "width": 56}
    (preprocessor / "preprocessor_config.json").write_text(json.dumps(data))
    with pytest.raises(ExportMismatchError, match=r"resizes to 56x56 but the graph .* takes 70x70"):
        load_exported(preprocessor)


def test_unknown_format_and_bad_settings(folders, tmp_path, capsys):
    model_dir = folders["clip"][0]
    with pytest.raises(UnknownFormatError, match="unknown export format 'tflite'; choose one of: onnx, openvino"):
        export_model(model_dir, tmp_path / "x", format="tflite")
    with pytest.raises(UnknownFormatError, match="unknown quantisation 'int4'"):
        export_model(model_dir, tmp_path / "x", quantize="int4")
    with pytest.raises(ExportUnsupportedError, match="--opset 11 is outside the supported range 18..23"):
        export_model(model_dir, tmp_path / "x", opset=11)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--model", str(model_dir), "--output", str(tmp_path / "x"), "--format", "tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_refuses_to_overwrite_other_folders(folders, int8_dir, tmp_path, capsys):
    model_dir, onnx_dir = folders["clip"]
    assert cli_main(["export", "--model", str(int8_dir), "--output", str(tmp_path / "a"), "--format", "openvino"]) == 2
    assert "derive from a float32 ONNX export only" in capsys.readouterr().err
    assert cli_main(["export", "--model", str(onnx_dir), "--output", str(tmp_path / "b"), "--static-batch", "4"]) == 2
    assert "keeps both: drop --opset/--static-batch" in capsys.readouterr().err
    assert cli_main(["export", "--model", str(model_dir), "--output", str(model_dir)]) == 2
    assert "is the model folder itself" in capsys.readouterr().err
    assert cli_main(["export", "--model", str(model_dir), "--output", str(folders["dinov2"][0])]) == 2
    err = capsys.readouterr().err
    assert "exists and is not an exported VisualAD folder" in err and len(err.strip().splitlines()) == 1
    assert (model_dir / "model.safetensors").is_file() and (folders["dinov2"][0] / "model.safetensors").is_file()


def test_missing_runtime_names_the_pip_command(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(MissingRuntimeError, match=r'onnxruntime is not installed .*pip install "visualad-hf\[onnx\]"'):
        load_exported(folders["clip"][1])
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingRuntimeError, match=r'pip install "visualad-hf\[openvino\]"'):
        export_model(folders["clip"][0], tmp_path / "ov", format="openvino")


def test_torch_folders_still_load_the_torch_model(folders):
    detector = pipeline("anomaly-detection", model=str(folders["clip"][0]), device="cpu")
    assert isinstance(detector.model, VisualADModel)


def test_python_dash_m_entry(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "visualad_hf.export", "--help"], check=False, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0
    assert "python -m visualad_hf.export" in completed.stdout and "--static-batch" in completed.stdout


def test_calibrate_on_an_exported_folder_keeps_it_exported(folders, tmp_path):
    images = write_images(tmp_path / "normal")
    target = tmp_path / "calibrated"
    assert cli_main(["calibrate", "--model", str(folders["clip"][1]), "--normal", str(images), "--output", str(target),
                     "--device", "cpu"]) == 0  # fmt: skip
    runner = load_exported(target)  # graph, manifest and hashes travelled; the config carries the new threshold
    assert runner.config.anomaly_threshold != 0.1 and runner.config.threshold_calibration is not None
    assert ExportManifest.load(target).files == ExportManifest.load(folders["clip"][1]).files
