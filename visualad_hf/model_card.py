"""Model cards for VisualAD folders: Hub metadata (with a `model-index` from evaluation results) and a readable body.

`create_model_card` fills `resources/model_card_template.md`. It serves both kinds of folders: the authors' released
weights after `visualad convert` (`source="converted"`) and models trained with this package (`source="trained"`).
The paper's reported numbers appear in their own, labelled table and never in the `model-index`, which holds only
results measured on this model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.image_utils import PILImageResampling

from .backbones import BackboneCard, family_cards
from .configuration_visualad import VisualADConfig
from .data.registry import display_name
from .metrics import METRIC_HEADERS, METRIC_NAMES, AnomalyMetricsResult

TEMPLATE_PATH = Path(__file__).resolve().parent / "resources" / "model_card_template.md"

PAPER_TITLE = "VisualAD: Language-Free Zero-Shot Anomaly Detection via Vision Transformer"
PAPER_URL = "https://arxiv.org/abs/2603.07952"
AUTHORS_CODE_URL = "https://github.com/7HHHHH/VisualAD"
TASK_TYPE = "image-segmentation"
TASK_NAME = "Zero-shot anomaly detection"
# `custom_code` makes the Hub add `trust_remote_code=True` to its snippet (the folder carries its code,
# `visualad_hf.remote_code`). The pipeline tag is "other" on purpose: for a transformers pipeline task the Hub shows
# `pipeline("<task>", model=...)`, and no built-in task ("image-segmentation" included) runs VisualAD; under "other" it
# shows the AutoImageProcessor + AutoModel snippet, which works. The task itself ("anomaly-detection") is this
# package's own, named in config.json's custom_pipelines.
PIPELINE_TAG = "other"
TAGS = ("anomaly-detection", "zero-shot-anomaly-detection", "image-segmentation", "visualad", "vision", "custom_code")

_METRIC_NAMES_LONG = {
    "image_auroc": "Image AUROC",
    "image_f1_max": "Image F1-max",
    "image_ap": "Image AP",
    "pixel_auroc": "Pixel AUROC",
    "pixel_f1_max": "Pixel F1-max",
    "pixel_ap": "Pixel AP",
    "pixel_aupro": "Pixel AUPRO",
}


#: What a card says about a backbone family (name, Hub weights, licence, the paper's results with it): each adapter's
#: `card` in `visualad_hf.backbones`.
BackboneFacts = BackboneCard

BACKBONES: dict[str, BackboneFacts] = family_cards()

# Zero-shot protocol (SPEC §6): a model trained on VisA is evaluated on every other dataset, one trained on
# MVTec-AD on VisA. Keys are what `visualad convert --training-data` accepts.
TRAINING_SETS: dict[str, tuple[str, str]] = {
    key: (display_name(key), f"the labelled test split of {display_name(key)} (zero-shot protocol: {why})")
    for key, why in (
        ("visa", "the evaluation datasets are never seen"),
        ("mvtec", "used when VisA is the target"),
    )
}

AnomalyResults = Mapping[str, Any] | AnomalyMetricsResult
EvalResults = Mapping[str, AnomalyResults] | Iterable[tuple[str, str, float]]


def backbone_facts(config: VisualADConfig) -> BackboneFacts:
    return config.backbone_adapter.card


def backbone_label(config: VisualADConfig) -> str:
    """The reference model's name when the config has its shape, else the family with the actual size."""
    adapter = config.backbone_adapter
    facts = adapter.card
    shape = (adapter.hidden_size, adapter.num_layers, adapter.patch_size)
    native_size = getattr(config.vision_config, "image_size", None)
    if shape == facts.reference_shape and facts.reference_image_size in (None, native_size):
        return facts.name
    return f"{facts.family} (width {shape[0]}, {shape[1]} layers, patch {shape[2]})"


def _license_metadata(facts: BackboneFacts) -> dict[str, str]:
    """The Hub's licence fields: a listed licence id, or `other` with its name and link."""
    extra = {"license_name": facts.license_name, "license_link": facts.license_link}
    return {"license": facts.license, **{key: value for key, value in extra.items() if value}}


