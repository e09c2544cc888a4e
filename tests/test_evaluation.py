"""The evaluation runner and `visualad evaluate`: protocol wiring, flags, failures, outputs, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visualad_hf import VisualADModel
from visualad_hf.cli import main as cli_main
from visualad_hf.data import generate_synthetic_benchmark, load_anomaly_dataset
from visualad_hf.evaluation import dataset_flags, evaluate_benchmark, evaluate_model
from visualad_hf.evaluation.runner import batch_aligned_shard
from visualad_hf.image_processing_visualad import VisualADImageProcessor
from visualad_hf.metrics import image_metrics, pixel_metrics

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("grain", "nut")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny saved model and a synthetic two-category MVTec-layout benchmark (7 test images per category)."""
    from conftest import tiny_visualad_config

    root = tmp_path_factory.mktemp("evaluation")
    torch.manual_seed(0)
    config = tiny_visualad_config("clip")
    model = VisualADModel(config).eval()
    model.save_pretrained(root / "model")
    VisualADImageProcessor.from_model_config(config).save_pretrained(root / "model")
    generate_synthetic_benchmark(
        root / "bench", image_size=40, auxiliary_categories=(), target_categories=CATEGORIES,
        num_train=0, num_test_normal=3, num_test_anomalous=4,
    )
    dataset = load_anomaly_dataset("mvtec", root / "bench", cache_dir=root / "cache")
    return {"root": root, "model": model, "dataset": dataset, "config": config}


def reference_metrics(model, dataset) -> dict[str, dict[str, float | None]]:
    """One image at a time through processor -> model -> post-processing, then the plain metric functions."""
    processor = VisualADImageProcessor.from_model_config(model.config)
    scores, maps, masks, labels, categories = [], [], [], [], []
    for row in dataset:
        inputs = processor(row["image"], masks=[row["mask"]])
        with torch.no_grad():
            processed = processor.post_process_anomaly_detection(model(inputs["pixel_values"]))[0]
        scores.append(processed["score"])
        maps.append(processed["anomaly_map"].numpy())
        masks.append(inputs["masks"][0].numpy())
        labels.append(row["label"])
        categories.append(row["category"])
    scores, maps, masks, labels, categories = map(np.asarray, (scores, maps, masks, labels, categories))
    expected = {}
    for category in dict.fromkeys(categories.tolist()):
        keep = categories == category
        image = image_metrics(scores[keep], labels[keep])
        pixel = pixel_metrics(maps[keep], masks[keep])
        expected[category] = {f"image_{k}": v for k, v in image.items()} | {f"pixel_{k}": v for k, v in pixel.items()}
    return expected


