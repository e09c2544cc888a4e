"""Beyond zero-shot: the few-shot reference bank (model, files, pipeline, CLI, evaluation protocol) and normal-only
fine-tuning with synthetic defects."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_model, tiny_visualad_config
from PIL import Image
from safetensors import safe_open

from visualad_hf import VisualADImageProcessor, VisualADModel
from visualad_hf.cli import main as cli_main
from visualad_hf.errors import VisualADError
from visualad_hf.few_shot import REFERENCE_BANK_FILE, ReferenceBankError, ReferenceBankMismatchError


def tiny_model(seed: int = 0, **overrides) -> VisualADModel:
    torch.manual_seed(seed)
    return VisualADModel(tiny_visualad_config("clip", **overrides)).eval()


def pixels(count: int, seed: int, size: int = 70) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Brute force: 1 - max cosine of each query row to any bank row."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(bank, dim=-1).T
    return 1 - similarity.amax(dim=-1)


def patch_features(model: VisualADModel, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The features the bank stores, collected through the forward hook (one list entry per feature layer)."""
    model._reference_collector = collected = []
    try:
        with torch.no_grad():
            model(pixel_values)
    finally:
        model._reference_collector = None
    return collected[0]


# ------------------------------------------------------------------------------------------------ the bank itself


def test_fusion_adds_the_normalised_nearest_neighbour_distance_to_each_layer_map():
    model = tiny_model()
    reference, test = pixels(3, seed=1), pixels(2, seed=2)
    with torch.no_grad():
        zero_shot = model(test).layer_anomaly_maps
    model.set_reference(reference)
    bank = model.reference_bank
    assert bank.num_images == 3 and model.config.reference_num_images == 3
    assert bank.features_0.shape == (3 * 25, 64)  # 3 images x 5x5 patches, width 64

    features, reference_features = patch_features(model, test), patch_features(model, reference)
    with torch.no_grad():
        fused = model(test).layer_anomaly_maps
    for layer, (query, stored) in enumerate(zip(features, reference_features)):
        # scale: mean distance of each reference image's patches to the other reference images
        per_image = [nearest_distance(stored[i], torch.cat([stored[j] for j in range(3) if j != i])).mean()
                     for i in range(3)]  # fmt: skip
        scale = torch.stack(per_image).mean()
        assert bank.scales[layer] == pytest.approx(float(scale), rel=1e-5)
        expected = zero_shot[:, layer] + 2.0 * (nearest_distance(query, stored.flatten(0, 1)) / scale).reshape(2, 5, 5)
        torch.testing.assert_close(fused[:, layer], expected, rtol=1e-5, atol=1e-5)

    model.config.reference_fusion = "replace"
    with torch.no_grad():
        replaced = model(reference).layer_anomaly_maps
    assert replaced.abs().max() < 1e-5  # every reference patch is in the bank: distance 0

    model.clear_reference()
    with torch.no_grad():
        assert torch.equal(model(test).layer_anomaly_maps, zero_shot)
    assert model.config.reference_num_images is None


def test_single_image_bank_scales_by_the_distance_between_its_own_patches():
    model = tiny_model()
    model.set_reference(pixels(1, seed=3))
    stored = model.reference_bank.features_0
    similarity = stored @ stored.T
    similarity.fill_diagonal_(-2)
    assert model.reference_bank.scales[0] == pytest.approx(float((1 - similarity.amax(1)).mean()), rel=1e-5)


def test_set_reference_accepts_images_and_records_their_names(tmp_path):
    model = tiny_model()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)) for i in range(2)]
    model.set_reference(images, names=["a.png", "b.png"])
    processed = VisualADImageProcessor.from_model_config(model.config)(images=images)["pixel_values"]
    other = tiny_model()
    other.set_reference(processed)
    assert torch.equal(model.reference_bank.features_1, other.reference_bank.features_1)
    assert model.reference_bank.metadata["images"] == ["a.png", "b.png"]
    with pytest.raises(ReferenceBankMismatchError, match="84x84 px but the model takes 70x70"):
        model.set_reference(pixels(1, seed=0, size=84))