def normalize_eval_results(eval_results: EvalResults | None) -> dict[str, dict[str, float]]:
    """Evaluation results as `{dataset: {metric: fraction}}` in the paper's metric order.

    Accepts `{dataset: {metric: value}}`, `{dataset: AnomalyMetricsResult}` (its mean over categories is used) or an
    iterable of `(dataset, metric, value)`. Metrics are the names of `visualad_hf.metrics.METRIC_NAMES`
    (`image_auroc`, …, `pixel_aupro`); values are fractions in [0, 1] as the metrics return them (`None` = undefined,
    skipped).
    """
    if eval_results is None:
        return {}
    if isinstance(eval_results, Mapping):
        items = [
            (dataset, metric, value)
            for dataset, metrics in eval_results.items()
            for metric, value in (metrics.mean if isinstance(metrics, AnomalyMetricsResult) else metrics).items()
        ]
    else:
        items = list(eval_results)
    table: dict[str, dict[str, float]] = {}
    for item in items:
        if len(item) != 3:
            raise ValueError(f"An evaluation result must be (dataset, metric, value), got {item!r}.")
        dataset, metric, value = item
        if metric not in METRIC_NAMES:
            raise ValueError(f"Unknown metric {metric!r} for {dataset!r}; use one of {', '.join(METRIC_NAMES)}.")
        if value is None:
            continue
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{dataset} {metric} = {value}: give fractions in [0, 1] as the metrics return them "
                "(the card shows them x100)."
            )
        table.setdefault(str(dataset), {})[metric] = value
    return {dataset: {m: metrics[m] for m in METRIC_NAMES if m in metrics} for dataset, metrics in table.items()}


def _dataset_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _percent(value: float) -> float:
    return round(100.0 * value, 1)


def _model_index(results: dict[str, dict[str, float]], split: str | None) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=TASK_NAME,
            dataset_type=_dataset_slug(dataset),
            dataset_name=dataset,
            dataset_split=split,
            metric_type=metric,
            metric_name=f"{_METRIC_NAMES_LONG[metric]} (%)",
            metric_value=_percent(value),
        )
        for dataset, metrics in results.items()
        for metric, value in metrics.items()
    ]


def _table(rows: Mapping[str, Mapping[str, float]], scale: float) -> dict[str, Any]:
    """Header and formatted cells of a dataset x metric table (missing cells as an en dash)."""
    metrics = [m for m in METRIC_NAMES if any(m in row for row in rows.values())]
    body = [
        [dataset, *(f"{scale * row[m]:.1f}" if m in row else "–" for m in metrics)] for dataset, row in rows.items()
    ]
    return {"header": ["Dataset", *(METRIC_HEADERS[m] for m in metrics)], "rows": body}


def _describe_training_data(training_data: str | None) -> tuple[str | None, str | None]:
    """(short name, sentence) for a known key (`visa`, `mvtec`), or the free text as given."""
    if training_data is None:
        return None, None
    key = training_data.strip().lower().replace("-", "").replace("_", "")
    key = {"mvtecad": "mvtec"}.get(key, key)
    if key in TRAINING_SETS:
        return TRAINING_SETS[key]
    return training_data, training_data


THRESHOLD_ROW = "| Decision threshold |"
_INDUSTRIAL_SETS = ("visa", "mvtec", "btad", "mpdd", "ksdd", "dagm", "realiad")  # matched in lower-case alphanumerics


def training_domain(training_name: str | None) -> str:
    """What the heads saw, for the limitations section: industrial images only for the industrial benchmarks."""
    name = (training_name or "").lower()
    if "synthetic" in name:
        return "synthetic images (generated textures and shapes with drawn defects), not photographs"
    if any(key in re.sub(r"[^a-z0-9]", "", name) for key in _INDUSTRIAL_SETS):
        return "industrial images"
    return training_name or "the training data above"


def threshold_text(threshold: float | None, calibration: Mapping[str, Any] | None = None) -> str:
    """The card's decision-threshold cell: the value and how it was calibrated, or how to get one."""
    if threshold is None:
        return "none set: calibrate one on your data (`visualad calibrate`)"
    text = f"{float(threshold):.6g} (in `config.json`)"
    calibration = dict(calibration or {})
    method, count = calibration.get("method"), calibration.get("num_images")
    if method == "normal_percentile":
        text += f"; the {calibration.get('percentile', 99):g}th percentile of the scores of {count} normal images"
    elif method == "f1_max":
        text += f"; the F1-max point on {count} labelled images"
        if calibration.get("f1") is not None:
            text += f" (F1 {float(calibration['f1']):.3f})"
    elif method:
        text += f"; calibrated by {method}"
    return text


def update_card_threshold(card_text: str, threshold: float | None, calibration: Mapping[str, Any] | None = None) -> str:
    """An existing card (README.md text) with its decision-threshold row set to `threshold`; a card without the
    row (not made from this package's template) gets a short section at the end instead."""
    row = f"{THRESHOLD_ROW} {threshold_text(threshold, calibration)} |"
    lines = card_text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(THRESHOLD_ROW):
            lines[index] = row
            return "\n".join(lines) + "\n"
    section = "\n## Decision threshold\n\n| | |\n|:--|:--|\n" + row + "\n"
    marker = "\n## Decision threshold\n"
    if marker in card_text:
        card_text = card_text[: card_text.index(marker)]
    return card_text.rstrip("\n") + "\n" + section


