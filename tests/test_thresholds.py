"""Threshold calibration: the two rules, storage in the config, round trip through save_pretrained, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_model, tiny_visualad_config
from PIL import Image
from transformers import pipeline

from visualad_hf import VisualADConfig
from visualad_hf.cli import main as cli_main
from visualad_hf.thresholds import (
    ThresholdCalibration,
    apply_calibration,
    calibrate,
    calibrate_f1_max,
    calibrate_from_normal_scores,
)


def test_normal_percentile_rule(caplog):
    scores = np.random.default_rng(0).normal(size=500)
    calibration = calibrate_from_normal_scores(scores, percentile=95)
    assert calibration.threshold == pytest.approx(np.percentile(scores, 95))
    assert calibration.method == "normal_percentile" and calibration.num_images == 500
    assert calibration.to_dict()["percentile"] == 95.0
    assert np.mean(scores >= calibration.threshold) == pytest.approx(0.05, abs=0.01)
    assert calibrate_from_normal_scores(scores, percentile=100).threshold == scores.max()
    with caplog.at_level("WARNING"):
        few = calibrate_from_normal_scores(torch.tensor([0.1, 0.5, 0.2]))  # tensors are accepted
    assert "cannot resolve" in caplog.text
    assert 0.2 < few.threshold <= 0.5
    with pytest.raises(ValueError, match="percentile"):
        calibrate_from_normal_scores(scores, percentile=0)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_from_normal_scores([0.1, float("nan")])
    with pytest.raises(ValueError, match="No scores"):
        calibrate_from_normal_scores([])


def brute_force_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for cut in np.unique(scores):
        predicted = scores >= cut
        tp = np.sum(predicted & (labels == 1))
        precision, recall = tp / max(predicted.sum(), 1), tp / max((labels == 1).sum(), 1)
        best = max(best, 0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return best


def test_f1_max_rule():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(40, int), np.ones(25, int)]
    scores = rng.normal(size=65) + 1.2 * labels
    calibration = calibrate_f1_max(scores, labels)
    predicted = scores >= calibration.threshold
    tp = np.sum(predicted & (labels == 1))
    f1 = 2 * tp / (predicted.sum() + labels.sum())
    assert f1 == pytest.approx(brute_force_f1_max(scores, labels))
    assert calibration.to_dict() == {
        "method": "f1_max",
        "num_images": 65,
        "f1": pytest.approx(f1),
        "num_anomalous": 25,
        "num_normal": 40,
    }
    with pytest.raises(ValueError, match="labels"):
        calibrate_f1_max(scores, labels[:-1])


def test_apply_calibration_round_trips(tmp_path):
    config = tiny_visualad_config("clip")
    calibration = ThresholdCalibration(0.25, "normal_percentile", 12, {"percentile": 99.0})
    apply_calibration(config, calibration)
    config.save_pretrained(tmp_path)
    reloaded = VisualADConfig.from_pretrained(tmp_path)
    assert reloaded.anomaly_threshold == 0.25
    assert reloaded.threshold_calibration == {"method": "normal_percentile", "num_images": 12, "percentile": 99.0}


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Smooth "normal" images and the same with a bright square ("anomalous"), as folders of PNGs."""
    root = tmp_path_factory.mktemp("calibration_images")
    rng = np.random.default_rng(0)
    for name in ("normal", "anomalous"):
        (root / name).mkdir()
    for index in range(6):
        base = np.clip(rng.normal(120, 10, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(base).save(root / "normal" / f"{index}.png")
        base[10:30, 12:32] = 255
        Image.fromarray(base).save(root / "anomalous" / f"{index}.png")
    return root


@pytest.mark.parametrize("method", ["normal_percentile", "f1_max"])
def test_calibrated_threshold_travels_with_the_model(model_dir, image_sets, tmp_path, method):
    detector = pipeline("anomaly-detection", model=str(model_dir), device="cpu")
    normal = sorted(str(path) for path in (image_sets / "normal").iterdir())
    anomalous = sorted(str(path) for path in (image_sets / "anomalous").iterdir())
    if method == "normal_percentile":
        calibration = calibrate(detector, normal, percentile=90, batch_size=4)
        scores = [detector(path)["score"] for path in normal]
        assert calibration.threshold == pytest.approx(np.percentile(scores, 90), abs=1e-6)
    else:
        calibration = calibrate(detector, normal, anomalous, batch_size=4)
        assert calibration.parameters["num_anomalous"] == 6
    assert calibration.method == method
    detector.save_pretrained(tmp_path)
    reloaded = pipeline("anomaly-detection", model=str(tmp_path), device="cpu")
    assert reloaded.model.config.anomaly_threshold == pytest.approx(calibration.threshold)
    assert reloaded.model.config.threshold_calibration == json.loads(json.dumps(calibration.to_dict()))
    result = reloaded(normal[0])
    assert result["threshold"] == pytest.approx(calibration.threshold)
    assert result["is_anomalous"] == (result["score"] >= calibration.threshold)


def test_calibrate_command(model_dir, image_sets, tmp_path, capsys):
    (image_sets / "broken.png").write_bytes(b"")
    try:
        output = tmp_path / "calibrated"
        status = cli_main(
            [
                "calibrate",
                "--model",
                str(model_dir),
                "--normal",
                str(image_sets / "normal"),
                str(image_sets / "broken.png"),
                "--percentile",
                "100",
                "--output",
                str(output),
                "--device",
                "cpu",
            ]
        )
    finally:
        (image_sets / "broken.png").unlink()
    captured = capsys.readouterr()
    assert status == 1  # one unreadable file, reported; the others were used
    assert "broken.png: empty file" in captured.err
    config = VisualADConfig.from_pretrained(output)
    assert config.threshold_calibration["method"] == "normal_percentile"
    assert config.threshold_calibration["num_images"] == 6
    assert json.loads(captured.out)["threshold"] == pytest.approx(config.anomaly_threshold)
    assert (output / "preprocessor_config.json").is_file()
    labelled = tmp_path / "labelled"
    status = cli_main(
        [
            "calibrate",
            "--model",
            str(model_dir),
            "--normal",
            str(image_sets / "normal"),
            "--anomalous",
            str(image_sets / "anomalous"),
            "--output",
            str(labelled),
            "--device",
            "cpu",
        ]
    )
    assert status == 0
    assert VisualADConfig.from_pretrained(labelled).threshold_calibration["method"] == "f1_max"


# ---------------------------------------------------------------------------------------------------------------------
# The calibrated folder keeps what the source folder had (issue 11, item 6)


@pytest.fixture
def trained_folder(model_dir, tmp_path):
    """A model folder as training leaves it: card, eval_results/, training_args.yaml, a checkpoint and logs."""
    import shutil

    from visualad_hf.model_card import create_model_card

    folder = tmp_path / "trained"
    shutil.copytree(model_dir, folder)
    config = VisualADConfig.from_pretrained(folder)
    create_model_card(config, training_data="synthetic benchmark (auxiliary families)").save(str(folder / "README.md"))
    (folder / "eval_results").mkdir()
    (folder / "eval_results" / "metrics.md").write_text("| Category | I-AUROC |\n")
    (folder / "training_args.yaml").write_text("seed: 111\n")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (folder / "logs").mkdir()
    return folder


def calibrate_cli(*args):
    return cli_main(["calibrate", "--device", "cpu", *map(str, args)])


def test_calibrate_output_keeps_card_results_and_arguments(trained_folder, image_sets, tmp_path, capsys):
    output = tmp_path / "calibrated"
    card_before = (trained_folder / "README.md").read_text()
    assert "| Decision threshold | none set" in card_before
    assert calibrate_cli("--model", trained_folder, "--normal", image_sets / "normal", "--output", output) == 0
    config = VisualADConfig.from_pretrained(output)
    card = (output / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| Decision threshold |"))
    assert f"{config.anomaly_threshold:.6g} (in `config.json`)" in row
    assert "99th percentile of the scores of 6 normal images" in row
    assert [line for line in card.splitlines() if line != row] == [
        line for line in card_before.splitlines() if not line.startswith("| Decision threshold |")
    ]
    assert (output / "eval_results" / "metrics.md").read_text() == "| Category | I-AUROC |\n"
    assert (output / "training_args.yaml").read_text() == "seed: 111\n"
    assert (output / "model.safetensors").read_bytes() == (trained_folder / "model.safetensors").read_bytes()
    assert not (output / "checkpoint-5").exists() and not (output / "logs").exists()
    assert VisualADConfig.from_pretrained(trained_folder).anomaly_threshold is None  # the source is untouched


def test_calibrate_in_place_updates_the_card_and_keeps_everything(trained_folder, image_sets, capsys):
    weights = (trained_folder / "model.safetensors").read_bytes()
    assert calibrate_cli(
        "--model", trained_folder, "--normal", image_sets / "normal", "--anomalous", image_sets / "anomalous",
        "--output", trained_folder, "--dtype", "bfloat16",
    ) == 0
    config = VisualADConfig.from_pretrained(trained_folder)
    assert config.threshold_calibration["method"] == "f1_max"
    card = (trained_folder / "README.md").read_text()
    assert "none set" not in card and "the F1-max point on 12 labelled images" in card
    assert (trained_folder / "model.safetensors").read_bytes() == weights  # bf16 scoring, weights copied unchanged
    assert (trained_folder / "checkpoint-5" / "trainer_state.json").is_file() and (trained_folder / "logs").is_dir()
    assert not [p for p in trained_folder.parent.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_calibrate_refuses_to_replace_what_is_not_a_model(trained_folder, image_sets, tmp_path, capsys):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert calibrate_cli("--model", trained_folder, "--normal", image_sets / "normal", "--output", folder) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty and is not a model folder" in err and len(err.splitlines()) == 1
    assert (folder / "notes.txt").read_text() == "mine"
    other = tmp_path / "other_model"
    save_tiny_model(other)
    assert calibrate_cli("--model", trained_folder, "--normal", image_sets / "normal", "--output", other) == 2
    assert "already holds another model; pass --overwrite" in capsys.readouterr().err
    assert calibrate_cli(
        "--model", trained_folder, "--normal", image_sets / "normal", "--output", other, "--overwrite"
    ) == 0
    assert (other / "training_args.yaml").is_file()


def test_calibrate_reports_nan_images_and_goes_on(model_dir, image_sets, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.full((12, 12), np.nan, dtype=np.float32), mode="F").save(bad / "nan.tiff")
    output = tmp_path / "calibrated"
    assert calibrate_cli("--model", model_dir, "--normal", image_sets / "normal", bad, "--output", output) == 1
    assert f"error: {bad / 'nan.tiff'}: 144 of 144 pixel values are NaN" in capsys.readouterr().err
    assert VisualADConfig.from_pretrained(output).threshold_calibration["num_images"] == 6
    assert calibrate_cli("--model", model_dir, "--normal", bad, "--output", tmp_path / "none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"error: {bad / 'nan.tiff'}") and "none of the normal images could be scored" in err[-1]
    assert not (tmp_path / "none").exists()


def test_update_card_threshold_without_the_templates_row():
    from visualad_hf.model_card import update_card_threshold

    text = update_card_threshold("# my model\n\nSome words.\n", 0.5, {"method": "normal_percentile", "num_images": 3,
                                                                       "percentile": 95.0})
    assert text.endswith("| Decision threshold | 0.5 (in `config.json`); the 95th percentile of the scores of 3 normal "
                         "images |\n")
    assert update_card_threshold(text, 0.7).count("## Decision threshold") == 1
