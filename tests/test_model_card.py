"""Model cards: Hub metadata, model-index round trip, the paper's results labelled as the paper's."""

from __future__ import annotations

import pytest
from conftest import tiny_visualad_config
from huggingface_hub import ModelCard

from visualad_hf import VisualADConfig
from visualad_hf.metrics import AnomalyMetricsResult, mean_over_categories
from visualad_hf.model_card import TEMPLATE_PATH, create_model_card, normalize_eval_results

RESULTS = {
    "MVTec-AD": {
        "image_auroc": 0.9234,
        "image_f1_max": 0.91,
        "image_ap": 0.95,
        "pixel_auroc": 0.901,
        "pixel_aupro": 0.8649,
    },
    "VisA": {"image_auroc": 0.8, "pixel_f1_max": None},
}


def _roundtrip(card: ModelCard, tmp_path) -> ModelCard:
    card.save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def test_template_ships_inside_the_package():
    assert TEMPLATE_PATH.is_file() and TEMPLATE_PATH.parent.name == "resources"


def test_trained_card_metadata_and_model_index_roundtrip(tmp_path):
    config = VisualADConfig(feature_layers=[6, 12, 18, 24])  # CLIP ViT-L/14@336 defaults
    card = create_model_card(
        config,
        base_model="openai/clip-vit-large-patch14-336",
        training_data="visa",
        eval_results=RESULTS,
        recipe={"epochs": 1, "learning_rate_tokens": 1e-3, "seed": 111},
        repo_id="me/visualad-clip",
    )
    loaded = _roundtrip(card, tmp_path)
    data = loaded.data
    # The Hub's own snippet: "other" is no transformers pipeline task, so it shows AutoImageProcessor + AutoModel,
    # and custom_code makes it add trust_remote_code=True (the folder carries its code).
    assert data.library_name == "transformers" and data.pipeline_tag == "other"
    assert {"anomaly-detection", "zero-shot-anomaly-detection", "visualad", "clip", "custom_code"} <= set(data.tags)
    assert data.base_model == "openai/clip-vit-large-patch14-336" and data.license == "mit"
    assert data.metrics == ["image_auroc", "image_f1_max", "image_ap", "pixel_auroc", "pixel_aupro"]
    values = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert values == {
        ("MVTec-AD", "image_auroc"): 92.3,
        ("MVTec-AD", "image_f1_max"): 91.0,
        ("MVTec-AD", "image_ap"): 95.0,
        ("MVTec-AD", "pixel_auroc"): 90.1,
        ("MVTec-AD", "pixel_aupro"): 86.5,
        ("VisA", "image_auroc"): 80.0,
    }
    assert all(r.dataset_split == "test" and r.task_type == "image-segmentation" for r in data.eval_results)

    text = loaded.text
    assert "| MVTec-AD | 92.3 | 91.0 | 95.0 | 90.1 | 86.5 |" in text  # ours, x100
    assert "| VisA | 80.0 | – | – | – | – |" in text
    assert "| learning_rate_tokens | 0.001 |" in text and "| seed | 111 |" in text
    assert "labelled test split of VisA" in text
    assert 'pipeline("anomaly-detection", model="me/visualad-clip")' in text
    assert 'pipeline(model="me/visualad-clip", trust_remote_code=True)' in text
    assert 'AutoModel.from_pretrained("me/visualad-clip", trust_remote_code=True)' in text
    assert 'pip install "transformers>=5.23,<6" torch pillow' in text
    assert "This model was trained with visualad-hf." in text
    assert "authors' released weights" not in text


def test_paper_results_are_labelled_as_the_papers(tmp_path):
    text = create_model_card(VisualADConfig()).text
    section = text.split("### Results reported in the paper", 1)[1]
    assert "**not** measured by visualad-hf" in section
    assert "| MVTec-AD | 92.2 | 93.2 | 96.7 | 90.8 | 43.9 | 41.2 | 87.5 |" in section
    assert "No results measured on this model are recorded in this card." in text
    assert create_model_card(VisualADConfig()).data.eval_results is None  # the paper's numbers never enter model-index


def test_dinov2_card_uses_its_licence_and_paper_column():
    vision = {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}
    config = VisualADConfig(vision_config={**vision, "patch_size": 14})
    card = create_model_card(config, base_model="facebook/dinov2-large")
    assert card.data.license == "apache-2.0" and "dinov2" in card.data.tags
    assert "frozen DINOv2 ViT-L/14" in card.text
    assert "| MVTec-AD | 90.1 | 92.4 | 94.8 | 91.3 | 47.4 | 45.4 | 88.6 |" in card.text