def test_evaluate_model_follows_the_protocol(workspace, tmp_path):
    model, dataset = workspace["model"], workspace["dataset"]
    model.train()  # the runner evaluates in eval mode and restores the mode
    result = evaluate_model(model, None, dataset, batch_size=3, num_figure_samples=3, progress=False)
    assert model.training
    model.eval()
    expected = reference_metrics(model, dataset)
    assert list(result.per_category) == list(CATEGORIES)
    for category in CATEGORIES:
        for name, value in expected[category].items():
            assert value is not None
            assert result.per_category[category][name] == pytest.approx(value, abs=1e-6), (category, name)
    assert result.mean["pixel_aupro"] == pytest.approx(np.mean([expected[c]["pixel_aupro"] for c in CATEGORIES]))
    assert result.info["num_images"] == len(dataset) == len(result.per_image)
    assert result.info["dataset"] == "mvtec" and not result.failures
    assert "grain/pixel_aupro" in result.flat_metrics() and "eval/image_auroc" in result.flat_metrics("eval/")

    paths = result.save(tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert saved["per_category"] == result.per_category and saved["settings"]["aupro_method"] == "exact"
    table = paths["markdown"].read_text().splitlines()
    assert table[0].startswith("| Category | I-AUROC") and table[-1].startswith("| **Mean**")
    assert len(paths["scores"].read_text().splitlines()) == len(dataset) + 1
    figure = Image.open(paths["figure:grain"])
    assert figure.width > 3 * 100 and figure.height > 3 * 100  # three rows of tiles, three samples


def test_anomaly_only_dataset_reports_pixel_metrics_only(tmp_path, workspace):
    # Kvasir-SEG layout: images/ + masks/, every image anomalous.
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{index}.png")
        mask = np.zeros((36, 36), np.uint8)
        mask[5 + index : 15 + index, 8:20] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{index}.png")
    dataset = load_anomaly_dataset("kvasir", tmp_path, cache_dir=tmp_path / "cache")
    assert dataset_flags(dataset) == {"dataset": "kvasir", "image_metrics": False, "pixel_metrics": True}
    result = evaluate_model(workspace["model"], None, dataset, batch_size=2, num_figure_samples=0, progress=False)
    values = result.per_category["colon"]
    assert values["image_auroc"] is None and values["pixel_aupro"] is not None
    assert result.metrics.metric_names == ["pixel_auroc", "pixel_f1_max", "pixel_ap", "pixel_aupro"]
    assert "I-AUROC" not in result.to_markdown()


def test_unreadable_images_are_reported_and_left_out(tmp_path, workspace):
    import shutil

    bench = tmp_path / "bench"
    shutil.copytree(workspace["root"] / "bench", bench)
    broken = min((bench / "nut" / "test" / "hole").glob("*.png"))
    broken.write_bytes(b"not a png")
    result = evaluate_benchmark(
        workspace["model"], None, "mvtec", bench, categories=["nut"], cache_dir=tmp_path / "cache",
        batch_size=4, num_figure_samples=0, progress=False,
    )
    assert [f["image_path"] for f in result.failures] == ["nut/test/hole/000.png"]
    assert "not an image" in result.failures[0]["error"]
    assert result.info["num_images"] == 6 and list(result.per_category) == ["nut"]
    assert result.per_category["nut"]["pixel_aupro"] is not None


def test_batch_aligned_shards_cover_the_dataset_in_order():
    for rows, batch, world in [(10, 3, 2), (7, 4, 3), (2, 8, 2), (9, 1, 4)]:
        shards = [batch_aligned_shard(rows, batch, rank, world) for rank in range(world)]
        assert [i for shard in shards for i in shard] == list(range(rows))
        assert all(shard.start % batch == 0 for shard in shards if len(shard))


def test_cli_evaluate_writes_outputs_and_rejects_bad_folders(workspace, tmp_path, capsys):
    root = workspace["root"]
    args = [
        "evaluate", "--model", str(root / "model"), "--dataset", "mvtec", "--data-dir", str(root / "bench"),
        "--categories", "nut", "--batch-size", "4", "--num-workers", "0", "--figures", "2", "--quiet",
        "--cache-dir", str(tmp_path / "cache"), "--aupro", "classic",
    ]
    assert cli_main([*args, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "P-AUPRO" in printed and "Mean" in printed
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["settings"]["aupro_method"] == "classic" and saved["settings"]["num_thresholds"] == 200
    assert (tmp_path / "out" / "figures" / "nut.png").is_file()

    bad = [*args[:6], str(tmp_path / "missing"), *args[7:]]
    assert cli_main(bad) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_equal_one(workspace, tmp_path):
    """`accelerate launch` with 2 CPU processes gives the same metrics, scores and figures as one process."""
    root = workspace["root"]
    common = [
        "--model", str(root / "model"), "--dataset", "mvtec", "--data-dir", str(root / "bench"),
        "--batch-size", "3", "--num-workers", "0", "--figures", "2", "--quiet", "--cache-dir", str(tmp_path / "cache"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1",
        str(REPO / "training" / "evaluate.py"), *common, "--output", str(tmp_path / "two"),
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli_main(["evaluate", *common, "--out", str(tmp_path / "one")]) == 0

    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["per_category"] == one["per_category"] and two["mean"] == one["mean"]
    assert (tmp_path / "two" / "scores.csv").read_text() == (tmp_path / "one" / "scores.csv").read_text()
    for category in CATEGORIES:
        assert (tmp_path / "two" / "figures" / f"{category}.png").read_bytes() == (
            tmp_path / "one" / "figures" / f"{category}.png"
        ).read_bytes()


def test_anomalous_images_without_a_mask_are_left_out_of_the_pixel_metrics(workspace, tmp_path, capsys):
    import shutil

    bench = tmp_path / "bench"
    shutil.copytree(workspace["root"] / "bench", bench)
    meta = json.loads((bench / "meta.json").read_text())
    record = next(r for r in meta["test"]["nut"] if r["anomaly"] == 1)
    record["mask_path"] = ""  # an AnomalyCLIP-style record: anomalous, but no mask
    (bench / "meta.json").write_text(json.dumps(meta))
    dataset = load_anomaly_dataset("meta_json", bench, cache_dir=tmp_path / "cache")
    model = workspace["model"]
    with pytest.warns(UserWarning, match=r"1 anomalous image\(s\) have no ground-truth mask.*" + record["img_path"]):
        result = evaluate_model(model, None, dataset, batch_size=4, num_figure_samples=2, progress=False)
    assert result.info["pixel_metrics_excluded"] == [record["img_path"]]

    # pixel metrics: as if the image were not there; image metrics: with it
    without = dataset.filter(lambda row: row["image_path"] != record["img_path"])
    expected_pixels = evaluate_model(model, None, without, batch_size=4, num_figure_samples=0, progress=False)
    expected_images = evaluate_model(
        model, None, dataset, batch_size=4, num_figure_samples=0, progress=False, pixel_metrics=False
    )
    for category in CATEGORIES:
        for name, value in result.per_category[category].items():
            reference = expected_pixels if name.startswith("pixel_") else expected_images
            assert value == reference.per_category[category][name], (category, name)
    assert result.metrics.num_images["nut"] == 7 and len(result.per_image) == len(dataset)

    args = ["evaluate", "--model", str(workspace["root"] / "model"), "--dataset", "meta_json", "--data-dir", str(bench),
            "--num-workers", "0", "--figures", "0", "--quiet", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli_main(args) == 0
    err = capsys.readouterr().err
    assert "left out of the pixel metrics" in err and record["img_path"] in err


def test_figures_share_one_stated_colour_range(workspace, tmp_path):
    from visualad_hf.visualization import colorize

    result = evaluate_model(workspace["model"], None, workspace["dataset"], batch_size=4, num_figure_samples=2,
                            progress=False, figure_value_range=(-1.0, 2.0))  # fmt: skip
    assert result.info["figure_value_range"] == [-1.0, 2.0]
    default = evaluate_model(workspace["model"], None, workspace["dataset"], batch_size=4, num_figure_samples=2,
                             progress=False)  # fmt: skip
    low, high = default.info["figure_value_range"]
    assert low < high and len(default.figures) == len(CATEGORIES)
    # the colour bar sits right of the tiles: the top of the scale (dark red) and the bottom (dark blue) appear there
    figure = np.asarray(default.figures["grain"])
    right = figure[:, -figure.shape[1] // 4 :].reshape(-1, 3)
    for end in (1.0, 0.0):
        colour = colorize(np.array([[end]], np.float32), (0.0, 1.0))[0, 0]
        assert (np.abs(right.astype(int) - colour).sum(axis=1) <= 12).any(), end


def test_before_category_hook_runs_once_per_category_and_changes_nothing(workspace):
    model, dataset = workspace["model"], workspace["dataset"]
    seen = []
    hooked = evaluate_model(model, None, dataset, batch_size=5, num_figure_samples=0, progress=False,
                            before_category=seen.append)  # fmt: skip  (batches of 5 span both categories)
    plain = evaluate_model(model, None, dataset, batch_size=5, num_figure_samples=0, progress=False)
    assert seen == list(CATEGORIES)
    assert hooked.per_category == plain.per_category
    assert [r["score"] for r in hooked.per_image] == pytest.approx([r["score"] for r in plain.per_image], abs=1e-6)


def test_cli_flags_old_spellings_and_model_mistakes(workspace, tmp_path, capsys):
    root = workspace["root"]
    common = ["--dataset", "mvtec", "--data-dir", str(root / "bench"), "--categories", "nut", "--num-workers", "0",
              "--figures", "0", "--quiet", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli_main(["evaluate", "--model", str(root / "model"), *common, "--out", str(tmp_path / "o"), "--cpu"]) == 0
    err = capsys.readouterr().err
    assert "--out is deprecated" in err and "--cpu is deprecated" in err
    assert (tmp_path / "o" / "metrics.json").is_file()

    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    for model, message in [(not_a_model, "is not a model folder"), (tmp_path / "missing" / "m", "no such model folder")]:
        assert cli_main(["evaluate", "--model", str(model), *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_python_m_entry_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "visualad_hf.evaluation", "--help"], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0 and "usage: python -m visualad_hf.evaluation" in done.stdout