def test_bank_round_trips_exactly_through_save_pretrained(tmp_path):
    model = tiny_model()
    model.set_reference(pixels(4, seed=5))
    test = pixels(2, seed=6)
    with torch.no_grad():
        expected = model(test)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / REFERENCE_BANK_FILE).is_file()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["reference_num_images"] == 4
    with safe_open(str(tmp_path / "m" / REFERENCE_BANK_FILE), framework="pt") as handle:
        assert set(handle.keys()) == {"features_0", "features_1", "features_2", "features_3", "scales"}

    loaded = VisualADModel.from_pretrained(tmp_path / "m").eval()
    for name, tensor in model.reference_bank.tensors().items():
        assert torch.equal(loaded.reference_bank.tensors()[name], tensor), name
    assert loaded.reference_bank.metadata == model.reference_bank.metadata
    with torch.no_grad():
        actual = loaded(test)
    assert torch.equal(actual.anomaly_map, expected.anomaly_map)
    # The bank is module state: it follows .to(dtype) and is not in the weights file.
    assert not any(key.startswith("reference_bank") for key in loaded.state_dict())
    assert loaded.to(torch.float64).reference_bank.features_0.dtype == torch.float64

    # Saving the zero-shot model into the same folder removes the stale bank.
    loaded.float().clear_reference()
    loaded.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / REFERENCE_BANK_FILE).exists()
    assert not VisualADModel.from_pretrained(tmp_path / "m").reference_bank.is_set


def test_an_exported_graph_carries_the_bank():
    """The bank is module state (buffers), so `torch.export` (what ONNX export builds on) includes it."""

    class AnomalyMap(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).anomaly_map

    model = tiny_model()
    model.set_reference(pixels(2, seed=10))
    test = pixels(1, seed=11)
    exported = torch.export.export(AnomalyMap(model), (test,), strict=False)
    assert {f"model.reference_bank.features_{i}" for i in range(4)} <= set(exported.graph_signature.buffers)
    with torch.no_grad():
        fused, zero_shot = model(test).anomaly_map, tiny_model()(test).anomaly_map
    torch.testing.assert_close(exported.module()(test), fused, rtol=1e-5, atol=1e-5)
    assert (fused - zero_shot).abs().max() > 0.1


def test_push_to_hub_from_save_pretrained_writes_the_bank_first(tmp_path):
    model = tiny_model()
    model.set_reference(pixels(1, seed=12))
    with pytest.raises(OSError):  # offline (conftest): the upload fails, after the folder is complete
        model.save_pretrained(tmp_path / "m", push_to_hub=True, repo_id="someone/tiny-few-shot")
    assert VisualADModel.from_pretrained(tmp_path / "m").reference_bank.num_images == 1


def test_missing_bank_file_is_an_error_not_a_silent_zero_shot_model(tmp_path):
    model = tiny_model()
    model.set_reference(pixels(2, seed=7))
    model.save_pretrained(tmp_path)
    (tmp_path / REFERENCE_BANK_FILE).unlink()
    with pytest.raises(ReferenceBankError, match="reference_bank.safetensors is missing") as caught:
        VisualADModel.from_pretrained(tmp_path)
    assert isinstance(caught.value, VisualADError) and "\n" not in str(caught.value)


