"""`visualad detect`: folders and files in, overlay panels and results.csv/json out, bad files reported."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import png_header_only
from PIL import Image

from visualad_hf import VisualADModel
from visualad_hf.cli import main as cli_main
from visualad_hf.detect import find_images


def write_image(path, size=(40, 30), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)


@pytest.fixture
def inputs(tmp_path):
    root = tmp_path / "parts"
    write_image(root / "a.png", seed=1)
    write_image(root / "nested" / "B.JPG", size=(64, 48), seed=2)
    write_image(root / "nested" / "gray.png", seed=3, mode="L")
    write_image(root / ".hidden" / "skip.png", seed=4)
    (root / "notes.txt").write_text("not scanned: not an image extension")
    return root


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def detect(model_dir, *args):
    return cli_main(["detect", "--model", str(model_dir), "--device", "cpu", "--quiet", *map(str, args)])


def test_detect_writes_panels_and_tables(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    single = tmp_path / "single.png"
    write_image(single, size=(30, 30), seed=5)
    status = detect(model_dir, inputs, single, "--out", out, "--batch-size", "2", "--threshold", "0.0")
    assert status == 0
    rows = read_csv(out / "results.csv")
    assert [row["path"] for row in rows] == [
        str(inputs / "a.png"),
        str(inputs / "nested" / "B.JPG"),
        str(inputs / "nested" / "gray.png"),
        str(single),
    ]
    assert all(row["status"] == "ok" and row["error"] == "" for row in rows)
    assert all(row["threshold"] == "0.0" and row["is_anomalous"] == str(float(row["score"]) >= 0.0) for row in rows)
    assert [row["overlay"] for row in rows] == [
        "overlays/parts/a.png",
        "overlays/parts/nested/B.png",
        "overlays/parts/nested/gray.png",
        "overlays/single.png",
    ]
    panel = Image.open(out / rows[1]["overlay"])
    assert panel.mode == "RGB" and panel.width > 3 * 256  # three tiles, small images scaled up to 256 px
    summary = json.loads((out / "results.json").read_text())
    assert summary["summary"]["num_ok"] == 4 and summary["summary"]["num_failed"] == 0
    assert summary["results"][0]["score"] == pytest.approx(float(rows[0]["score"]))
    assert "4 image(s) scored, 0 failed" in capsys.readouterr().err


def test_bad_files_are_reported_and_the_run_goes_on(model_dir, inputs, tmp_path, capsys):
    good = inputs / "a.png"
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "text.jpg").write_text("hello")
    (inputs / "truncated.png").write_bytes(good.read_bytes()[:150])
    png_header_only(inputs / "bomb.png", 100_000, 100_000)
    write_image(inputs / "big.png", size=(200, 100), seed=6)  # over the --max-pixels given below
    out = tmp_path / "out"
    status = detect(model_dir, inputs, tmp_path / "missing.png", "--out", out, "--max-pixels", "10000")
    assert status == 1
    rows = {row["path"]: row for row in read_csv(out / "results.csv")}
    expected_errors = {
        "empty.png": "empty file (0 bytes)",
        "text.jpg": "not an image",
        "truncated.png": "truncated",
        "bomb.png": "decompression bomb",
        "big.png": "exceeds the limit of 10,000",
    }
    err = capsys.readouterr().err
    for name, reason in expected_errors.items():
        row = rows[str(inputs / name)]
        assert row["status"] == "error" and reason in row["error"] and row["score"] == ""
        assert f"{inputs / name}: " in err and reason in err
    assert rows[str(tmp_path / "missing.png")]["error"] == "no such file or folder"
    ok = [row for row in rows.values() if row["status"] == "ok"]
    assert len(ok) == 3 and all((out / row["overlay"]).is_file() for row in ok)
    assert rows[str(inputs / "a.png")]["is_anomalous"] == ""  # no threshold known
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert (summary["num_ok"], summary["num_failed"]) == (3, 6)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the run restores Pillow's limit


def test_an_output_that_is_a_file_is_one_line(model_dir, inputs, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert detect(model_dir, inputs, "--output", tmp_path / "taken") == 2
    assert "taken is a file; --output must be a folder" in capsys.readouterr().err
    assert detect(model_dir, inputs, "--output", model_dir) == 2
    assert "is a model folder; write the results to another folder" in capsys.readouterr().err
    assert not (model_dir / "overlays").exists()


def test_no_images_is_a_usage_error(model_dir, tmp_path, capsys):
    (tmp_path / "empty_folder").mkdir()
    assert detect(model_dir, tmp_path / "empty_folder", "--out", tmp_path / "out") == 2
    assert "No images found" in capsys.readouterr().err


def test_find_images_names_are_unique(tmp_path):
    write_image(tmp_path / "x" / "a.png")
    write_image(tmp_path / "x" / "a.jpg")
    write_image(tmp_path / "y" / "a.png")
    files, missing = find_images([tmp_path / "x", tmp_path / "x" / "a.png", tmp_path / "y" / "a.png"])
    assert not missing
    names = [str(file.name.with_suffix(".png")) for file in files]
    assert names == ["x/a.png", "x/a-2.png", "a.png", "a-2.png"]


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs become error rows (issue 11, item 1)


def test_a_nan_tiff_is_an_error_row_naming_the_file_and_the_run_goes_on(model_dir, inputs, tmp_path, capsys):
    nan_tiff = inputs / "nan.tiff"
    Image.fromarray(np.full((20, 20), np.nan, dtype=np.float32), mode="F").save(nan_tiff)
    out = tmp_path / "out"
    assert detect(model_dir, inputs, "--output", out) == 1
    rows = {row["path"]: row for row in read_csv(out / "results.csv")}
    assert rows[str(nan_tiff)]["status"] == "error" and "NaN or infinite" in rows[str(nan_tiff)]["error"]
    assert sum(row["status"] == "ok" for row in rows.values()) == 3
    assert f"error: {nan_tiff}: 400 of 400 pixel values are NaN" in capsys.readouterr().err


def test_a_failing_batch_is_retried_image_by_image(model_dir, inputs, tmp_path, monkeypatch):
    """A forward failure (here: any batch holding the 64-px-wide image) costs only the image that fails alone."""
    from visualad_hf.pipeline_anomaly_detection import AnomalyDetectionPipeline

    original = AnomalyDetectionPipeline.preprocess

    def failing(self, image, **kwargs):
        if getattr(image, "width", None) == 64:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, image, **kwargs)

    monkeypatch.setattr(AnomalyDetectionPipeline, "preprocess", failing)
    out = tmp_path / "out"
    assert detect(model_dir, inputs, "--output", out, "--batch-size", "3") == 1
    rows = {row["path"]: row for row in read_csv(out / "results.csv")}
    bad = rows[str(inputs / "nested" / "B.JPG")]
    assert bad["status"] == "error" and "RuntimeError: CUDA out of memory (simulated)" in bad["error"]
    assert [row["status"] for path, row in rows.items() if path != bad["path"]] == ["ok", "ok"]


# ---------------------------------------------------------------------------------------------------------------------
# Crash-safe, resumable output folders (issue 11, item 2)


def many_images(folder, count=10):
    for index in range(count):
        write_image(folder / f"{index:02d}.png", size=(32 + index, 30), seed=index)
    return folder


def journal_lines(out):
    path = out / ".visualad" / "journal.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def all_pngs_are_complete(folder):
    for path in folder.rglob("*.png"):
        with Image.open(path) as image:
            image.load()


SLOW_RUN = """
import sys, time
import visualad_cli
from visualad_hf.pipeline_anomaly_detection import AnomalyDetectionPipeline
original = AnomalyDetectionPipeline.__call__
def slow(self, *args, **kwargs):
    time.sleep(0.4)
    return original(self, *args, **kwargs)