def test_converted_card_states_provenance_and_parity_scope():
    conversion = {
        "backbone_source": "ViT-L-14-336px.pt",
        "backbone_layout": "OpenAI CLIP TorchScript archive",
        "backbone_sha256": "3035c92b",
        "backbone_is_official_openai_vit_l14_336": True,
        "checkpoint_source": "CLIP.pth",
        "checkpoint_sha256": "abcd",
        "checkpoint_backbone": "ViT-L/14@336px",
        "checkpoint_epoch": 1,
    }
    card = create_model_card(VisualADConfig(), source="converted", conversion=conversion, training_data="mvtec")
    text = card.text
    assert "**These are the authors' released weights**" in text
    assert "the official OpenAI release" in text and "`3035c92b`" in text and "epoch 1" in text
    assert "That check used random weights, not these real ones" in text
    assert "the paper's rows are VisA." in text  # the MVTec-trained checkpoint is evaluated on VisA
    assert "The authors' recipe" in text
    card = create_model_card(VisualADConfig(), source="converted", conversion=conversion, training_data="visa")
    assert "the paper's rows are MVTec-AD, BTAD, KSDD2, DAGM, DTD-Synthetic." in card.text


def test_small_backbones_are_not_called_vit_l():
    card = create_model_card(tiny_visualad_config("clip"))
    assert "CLIP ViT (width 64, 4 layers, patch 14)" in card.text
    assert "frozen CLIP ViT-L/14@336px" not in card.text


def test_eval_results_forms_agree():
    as_tuples = [("MVTec-AD", "image_auroc", 0.9), ("MVTec-AD", "pixel_aupro", 0.8)]
    as_dict = {"MVTec-AD": {"pixel_aupro": 0.8, "image_auroc": 0.9}}
    per_category = {
        "bottle": {"image_auroc": 0.95, "pixel_aupro": 0.85},
        "cable": {"image_auroc": 0.85, "pixel_aupro": 0.75},
    }
    as_result = {"MVTec-AD": AnomalyMetricsResult(per_category=per_category, mean=mean_over_categories(per_category))}
    expected = {"MVTec-AD": {"image_auroc": 0.9, "pixel_aupro": 0.8}}
    assert normalize_eval_results(as_tuples) == expected
    assert normalize_eval_results(as_dict) == expected
    normalized = normalize_eval_results(as_result)
    assert normalized.keys() == expected.keys()
    assert normalized["MVTec-AD"] == pytest.approx(expected["MVTec-AD"])
    text = create_model_card(VisualADConfig(), eval_results=as_result).text
    assert "<details><summary>MVTec-AD: per category</summary>" in text and "| bottle |" in text


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"MVTec-AD": {"image_auroc": 92.2}}, "give fractions in"),
        ({"MVTec-AD": {"auroc": 0.9}}, "Unknown metric 'auroc'"),
        ([("MVTec-AD", 0.9)], "must be \\(dataset, metric, value\\)"),
    ],
)
def test_bad_eval_results_are_explained(bad, message):
    with pytest.raises(ValueError, match=message):
        create_model_card(VisualADConfig(), eval_results=bad)


def test_threshold_in_config_appears_in_card():
    config = VisualADConfig(anomaly_threshold=1.25)
    assert "| Decision threshold | 1.25 (in `config.json`) |" in create_model_card(config).text


def test_card_title_and_backbone_row_render():
    card = create_model_card(tiny_visualad_config(), model_name="my-visualad")
    lines = str(card).splitlines()
    assert "# my-visualad" in lines
    backbone_row = next(line for line in lines if line.startswith("| Backbone (frozen)"))
    assert backbone_row.count("width") == 1


def test_a_synthetic_trained_small_model_card_claims_neither_industrial_training_nor_the_papers_table():
    card = create_model_card(tiny_visualad_config(), training_data="synthetic benchmark (auxiliary families)").text
    assert "trained on industrial images" not in card
    assert "The heads were trained on synthetic images (generated textures and shapes" in card
    section = card.split("### Results reported in the paper", 1)[1].split("## ", 1)[0]
    assert "| MVTec-AD |" not in section and "92.2" not in section
    assert "This model's backbone\n(CLIP ViT (width 64, 4 layers, patch 14)) is a different one" in section
    industrial = create_model_card(VisualADConfig(), training_data="visa").text
    assert "The heads were trained on industrial images" in industrial and "| MVTec-AD | 92.2 |" in industrial
    assert "The heads were trained on the training data above" in create_model_card(VisualADConfig()).text


def test_the_threshold_row_names_how_it_was_calibrated_and_can_be_updated():
    from visualad_hf.model_card import update_card_threshold

    calibration = {"method": "f1_max", "num_images": 40, "f1": 0.875}
    config = VisualADConfig(anomaly_threshold=0.5, threshold_calibration=calibration)
    row = "| Decision threshold | 0.5 (in `config.json`); the F1-max point on 40 labelled images (F1 0.875) |"
    assert row in create_model_card(config).text
    uncalibrated = create_model_card(VisualADConfig()).text
    updated = update_card_threshold(uncalibrated, 0.5, calibration)
    assert row in updated and "none set" not in updated
    assert len(updated.splitlines()) == len(uncalibrated.splitlines())