def test_bank_of_another_backbone_or_size_is_refused(tmp_path):
    model = tiny_model(seed=0)
    model.set_reference(pixels(2, seed=8))
    path = model.save_reference(tmp_path / "bank.safetensors")

    with pytest.raises(ReferenceBankMismatchError, match="other backbone weights"):
        tiny_model(seed=1).load_reference(path)  # same architecture, other weights
    dinov2 = VisualADModel(tiny_visualad_config("dinov2")).eval()
    with pytest.raises(ReferenceBankMismatchError, match="another backbone .clip_vision_model.* than this model's .dinov2"):
        dinov2.load_reference(path)
    with pytest.raises(ReferenceBankMismatchError, match="built from 70x70 px inputs, but the model takes 84x84"):
        tiny_model(seed=0, image_size=84).load_reference(path)
    with pytest.raises(ReferenceBankMismatchError, match="feature layers"):
        tiny_model(seed=0, feature_layers=[1, 2]).load_reference(path)
    with pytest.raises(ReferenceBankMismatchError, match="5x5 patch grid .70x70 px., but this input gives 6x6"):
        model(pixels(1, seed=0, size=84))

    tuned = tiny_model(seed=0)
    with torch.no_grad():
        tuned.final_layernorm.weight.mul_(1.01)  # as fine-tuning moves the trainable final LayerNorm
    with pytest.raises(ReferenceBankMismatchError, match="another final LayerNorm"):
        tuned.load_reference(path)
    # A bf16 copy of the same model accepts the bank (the signature tolerates the cast).
    same = tiny_model(seed=0).to(torch.bfloat16)
    same.load_reference(path)
    assert same.reference_bank.features_0.dtype == torch.bfloat16

    not_a_bank = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(not_a_bank))
    with pytest.raises(ReferenceBankError, match="not a VisualAD reference bank"):
        model.load_reference(not_a_bank)
    with pytest.raises(ReferenceBankError, match="no such reference bank file"):
        model.load_reference(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------ pipeline, CLI and evaluation protocol


def write_images(folder, count: int, seed: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        array = np.random.default_rng([seed, i]).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def test_reference_command_writes_a_folder_that_pipeline_and_detect_use(tmp_path, capsys):
    from transformers import pipeline

    source = save_tiny_model(tmp_path / "zero")
    good = write_images(tmp_path / "good", 3, seed=1)
    out = tmp_path / "few"
    assert cli_main(["reference", "--model", str(source), "--normal", str(tmp_path / "good"), "--output", str(out),
                     "--device", "cpu", "--weight", "0.5"]) == 0  # fmt: skip
    assert "reference bank of 3 image(s)" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "preprocessor_config.json", REFERENCE_BANK_FILE} <= {
        p.name for p in out.iterdir()
    }
    model = VisualADModel.from_pretrained(out)
    assert model.reference_bank.num_images == 3 and model.config.reference_weight == 0.5
    assert model.reference_bank.metadata["images"] == [str(p) for p in good]

    test = write_images(tmp_path / "test", 2, seed=2)
    few, zero = pipeline("anomaly-detection", model=str(out)), pipeline("anomaly-detection", model=str(source))
    few_scores = [r["score"] for r in few([str(p) for p in test])]
    zero_scores = [r["score"] for r in zero([str(p) for p in test])]
    assert all(math.isfinite(s) for s in few_scores) and few_scores != zero_scores
    processor = VisualADImageProcessor.from_pretrained(out)
    with torch.no_grad():
        outputs = model(**processor(images=[Image.open(p) for p in test]))
    direct = [p["score"] for p in processor.post_process_anomaly_detection(outputs)]
    assert few_scores == pytest.approx(direct, rel=1e-5)

    assert cli_main(["detect", "--model", str(out), "--device", "cpu", "--quiet", "--out", str(tmp_path / "d"),
                     str(test[0])]) == 0  # fmt: skip
    rows = (tmp_path / "d" / "results.csv").read_text().splitlines()
    assert float(rows[1].split(",")[2]) == pytest.approx(few_scores[0], rel=1e-5)


def test_reference_command_reports_bad_input_in_one_line(tmp_path, capsys):
    source = save_tiny_model(tmp_path / "zero")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert cli_main(["reference", "--model", str(source), "--normal", str(tmp_path / "empty"),
                     "--output", str(tmp_path / "x")]) == 2  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert error.startswith("visualad reference: error:") and "no images in" in error and "\n" not in error
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def synthetic_benchmark(tmp_path_factory):
    from visualad_hf.data import generate_synthetic_benchmark

    return generate_synthetic_benchmark(
        tmp_path_factory.mktemp("synthetic"), image_size=70, auxiliary_categories=["stripes"],
        target_categories=["grain", "disc"], num_train=5, num_test_normal=2, num_test_anomalous=3,
    )  # fmt: skip


def test_few_shot_protocol_draws_per_category_and_seed_and_restores_the_bank(synthetic_benchmark):
    from visualad_hf.evaluation import evaluate_model
    from visualad_hf.few_shot_evaluation import draw_references, evaluate_few_shot, evaluate_few_shot_seeds

    test, train = synthetic_benchmark.load("target"), synthetic_benchmark.load("target", split="train")
    draws = {seed: draw_references(train, "disc", 2, seed) for seed in range(6)}
    assert draws[0] == draw_references(train.shuffle(seed=3).sort("image_path"), "disc", 2, 0)
    assert len({tuple(d) for d in draws.values()}) > 1  # the seed matters
    assert all(train[i]["category"] == "disc" and train[i]["label"] == 0 for d in draws.values() for i in d)
    with pytest.raises(ReferenceBankError, match="5 normal train images, fewer than --few-shot 6"):
        draw_references(train, "disc", 6, 0)

    model = tiny_model()
    model.set_reference(pixels(1, seed=9))
    own = model.reference_bank.features_0.clone()
    quiet = {"num_figure_samples": 0, "progress": False}
    result = evaluate_few_shot(model, None, test, train, num_shots=2, seed=4, **quiet)
    assert torch.equal(model.reference_bank.features_0, own) and model.reference_bank.num_images == 1
    info = result.info["few_shot"]
    assert info["num_shots"] == 2 and info["seed"] == 4
    assert info["references"]["disc"] == [train[i]["image_path"] for i in draw_references(train, "disc", 2, 4)]
    assert set(result.per_category) == {"grain", "disc"} and result.info["num_images"] == len(test)

    # One category by hand: its bank, then the plain evaluation of its images.
    model.set_reference([train[i]["image"].convert("RGB") for i in draw_references(train, "grain", 2, 4)])
    grain = test.select([i for i, c in enumerate(test["category"]) if c == "grain"])
    by_hand = evaluate_model(model, None, grain, **quiet)
    assert result.per_category["grain"] == by_hand.per_category["grain"]

    summary = evaluate_few_shot_seeds(model, None, test, train, num_shots=2, seeds=[0, 1], **quiet)
    values = [r.mean["image_auroc"] for r in summary.results]
    assert summary.mean["Mean"]["image_auroc"] == pytest.approx(np.mean(values))
    assert summary.std["Mean"]["image_auroc"] == pytest.approx(np.std(values))
    assert "2-shot, seeds 0, 1" in summary.format_table() and "±" in summary.format_table()


# ------------------------------------------------------------------------------------ normal-only fine-tuning


def test_synthetic_defects_have_exact_masks_and_are_reproducible():
    from visualad_hf.data.anomaly_synthesis import AnomalySynthesizer, perlin_noise

    rng = np.random.default_rng(0)
    image = (np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3)).astype(np.uint8)
    other = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    seen = set()
    for method in ("perlin", "cutpaste"):
        for textures in (("images",), ("procedural",)):
            synth = AnomalySynthesizer(methods=(method,), textures=textures)
            for seed in range(8):
                result, mask, used = synth(image, np.random.default_rng(seed), [other])
                assert used == method and result.dtype == np.uint8 and result.shape == image.shape
                assert np.array_equal(mask, np.any(result != image, axis=-1))  # exact: changed pixels only
                assert mask.sum() >= synth.min_area * 64 * 64
                again, again_mask, _ = synth(image, np.random.default_rng(seed), [other])
                assert np.array_equal(again, result) and np.array_equal(again_mask, mask)
                seen.add(mask.tobytes())
    assert len(seen) == 16  # 2 methods x 8 seeds (the texture source changes the fill, not the mask)
    noise = perlin_noise((64, 64), (4, 4), np.random.default_rng(1))
    assert np.abs(noise).max() <= math.sqrt(0.5) + 1e-9  # gradient noise bound in 2-D
    assert np.abs(np.diff(noise, axis=0)).max() < 0.2 * np.ptp(noise)  # smooth: no jumps between pixels
    with pytest.raises(ValueError, match="subset of"):
        AnomalySynthesizer(methods=("scribble",))