AnomalyDetectionPipeline.__call__ = slow
sys.exit(visualad_cli.main(sys.argv[1:]))
"""


def _subprocess_env():
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    repo = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.mark.slow
def test_detect_killed_midway_resumes_and_matches_an_uninterrupted_run(model_dir, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    images = many_images(tmp_path / "images")
    out = tmp_path / "out"
    args = ["detect", str(images), "--model", str(model_dir), "--output", str(out), "--device", "cpu", "--quiet"]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, *args, "--batch-size", "1"], env=_subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while len(journal_lines(out)) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    done_before = len(journal_lines(out))
    assert 3 <= done_before < 10 and not (out / "results.csv").exists()
    assert (out / ".visualad" / "lock").exists()  # the dead run's lock file stays behind ...
    all_pngs_are_complete(out / "overlays")  # ... and no overlay is truncated under its real name

    assert cli_main(args) == 0  # the same command again: takes the stale lock over and completes the folder
    err = capsys.readouterr().err
    assert "took over the lock of pid" in err and f"{done_before} of 10 image(s) were done by an earlier run" in err
    assert len(journal_lines(out)) == 10  # the images done before were not scored again
    rows = read_csv(out / "results.csv")
    assert [row["path"] for row in rows] == [str(images / f"{index:02d}.png") for index in range(10)]
    assert not list(out.rglob("*.tmp")) and not (out / ".visualad" / "lock").exists()
    all_pngs_are_complete(out / "overlays")
    assert len(list((out / "overlays").rglob("*.png"))) == 10

    clean = tmp_path / "clean"
    assert cli_main([*args[:4], "--output", str(clean), "--device", "cpu", "--quiet"]) == 0
    assert [row["score"] for row in read_csv(clean / "results.csv")] == [row["score"] for row in rows]


KILL_MID_WRITE = """
import os, signal, sys
import visualad_cli
from visualad_hf.inference import detection
real = detection.write_bytes_atomic
calls = []
def dying(path, data):
    calls.append(path)
    if len(calls) == 3:  # the third overlay: half written under a temporary name, then the process dies
        with open(path.with_name("." + path.name + ".0123abcd.tmp"), "wb") as handle:
            handle.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
