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


def test_half_precision_tensors_are_read_as_float32(detector, image_files):
    """bf16/fp16 tensors (the README promises tensors) give the score of the same values in float32."""
    array = np.asarray(Image.open(image_files[1]), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    for dtype in (torch.bfloat16, torch.float16):
        reduced = tensor.to(dtype)
        assert detector(reduced)["score"] == pytest.approx(detector(reduced.to(torch.float32))["score"], abs=1e-6)
    processor = detector.image_processor
    assert processor(tensor.to(torch.bfloat16))["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize(
    "empty", [np.zeros((0, 12, 3), dtype=np.uint8), torch.zeros(3, 9, 0), np.zeros((5, 0), dtype=np.float32)]
)
def test_zero_size_inputs_are_refused_clearly(detector, empty):
    with pytest.raises(ImageLoadError, match="zero-size image"):
        detector(empty)
    with pytest.raises(ImageLoadError, match="zero-size image"):
        detector.image_processor(empty)


def test_non_finite_float_images_name_the_file(detector, tmp_path):
    path = tmp_path / "nan.tiff"
    Image.fromarray(np.full((16, 16), np.nan, dtype=np.float32), mode="F").save(path)
    with pytest.raises(ImageLoadError, match=r"nan\.tiff: 256 of 256 pixel values are NaN"):
        detector(str(path))
    partly = np.ones((4, 4), dtype=np.float32)
    partly[0, 0] = np.inf
    with pytest.raises(ImageLoadError, match="1 of 16 pixel values are NaN or infinite"):
        detector(partly)


class _SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and then does what `behaviour` says (or nothing)."""

    def __init__(self, behaviour=None):
        import socket

        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.connections = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/image.png"

    def _serve(self):
        while not self.stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except OSError:  # the accept timeout (TimeoutError) or a closed socket
                continue
            self.connections.append(connection)
            if self.behaviour is not None:
                threading.Thread(target=self.behaviour, args=(connection, self.stop), daemon=True).start()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        for connection in self.connections:
            connection.close()
        self.sock.close()


def _endless_body(connection, stop):
    """Headers without a length, then zeros until the client hangs up."""
    try:
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
        chunk = b"\0" * 65536
        while not stop.is_set():
            connection.sendall(chunk)
    except OSError:
        pass


def _huge_declared_length(connection, stop):
    try:
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\nConnection: close\r\n\r\n")
        stop.wait(10)
    except OSError:
        pass


def test_url_inputs_time_out_by_default_when_the_server_is_silent(detector, monkeypatch):
    import time

    from visualad_hf import image_io

    server = _SilentServer()
    try:
        monkeypatch.setattr(image_io, "DEFAULT_URL_TIMEOUT", 0.5)  # the default applies without timeout=
        start = time.monotonic()
        with pytest.raises(ImageLoadError, match=r"timed out after 0\.5 s"):
            detector(server.url)
        assert time.monotonic() - start < 10
        with pytest.raises(ImageLoadError, match=r"timed out after 0\.3 s"):
            detector(server.url, timeout=0.3)
    finally:
        server.close()


def test_url_inputs_have_a_finite_default_timeout_and_size_cap():
    from visualad_hf import image_io

    assert 0 < image_io.DEFAULT_URL_TIMEOUT <= 120
    assert 0 < image_io.DEFAULT_URL_MAX_BYTES <= 1024**3


def test_url_inputs_that_send_too_much_are_cut_off(detector, monkeypatch):
    from visualad_hf import image_io

    monkeypatch.setattr(image_io, "DEFAULT_URL_MAX_BYTES", 1_000_000)
    for behaviour, message in [(_endless_body, "more than 1,000,000 bytes"), (_huge_declared_length, "announces")]:
        server = _SilentServer(behaviour)
        try:
            with pytest.raises(ImageLoadError, match=message):
                detector(server.url, timeout=10)
        finally:
            server.close()