def create_model_card(
    config: VisualADConfig,
    *,
    base_model: str | None = None,
    training_data: str | None = None,
    eval_results: EvalResults | None = None,
    eval_split: str | None = "test",
    recipe: Mapping[str, Any] | None = None,
    source: Literal["trained", "converted"] = "trained",
    conversion: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    datasets: list[str] | None = None,
) -> ModelCard:
    """A model card for a VisualAD folder; save it with `card.save(folder / "README.md")`.

    Args:
        config: the model's `VisualADConfig` (backbone, feature layers, input size, threshold).
        base_model: Hub id of the backbone weights (e.g. `openai/clip-vit-large-patch14-336`), for the metadata.
        training_data: `"visa"`, `"mvtec"` (the zero-shot protocol's auxiliary sets) or free text.
        eval_results: results measured on this model: `{dataset: {metric: fraction}}`,
            `{dataset: AnomalyMetricsResult}` or `[(dataset, metric, fraction), ...]` (see `normalize_eval_results`).
            They fill the `model-index` (percent, one decimal) and the evaluation table.
        eval_split: dataset split of those results, for the metadata.
        recipe: training settings to list (e.g. `{"epochs": 1, "learning_rate_tokens": 1e-3, "seed": 111}`).
        source: `"converted"` for the authors' released weights, `"trained"` for a model trained with this package.
        conversion: for converted weights, where they came from (`ConvertedCheckpoint.provenance()`).
        model_name: card title; a default names the backbone and the training data.
        repo_id: Hub id the folder will live at, used in the usage snippet (a local path placeholder otherwise).
        datasets: Hub dataset ids for the metadata, when the training data lives on the Hub.
    """
    if source not in ("trained", "converted"):
        raise ValueError(f"source={source!r} must be 'trained' or 'converted'.")
    facts = backbone_facts(config)
    results = normalize_eval_results(eval_results)
    per_category = {
        dataset: value.to_markdown()
        for dataset, value in (eval_results.items() if isinstance(eval_results, Mapping) else [])
        if isinstance(value, AnomalyMetricsResult)
    }
    training_name, training_sentence = _describe_training_data(training_data)
    label = backbone_label(config)
    if model_name is None:
        trained_on = f", trained on {training_name}" if training_name else ""
        origin = "the authors' released weights" if source == "converted" else "visualad-hf"
        model_name = f"VisualAD ({label}{trained_on}; {origin})"

    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        **_license_metadata(facts),
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=[*TAGS, facts.tag],
        datasets=datasets,
        metrics=[m for m in METRIC_NAMES if any(m in row for row in results.values())] or None,
        eval_results=_model_index(results, eval_split) or None,
    )

    paper_rows = facts.paper_results
    applies_to: list[str] = []
    if source == "converted" and training_name in ("VisA", "MVTec-AD"):
        # The paper evaluates the VisA-trained weights on every other dataset, the MVTec-trained ones on VisA.
        applies_to = [d for d in paper_rows if (d == "VisA") == (training_name == "MVTec-AD")]
    vision = config.vision_config
    # The paper's table is for ViT-L/14 backbones: a card for another backbone does not print it as if it applied.
    paper_table = _table(paper_rows, 1.0) if paper_rows and label == facts.name else None
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,  # ModelCardData keeps its own copy for model-index only
        source=source,
        backbone=facts,
        backbone_label=label,
        repo_id=repo_id or "path/to/this/folder",
        training_name=training_name,
        training_sentence=training_sentence,
        recipe=dict(recipe or {}),
        results_table=_table(results, 100.0) if results else None,
        per_category=per_category,
        eval_split=eval_split,
        paper_table=paper_table,
        paper_applies_to=applies_to,
        conversion=dict(conversion or {}),
        architecture={
            "backbone": label,
            "width": vision.hidden_size,
            "layers": vision.num_hidden_layers,
            "feature_layers": ", ".join(map(str, config.feature_layers)),
            "image_size": config.image_size,
            "grid": config.grid_size,
            "num_anchors": config.num_anchors,
            "saf_type": config.saf_type,
            "topk_ratio": config.topk_ratio,
            "gaussian_sigma": config.gaussian_sigma,
            "resample": PILImageResampling(config.backbone_adapter.resample).name.lower(),
        },
        anomaly_threshold=config.anomaly_threshold,
        threshold_text=threshold_text(config.anomaly_threshold, config.threshold_calibration),
        training_domain=training_domain(training_name),
        paper_title=PAPER_TITLE,
        paper_url=PAPER_URL,
        authors_code_url=AUTHORS_CODE_URL,
    )


__all__ = [
    "BACKBONES",
    "TRAINING_SETS",
    "BackboneFacts",
    "backbone_label",
    "create_model_card",
    "normalize_eval_results",
    "threshold_text",
    "training_domain",
    "update_card_threshold",
]
