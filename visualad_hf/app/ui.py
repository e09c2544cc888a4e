"""The Gradio app: upload images, see image | heatmap | overlay on one fixed colour scale, scores and decisions.

Layout: the model's facts on top; a "Batch" tab (drop one or many images or load generated examples, a threshold
slider that re-decides without re-running the model, a results table with CSV download, each map as PNG and `.npy`)
and a "Single image" tab whose event is the public API endpoint `detect` (image in; overlay and score out), so
`gradio_client.Client(url).predict(handle_file("part.png"), api_name="/detect")` works.

Every image is scored by the `"anomaly-detection"` pipeline, so the app's scores are the pipeline's scores. A bad
upload (not an image, truncated, too large) becomes a row with its error, or a message in the page; never a stack
trace, and the app keeps serving.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import VisualADError
from ..image_io import ImageLoadError, to_pil_image
from ..visualization import describe_result, heatmap_image, overlay_heatmap, render_panel

TABLE_HEADERS = ["file", "score", "threshold", "decision", "error"]
EXAMPLE_CATEGORIES = (("checker", "scratch"), ("cloud", "stain"), ("ring", "hole"), ("capsule", "good"))


@dataclass(frozen=True)
class ModelFacts:
    """What the page says about the model: enough to know what one is looking at."""

    source: str
    backbone: str
    input_size: int
    feature_layers: tuple[int, ...]
    threshold: float | None
    calibration: str
    card: str | None
    colour_range: tuple[float, float]
    colour_source: str

    def markdown(self) -> str:
        threshold = "not set in the model: decisions use the slider's value (calibrate one with `visualad calibrate`)"
        if self.threshold is not None:
            threshold = f"{self.threshold:.4f} ({self.calibration})"
        card = f"[model card]({self.card})" if self.card else "no model card in the folder"
        return (
            f"**Model** `{self.source}` · backbone {self.backbone} · input {self.input_size}×{self.input_size} px · "
            f"feature layers {list(self.feature_layers)} · {card}\n\n"
            f"**Threshold** {threshold}\n\n"
            f"**Colour scale** fixed for every image: {self.colour_range[0]:.2f} (blue) .. {self.colour_range[1]:.2f} "
            f"(red), {self.colour_source}."
        )


def load_detector(model: str, device: str = "auto"):
    """The anomaly-detection pipeline for a model folder or Hub id (`visualad_hf.inference.build_detector`, the one
    loader of the commands: every mistake is a one-line `VisualADError` saying what to do)."""
    from ..inference import build_detector

    return build_detector(model, device=device)


def _describe_calibration(calibration: dict | None) -> str:
    if not calibration:
        return "set by hand"
    method = calibration.get("method", "calibrated")
    images = calibration.get("num_images")
    return f"{method}" + (f" on {images} images" if images else "")


def _card_link(source: str) -> str | None:
    if os.path.isdir(source):
        card = Path(source) / "README.md"
        return card.resolve().as_uri() if card.is_file() else None
    return f"https://huggingface.co/{source}"


def model_facts(detector, source: str) -> ModelFacts:
    """The facts of the pipeline's model, for the page header."""
    config = detector.model.config
    vision = config.vision_config
    layers = len(config.feature_layers)
    bound = 2.0 * layers
    backbone = (
        f"{vision.model_type} (width {vision.hidden_size}, {vision.num_hidden_layers} layers, "
        f"patch {vision.patch_size})"
    )
    return ModelFacts(
        source=source,
        backbone=backbone,
        input_size=int(config.image_size),
        feature_layers=tuple(config.feature_layers),
        threshold=config.anomaly_threshold,
        calibration=_describe_calibration(config.threshold_calibration),
        card=_card_link(source),
        colour_range=(-bound, bound),
        colour_source=f"the full map range, {layers} layer maps × [-2, 2]",
    )


@dataclass
class ImageResult:
    name: str
    score: float | None = None
    anomaly_map: np.ndarray | None = None
    image: Image.Image | None = None
    error: str | None = None


@dataclass
class Detector:
    """Scores files one by one with the pipeline, so that one bad file never stops the others."""

    pipeline: Any
    facts: ModelFacts
    max_pixels: int | None = None
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="visualad-app-")))

    def score_file(self, path: str | os.PathLike, name: str | None = None) -> ImageResult:
        name = name or Path(path).name
        try:
            image = to_pil_image(path, max_pixels=self.max_pixels)
            output = self.pipeline(image)
        except (ImageLoadError, VisualADError, ValueError, TypeError, OSError) as error:
            return ImageResult(name, error=_one_line(error))
        return ImageResult(name, float(output["score"]), np.asarray(output["anomaly_map"], np.float32), image.convert("RGB"))

    def panel(self, result: ImageResult, threshold: float | None) -> Image.Image:
        return render_panel(
            result.image, result.anomaly_map, result.score, threshold, title=result.name,
            value_range=self.facts.colour_range,
        )

    def overlay(self, result: ImageResult) -> Image.Image:
        return overlay_heatmap(result.image, result.anomaly_map, 0.5, self.facts.colour_range)

    def new_run_dir(self) -> Path:
        run = self.work_dir / uuid.uuid4().hex[:12]
        run.mkdir(parents=True)
        return run


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _decision(score: float | None, threshold: float | None) -> str:
    if score is None:
        return "error"
    if threshold is None:
        return "no threshold"
    return "ANOMALOUS" if score >= threshold else "normal"


def _rows(results: list[ImageResult], threshold: float | None) -> list[list[Any]]:
    return [
        [
            r.name,
            None if r.score is None else round(r.score, 6),
            None if threshold is None else round(threshold, 6),
            _decision(r.score, threshold),
            r.error or "",
        ]
        for r in results
    ]