detection.write_bytes_atomic = dying
sys.exit(visualad_cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_kill_while_an_overlay_is_written_leaves_no_truncated_file(model_dir, tmp_path, capsys):
    import subprocess
    import sys

    images = many_images(tmp_path / "images", count=5)
    out = tmp_path / "out"
    args = ["detect", str(images), "--model", str(model_dir), "--output", str(out), "--device", "cpu", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, *args], env=_subprocess_env(), capture_output=True, check=False
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert len(journal_lines(out)) == 2 and len(list(out.rglob(".*.tmp"))) == 1
    all_pngs_are_complete(out / "overlays")
    assert cli_main(args) == 0
    assert "2 of 5 image(s) were done by an earlier run" in capsys.readouterr().err
    assert not list(out.rglob("*.tmp")) and len(read_csv(out / "results.csv")) == 5
    all_pngs_are_complete(out / "overlays")


def test_a_full_disk_is_one_line_and_keeps_what_was_finished(model_dir, tmp_path, monkeypatch, capsys):
    import errno

    from visualad_hf.inference import detection

    images = many_images(tmp_path / "images", count=5)
    out = tmp_path / "out"
    real = detection.write_bytes_atomic
    calls = []

    def full(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(detection, "write_bytes_atomic", full)
    assert detect(model_dir, images, "--output", out) == 1
    err = capsys.readouterr().err.strip()
    assert "the disk is full while writing" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert len(journal_lines(out)) == 2 and not (out / "results.csv").exists()
    monkeypatch.setattr(detection, "write_bytes_atomic", real)
    assert detect(model_dir, images, "--output", out) == 0
    assert "2 of 5 image(s) were done by an earlier run" in capsys.readouterr().err
    assert len(read_csv(out / "results.csv")) == 5


def test_rerun_with_other_settings_or_into_an_unknown_run_is_refused(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert detect(model_dir, inputs, "--output", out, "--threshold", "0.1") == 0
    capsys.readouterr()
    assert detect(model_dir, inputs, "--output", out, "--threshold", "0.2") == 2
    err = capsys.readouterr().err.strip()
    assert "holds the outputs of a visualad detect run with other settings (threshold: 0.1 then, 0.2 now)" in err
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert {row["threshold"] for row in read_csv(out / "results.csv")} == {"0.1"}  # untouched
    assert detect(model_dir, inputs, "--output", out, "--threshold", "0.2", "--overwrite") == 0
    assert {row["threshold"] for row in read_csv(out / "results.csv")} == {"0.2"}
    assert len(journal_lines(out)) == 3  # --overwrite redid all three images, not appended to the old journal

    legacy = tmp_path / "legacy"  # a folder written by the first release: results but no record of the settings
    (legacy / "overlays").mkdir(parents=True)
    (legacy / "results.csv").write_text("path,status\n")
    capsys.readouterr()
    assert detect(model_dir, inputs, "--output", legacy) == 2
    assert "already holds results.csv, overlays from another run" in capsys.readouterr().err


HOLD_LOCK = """
import sys, time
from visualad_hf.inference import FolderLock
with FolderLock(sys.argv[1], "visualad detect"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(model_dir, inputs, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], env=_subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert detect(model_dir, inputs, "--output", out) == 2
        err = capsys.readouterr().err
        assert f"is in use by a running visualad detect (pid {holder.pid}); wait for it to finish" in err
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    (out / ".visualad" / "lock").write_text(f"{holder.pid}\n")  # as a SIGKILLed run leaves it
    assert detect(model_dir, inputs, "--output", out) == 0
    assert f"took over the lock of pid {holder.pid}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Model and device mistakes are one line (issue 11, item 13)


@pytest.mark.parametrize(
    "model, message",
    [
        ("./no/such/model", "no such model folder: ./no/such/model"),
        ("no/such/deep/folder", "no such model folder"),
        ("someone/visualad-not-cached", "HF_HUB_OFFLINE=1) forbids downloading it; download it where there is network"),
        ("not a repo!!", "is neither a local folder nor a Hub id"),
        ("EMPTY", "is not a model folder: it has no config.json"),
        ("IMAGES", "it holds images: pass them as inputs, and the model folder with --model"),
        ("FILE", "is a file, not a model folder"),
        ("OTHER", "holds a 'clip_vision_model' model, not a VisualAD model"),
        ("NOWEIGHTS", "has a config.json but no weights"),
    ],
)
def test_model_mistakes_are_one_line(model, message, model_dir, inputs, tmp_path, capsys):
    import shutil

    from transformers import CLIPVisionConfig

    if model == "EMPTY":
        model = tmp_path / "empty"
        model.mkdir()
    elif model == "IMAGES":
        model = inputs
    elif model == "FILE":
        model = model_dir / "config.json"
    elif model == "OTHER":
        model = tmp_path / "clip"
        CLIPVisionConfig().save_pretrained(model)
    elif model == "NOWEIGHTS":
        model = tmp_path / "noweights"
        model.mkdir()
        shutil.copy(model_dir / "config.json", model)
    status = cli_main(["detect", str(inputs), "--model", str(model), "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("visualad detect: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_device_mistakes_are_one_clear_error(model_dir, inputs, tmp_path, capsys):
    from visualad_hf.inference import DeviceError, load_model_for_inference

    for device, message in [("gpu", "'gpu' is not a device name; use cuda"), ("tpu", "unknown device 'tpu'")]:
        with pytest.raises(SystemExit):
            cli_main(["detect", str(inputs), "--model", str(model_dir), "--output", str(tmp_path), "--device", device])
        assert message in capsys.readouterr().err
        with pytest.raises(DeviceError, match=message):
            load_model_for_inference(model_dir, device)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU is visible to PyTorch .*; use --device cpu"):
            load_model_for_inference(model_dir, "cuda")
    loaded = load_model_for_inference(model_dir, "cpu", "bfloat16")
    assert loaded.device == "cpu" and loaded.model.dtype == torch.bfloat16 and not loaded.model.training


# ---------------------------------------------------------------------------------------------------------------------
# Overlays (issue 11, item 21)


def test_overlays_use_the_models_fixed_range_and_say_so(model_dir, inputs, tmp_path):
    from visualad_hf import VisualADConfig

    out = tmp_path / "out"
    assert detect(model_dir, inputs, "--output", out, "--threshold", "0.0") == 0
    layers = len(VisualADConfig.from_pretrained(model_dir).feature_layers)
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["colour_scale"] == [-2.0 * layers, 2.0 * layers]
    panel = Image.open(out / "overlays" / "parts" / "a.png")
    assert panel.width > 3 * 256 + 40  # three tiles and a colour bar
    assert detect(model_dir, inputs, "--output", tmp_path / "fixed", "--heatmap-range", "-1", "1") == 0
    assert json.loads((tmp_path / "fixed" / "results.json").read_text())["settings"]["colour_scale"] == [-1.0, 1.0]


def test_an_output_folder_inside_an_input_folder_is_not_scanned(model_dir, inputs, tmp_path):
    out = inputs / "results"
    assert detect(model_dir, inputs, "--output", out) == 0
    assert detect(model_dir, inputs, "--output", out) == 0  # the rerun does not take its own overlays as inputs
    assert len(read_csv(out / "results.csv")) == 3
    files, _ = find_images([inputs], exclude=[out])
    assert not any("results" in str(file.path) for file in files)


def test_a_model_retrained_in_place_is_another_setting(tmp_path, inputs, capsys):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    assert detect(model, inputs, "--output", out) == 0
    torch.manual_seed(1)
    VisualADModel(VisualADModel.config_class.from_pretrained(model)).save_pretrained(model)  # same config, new weights
    capsys.readouterr()
    assert detect(model, inputs, "--output", out) == 2
    assert "model_weights" in capsys.readouterr().err


def test_panels_label_columns_and_keep_normal_maps_blue_on_the_fixed_range():
    from visualad_hf.visualization import COLUMN_LABELS, colour_bar, map_value_bounds, render_panel

    rng = np.random.default_rng(0)
    normal_map = (-3.0 + 0.2 * rng.standard_normal((40, 40))).astype(np.float32)  # a normal image of a 2-layer model
    image = Image.new("RGB", (40, 40), (128, 128, 128))
    scale = map_value_bounds(2)
    assert (scale.low, scale.high) == (-4.0, 4.0)
    fixed = np.asarray(render_panel(image, normal_map, -2.5, 1.0, value_range=scale))
    own = np.asarray(render_panel(image, normal_map, -2.5, 1.0))
    assert fixed.shape == own.shape and fixed.shape[1] > 3 * 256 + 40  # three 256-px tiles and a colour bar
    tile = slice(8 + 256 + 8, 8 + 2 * 256 + 8)  # the heatmap column
    heat_fixed, heat_own = fixed[-8 - 256 : -8, tile].reshape(-1, 3), own[-8 - 256 : -8, tile].reshape(-1, 3)
    assert (heat_fixed[:, 2] > heat_fixed[:, 0]).all()  # blue everywhere: nothing looks anomalous
    assert (heat_own[:, 0] > 200).any()  # its own min..max paints the same normal map red somewhere
    assert COLUMN_LABELS == ("image", "heatmap", "overlay")
    bar = np.asarray(colour_bar(scale, 101, threshold=0.0))
    assert (bar[50, :14] == 0).all()  # the threshold, at the middle of -4..4, is a black line across the bar
    assert bar[1, 7, 0] > 100 and bar[1, 7, 2] < 50 and bar[99, 7, 2] > 100  # red at the top, blue at the bottom


def test_a_journal_line_cut_by_a_kill_is_dropped_and_appends_stay_valid(tmp_path):
    from visualad_hf.inference import Journal

    journal = Journal(tmp_path / "journal.jsonl")
    journal.append({"n": 1})
    journal.append({"n": 2})
    journal.close()
    with open(journal.path, "ab") as handle:
        handle.write(b'{"n": 3, "cut')  # the kill came in the middle of this line
    assert Journal(journal.path).read() == [{"n": 1}, {"n": 2}]
    resumed = Journal(journal.path)
    resumed.append({"n": 4})
    resumed.close()
    assert Journal(journal.path).read() == [{"n": 1}, {"n": 2}, {"n": 4}]
