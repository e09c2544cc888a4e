"""pipeline("anomaly-detection"): inputs, batching, outputs, thresholds, overlays."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest
import torch
from conftest import save_tiny_model, tiny_visualad_config
from PIL import Image
from transformers import pipeline

from visualad_hf import AnomalyDetectionPipeline, VisualADImageProcessor, VisualADModel
from visualad_hf.image_processing_visualad import ImageLoadError


@pytest.fixture(scope="module")
def detector(model_dir):
    return pipeline("anomaly-detection", model=str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(120, 90), (64, 64), (50, 80), (33, 47), (70, 70)]
    paths = []
    for index, (width, height) in enumerate(sizes):
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_pipeline_outputs(detector, image_files):
    assert isinstance(detector, AnomalyDetectionPipeline)
    result = detector(image_files[0])
    assert set(result) == {"score", "anomaly_map", "threshold"}  # no threshold known: no decision
    assert isinstance(result["score"], float) and result["threshold"] is None
    assert result["anomaly_map"].dtype == np.float32 and result["anomaly_map"].shape == (90, 120)


def test_pipeline_matches_model_and_processor(detector, image_files):
    """The pipeline is exactly processor -> model -> post-processing at the original size."""
    image = Image.open(image_files[2])
    inputs = detector.image_processor(image)
    with torch.no_grad():
        outputs = detector.model(**inputs)
    expected = detector.image_processor.post_process_anomaly_detection(outputs, target_sizes=[(80, 50)])[0]
    result = detector(image)
    assert result["score"] == pytest.approx(expected["score"], abs=1e-6)
    np.testing.assert_allclose(result["anomaly_map"], expected["anomaly_map"].numpy(), atol=1e-6)


def test_batch_sizes_agree(detector, image_files):
    one = detector(image_files, batch_size=1)
    four = detector(image_files, batch_size=4)
    assert len(one) == len(four) == len(image_files)
    for a, b in zip(one, four, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["anomaly_map"].shape == b["anomaly_map"].shape
        np.testing.assert_allclose(a["anomaly_map"], b["anomaly_map"], atol=1e-5)
    generated = list(detector((path for path in image_files), batch_size=2))
    assert [r["score"] for r in generated] == pytest.approx([r["score"] for r in one], abs=1e-5)


def test_input_kinds(detector, image_files):
    reference = detector(image_files[1])["score"]
    image = Image.open(image_files[1])
    array = np.array(image)
    for variant in (image, array, torch.from_numpy(array).permute(2, 0, 1)):
        assert detector(variant)["score"] == pytest.approx(reference, abs=1e-6)
    grayscale = detector(image.convert("L"))
    assert grayscale["anomaly_map"].shape == (64, 64)


def test_url_input(detector, image_files):
    folder = str(image_files[0]).rsplit("/", 1)[0]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/3.png"
        result = detector(url, timeout=10)
        assert result["score"] == pytest.approx(detector(image_files[3])["score"], abs=1e-6)
        assert result["anomaly_map"].shape == (47, 33)
        with pytest.raises(ImageLoadError, match="download failed"):
            detector(url.replace("3.png", "missing.png"), timeout=10)
    finally:
        server.shutdown()
        server.server_close()


def test_thresholds_and_overlay(detector, image_files):
    scores = [result["score"] for result in detector(image_files, batch_size=2)]
    cut = float(np.median(scores))
    results = detector(image_files, threshold=cut, batch_size=2)
    assert [r["is_anomalous"] for r in results] == [s >= cut for s in scores]
    assert all(r["threshold"] == cut for r in results)
    detector.model.config.anomaly_threshold = -1e9
    try:
        assert detector(image_files[0])["is_anomalous"] is True
        assert detector(image_files[0], threshold=1e9)["is_anomalous"] is False  # a call overrides the config
    finally:
        detector.model.config.anomaly_threshold = None
    with_overlay = detector(image_files[0], return_overlay=True)
    assert isinstance(with_overlay["overlay"], Image.Image) and with_overlay["overlay"].size == (120, 90)
    light = detector(image_files[:2], return_anomaly_map=False, batch_size=2)
    assert all("anomaly_map" not in r for r in light)
    assert [r["score"] for r in light] == pytest.approx(scores[:2], abs=1e-6)
    with pytest.raises(TypeError, match="Unknown argument"):
        detector(image_files[0], treshold=0.5)


def test_model_config_rules_smoothing(tmp_path, image_files, caplog):
    """The model config's gaussian_sigma/topk_ratio win over a processor that disagrees, with a warning."""
    folder = save_tiny_model(tmp_path, gaussian_sigma=1.0, topk_ratio=0.05)
    VisualADImageProcessor(size=70).save_pretrained(folder)  # sigma 4, top-k 0.01: out of step with the model
    with caplog.at_level("WARNING"):
        detector = pipeline("anomaly-detection", model=str(folder), device="cpu")
    assert "gaussian_sigma" in caplog.text
    image = Image.open(image_files[4])
    with torch.no_grad():
        outputs = detector.model(**detector.image_processor(image))
    expected = detector.image_processor.post_process_anomaly_detection(outputs, gaussian_sigma=1.0, topk_ratio=0.05)
    assert detector(image)["score"] == pytest.approx(expected[0]["score"], abs=1e-6)


def test_pipeline_from_objects(image_files):
    config = tiny_visualad_config("clip")
    torch.manual_seed(0)
    model = VisualADModel(config).eval()
    detector = pipeline(
        "anomaly-detection", model=model, image_processor=VisualADImageProcessor.from_model_config(config)
    )
    assert detector(image_files[0])["anomaly_map"].shape == (90, 120)