def test_synthesizing_collator_makes_normal_rows_anomalous_per_epoch(synthetic_benchmark):
    from visualad_hf.data.anomaly_synthesis import AnomalySynthesizer, SynthesizingCollator
    from visualad_hf.data.collator import VisualADCollator

    train = synthetic_benchmark.load("target", split="train")
    processor = VisualADImageProcessor.from_model_config(tiny_visualad_config())
    collate = SynthesizingCollator(VisualADCollator(processor), AnomalySynthesizer(probability=1.0), seed=3)
    rows = [train[i] for i in range(4)]
    batch = collate(rows)
    assert batch["labels"].tolist() == [1, 1, 1, 1] and batch["masks"].shape == (4, 70, 70)
    assert all(t.startswith("synthetic_") for t in batch["defect_type"])
    # The masks are the changed pixels at model size: the processor's own resize of image and mask is the identity.
    clean = processor(images=[r["image"] for r in rows])["pixel_values"]
    changed = (batch["pixel_values"] != clean).any(dim=1)
    assert torch.equal(changed, batch["masks"].bool())
    assert torch.equal(collate(rows)["pixel_values"], batch["pixel_values"])  # reproducible
    collate.set_epoch(1)
    assert not torch.equal(collate(rows)["pixel_values"], batch["pixel_values"])  # new defects next epoch
    never = SynthesizingCollator(VisualADCollator(processor), AnomalySynthesizer(probability=0.0), seed=3)
    assert never(rows)["labels"].tolist() == [0, 0, 0, 0] and never(rows)["masks"].sum() == 0


