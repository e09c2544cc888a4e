"""`visualad detect`: folders and files in, overlay panels and results.csv/json out, bad files reported."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import png_header_only, tiny_visualad_config
from PIL import Image

from visualad_hf import VisualADImageProcessor, VisualADModel
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