def _write_csv(path: Path, rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(TABLE_HEADERS)
        writer.writerows(rows)
    return path


def _map_files(detector: Detector, results: list[ImageResult], run: Path) -> list[str]:
    files = []
    for index, result in enumerate(results):
        if result.anomaly_map is None:
            continue
        stem = f"{index:03d}_{Path(result.name).stem}"
        png, npy = run / f"{stem}_map.png", run / f"{stem}_map.npy"
        heatmap_image(result.anomaly_map, detector.facts.colour_range).save(png)
        np.save(npy, result.anomaly_map)
        files += [str(png), str(npy)]
    return files


def make_examples(folder: Path, image_size: int) -> list[str]:
    """A few images of the synthetic benchmark's target families (normal and defective), generated now."""
    from ..data.synthetic import render_sample

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (category, defect) in enumerate(EXAMPLE_CATEGORIES):
        sample = render_sample(category, index, defect_type=defect, image_size=image_size)
        path = folder / f"{category}_{defect}.png"
        Image.fromarray(sample.image).save(path)
        paths.append(str(path))
    return paths


def _slider_bounds(facts: ModelFacts) -> tuple[float, float]:
    low, high = facts.colour_range
    if facts.threshold is not None and not low <= facts.threshold <= high:
        low, high = min(low, math.floor(facts.threshold)), max(high, math.ceil(facts.threshold))
    return low, high


def build_app(detector_pipeline, source: str, *, max_pixels: int | None = None, title: str = "VisualAD"):
    """The Gradio `Blocks` app around an anomaly-detection pipeline (see the module docstring)."""
    from . import require_gradio

    gr = require_gradio()
    facts = model_facts(detector_pipeline, source)
    detector = Detector(detector_pipeline, facts, max_pixels=max_pixels)
    examples = make_examples(detector.work_dir / "examples", image_size=max(96, min(facts.input_size, 256)))
    low, high = _slider_bounds(facts)

    def outputs_for(results: list[ImageResult], threshold: float | None):
        run = detector.new_run_dir()
        rows = _rows(results, threshold)
        gallery = [(detector.panel(r, threshold), r.name) for r in results if r.error is None]
        failed = [f"{r.name}: {r.error}" for r in results if r.error is not None]
        message = f"Scored {len(results) - len(failed)} of {len(results)} image(s)."
        if failed:
            message += " Not scored: " + "; ".join(failed)
        return gallery, rows, str(_write_csv(run / "results.csv", rows)), _map_files(detector, results, run), message

    def run_batch(files, threshold_value):
        if not files:
            return [], [], gr.skip(), gr.skip(), "Drop one or more images first (or press *Load examples*).", []
        paths = [f if isinstance(f, str) else f.name for f in files]
        results = [detector.score_file(path) for path in paths]
        threshold = None if threshold_value is None else float(threshold_value)
        return (*outputs_for(results, threshold), results)

    def rethreshold(results, threshold_value):
        if not results:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return outputs_for(results, float(threshold_value))

    def detect(image_path):
        if not image_path:
            raise gr.Error("No image given.")
        result = detector.score_file(image_path)
        if result.error is not None:
            raise gr.Error(f"Could not score this file: {result.error}")
        verdict = describe_result(result.score, facts.threshold)
        return detector.overlay(result), result.score, verdict, detector.panel(result, facts.threshold)

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}: zero-shot anomaly detection\n\n{facts.markdown()}")
        with gr.Tab("Batch"):
            with gr.Row():
                with gr.Column(scale=1):
                    files = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath")
                    with gr.Row():
                        run_button = gr.Button("Detect", variant="primary")
                        examples_button = gr.Button("Load examples")
                    threshold = gr.Slider(
                        minimum=low, maximum=high, step=0.001, label="Decision threshold (score >= threshold: anomalous)",
                        value=facts.threshold if facts.threshold is not None else 0.0,
                    )
                    status = gr.Markdown(elem_id="status")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(
                        label="image | heatmap | overlay (fixed colour scale)", columns=1, height="auto",
                        object_fit="contain", preview=False,
                    )
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Results", interactive=False, elem_id="results")
            with gr.Row():
                csv_file = gr.File(label="results.csv")
                map_files = gr.File(label="maps (.png heatmap on the fixed scale, .npy values)", file_count="multiple")
            results_state = gr.State([])
            run_button.click(
                run_batch, [files, threshold], [gallery, table, csv_file, map_files, status, results_state],
                api_name="detect_batch",
            )
            examples_button.click(lambda: examples, None, files, api_visibility="private")
            threshold.release(
                rethreshold, [results_state, threshold], [gallery, table, csv_file, map_files, status],
                api_visibility="private",
            )
        with gr.Tab("Single image"):
            with gr.Row():
                single = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="single-image")
                with gr.Column():
                    overlay = gr.Image(label="overlay (fixed colour scale)", type="pil", format="png")
                    score = gr.Number(label="score", elem_id="score")
                    verdict = gr.Textbox(label="result", elem_id="verdict")
            detect_button = gr.Button("Detect this image", variant="primary")
            single_panel = gr.Image(label="image | heatmap | overlay", type="pil", format="png")
            detect_button.click(detect, [single], [overlay, score, verdict, single_panel], api_name="detect")
    app.visualad_detector = detector  # for tests and embedding: the same scoring the page uses
    return app


def offline_theme():
    """Gradio's default look with system fonts: the default theme fetches web fonts, which an offline page lacks."""
    from . import require_gradio

    gr = require_gradio()
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


__all__ = ["Detector", "ImageResult", "ModelFacts", "build_app", "load_detector", "make_examples", "model_facts"]