def test_training_on_a_normal_only_folder_with_synthetic_defects(tmp_path):
    from visualad_hf.trainer import parse_args, train

    write_images(tmp_path / "data" / "good", 4, seed=5)
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "patch_size": 8, "image_size": 32}  # fmt: skip
    argv = ["--vision_config", json.dumps(vision), "--feature_layers", "1", "2", "--image_size", "32",
            "--config_overrides", json.dumps({"gaussian_sigma": 1.0, "max_patches": 64}),
            "--train_dataset", "folder", "--train_data_dir", str(tmp_path / "data"),
            "--train_dataset_options", json.dumps({"normal_dir": "good"}),
            "--synthesize_anomalies", "true", "--synthesis_probability", "1.0", "--synthesis_methods", "cutpaste",
            "--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "2", "--max_steps", "2",
            "--report_to", "none", "--disable_tqdm", "true", "--save_steps", "0", "--logging_steps", "1"]  # fmt: skip
    model_args, data_args, args = parse_args(argv)
    assert data_args.synthesize_anomalies and data_args.train_dataset_options == {"normal_dir": "good"}
    result = train(model_args, data_args, args)
    assert result.global_step == 2 and result.skipped_steps == 0
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "train/loss" in entry]
    # Every image became anomalous with a mask: classification and segmentation losses at every step.
    assert len(steps) == 2 and all(math.isfinite(e["train/loss_seg"]) and e["train/loss_cls"] > 0 for e in steps)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_evaluate_command_few_shot_reports_each_seed_and_mean_std(synthetic_benchmark, model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    status = cli_main(["evaluate", "--model", str(model_dir), "--dataset", "mvtec",
                       "--data-dir", str(synthetic_benchmark.root), "--categories", "grain", "disc",
                       "--few-shot", "2", "--seed", "3", "5", "--figures", "0", "--num-workers", "0", "--quiet",
                       "--cpu", "--out", str(out)])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "2-shot, seed 3" in printed and "2-shot, seed 5" in printed and "2-shot, seeds 3, 5 (mean ± std" in printed
    summary = json.loads((out / "few_shot.json").read_text())
    assert summary["num_shots"] == 2 and summary["seeds"] == [3, 5]
    per_seed = [json.loads((out / f"seed_{s}" / "metrics.json").read_text()) for s in (3, 5)]
    assert [p["few_shot"]["seed"] for p in per_seed] == [3, 5]
    values = [p["mean"]["pixel_auroc"] for p in per_seed]
    assert summary["mean"]["Mean"]["pixel_auroc"] == pytest.approx(np.mean(values))
    assert summary["std"]["Mean"]["pixel_auroc"] == pytest.approx(np.std(values))
