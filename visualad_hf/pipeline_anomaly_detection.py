"""The `"anomaly-detection"` pipeline: image in, score + anomaly map + decision out.

After `import visualad_hf`:

```python
from transformers import pipeline

detector = pipeline("anomaly-detection", model="path/or/hub-id")
result = detector("part.png")                       # {"score", "anomaly_map", "threshold", "is_anomalous"?}
results = detector(["a.png", "b.jpg"], batch_size=8, return_overlay=True)
```
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Pipeline
from transformers.utils import logging

from .image_processing_visualad import to_pil_image
from .visualization import overlay_heatmap

logger = logging.get_logger(__name__)


class AnomalyDetectionPipeline(Pipeline):
    r"""
    Zero-shot anomaly detection with a [`VisualADModel`].

    Inputs: a path, an `http(s)://` URL, a PIL image, a numpy array or torch tensor, or a list / generator of them.
    Images are read with EXIF orientation applied and any mode or bit depth the image processor accepts.

    Per image the pipeline returns a dict with:

    - `score` (`float`): the image anomaly score, the top-`topk_ratio` mean of the Gaussian-smoothed map at model
      resolution (SPEC §4);
    - `anomaly_map` (`np.ndarray`, float32, `[height, width]` of the input image): the smoothed map resized
      bilinearly to the image (left out with `return_anomaly_map=False`);
    - `threshold` (`float` or `None`): the call's `threshold`, else `model.config.anomaly_threshold`;
    - `is_anomalous` (`bool`, only when a threshold is known): `score >= threshold`;
    - `overlay` (`PIL.Image`, with `return_overlay=True`): the image blended with the map's heatmap.

    Smoothing and top-k use the model config's `gaussian_sigma` and `topk_ratio` (the processor's copies are ignored
    here, and a mismatch is logged), so a saved model always scores the same way.

    Call parameters: `threshold`, `return_overlay`, `overlay_alpha` (default 0.5), `return_anomaly_map` (default
    True), `timeout` (seconds, for URLs), `max_pixels` (largest accepted image, see `load_image`), and the usual
    `batch_size`; `device` and `dtype` are given when the pipeline is built. Batching does not change the results.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    # Not "if available": transformers would take the image processor's auto_map entry for a video processor's.
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            raise ValueError(
                "The anomaly-detection pipeline needs an image processor: save one next to the model "
                "(VisualADImageProcessor.from_model_config(model.config).save_pretrained(dir)) "
                "or pass image_processor=."
            )
        config, processor = self.model.config, self.image_processor
        for name in ("gaussian_sigma", "topk_ratio"):
            model_value, processor_value = getattr(config, name, None), getattr(processor, name, None)
            if model_value is not None and processor_value is not None and float(model_value) != float(processor_value):
                logger.warning(
                    f"The image processor has {name}={processor_value} but the model config has {model_value}; "
                    f"the pipeline uses the model config's value."
                )

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Save the model (with its calibrated threshold) and the image processor: a self-contained folder.

        Their own `save_pretrained` write `auto_map`, `custom_pipelines` and the model-side code (this module
        included, see `visualad_hf.remote_code`), so the folder loads with the installed package as it is and with
        `pipeline(model=folder, trust_remote_code=True)` without it. The base class's code copy is not used: it
        cannot follow the `backbones` package.
        """
        self.model.save_pretrained(save_directory, **kwargs)
        self.image_processor.save_pretrained(save_directory, **kwargs)

    def _sanitize_parameters(
        self,
        threshold: float | None = None,
        return_overlay: bool | None = None,
        overlay_alpha: float | None = None,
        return_anomaly_map: bool | None = None,
        timeout: float | None = None,
        max_pixels: int | None = None,
        **kwargs,
    ):
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if max_pixels is not None:
            preprocess_params["max_pixels"] = max_pixels
        if return_overlay is not None:
            preprocess_params["keep_image"] = bool(return_overlay)
            postprocess_params["return_overlay"] = bool(return_overlay)
        if overlay_alpha is not None:
            postprocess_params["overlay_alpha"] = float(overlay_alpha)
        if return_anomaly_map is not None:
            forward_params["return_anomaly_map"] = bool(return_anomaly_map) or bool(return_overlay)
            postprocess_params["return_anomaly_map"] = bool(return_anomaly_map)
        if threshold is not None:
            postprocess_params["threshold"] = float(threshold)
        if kwargs:
            raise TypeError(f"Unknown argument(s) for the anomaly-detection pipeline: {sorted(kwargs)}.")
        return preprocess_params, forward_params, postprocess_params

    def preprocess(
        self, image, timeout: float | None = None, max_pixels: int | None = None, keep_image: bool = False
    ) -> dict[str, Any]:
        image = to_pil_image(
            image, bit_depth_scaling=self.image_processor.bit_depth_scaling, timeout=timeout, max_pixels=max_pixels
        )
        pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"]
        # Every tensor keeps a leading batch dimension of 1: the pipeline batches by concatenating along dim 0.
        inputs = {
            "pixel_values": pixel_values.to(self.model.dtype),
            "original_size": torch.tensor([[image.height, image.width]]),
        }
        if keep_image:
            inputs["image"] = image
        return inputs

    def _forward(self, model_inputs: dict[str, Any], return_anomaly_map: bool = True) -> dict[str, Any]:
        original_sizes = model_inputs.pop("original_size")
        image = model_inputs.pop("image", None)
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        config = self.model.config
        results = self.image_processor.post_process_anomaly_detection(
            outputs,
            target_sizes=original_sizes.tolist() if return_anomaly_map else None,
            gaussian_sigma=config.gaussian_sigma,
            topk_ratio=config.topk_ratio,
        )
        model_outputs = {"score": torch.tensor([result["score"] for result in results], dtype=torch.float64)}
        if return_anomaly_map:
            model_outputs["anomaly_map"] = [result["anomaly_map"] for result in results]
        if image is not None:
            model_outputs["image"] = image
        return model_outputs

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        threshold: float | None = None,
        return_overlay: bool = False,
        overlay_alpha: float = 0.5,
        return_anomaly_map: bool = True,
    ) -> dict[str, Any]:
        # With batch_size 1 values arrive as `_forward` made them (a list of one map), with larger batches as
        # unbatched tensors of leading size 1: `[0]` reads both.
        score = float(model_outputs["score"][0])
        if threshold is None:
            threshold = getattr(self.model.config, "anomaly_threshold", None)
        result: dict[str, Any] = {"score": score}
        anomaly_map = None
        if "anomaly_map" in model_outputs:
            anomaly_map = model_outputs["anomaly_map"][0].to(torch.float32).numpy()
            if return_anomaly_map:
                result["anomaly_map"] = anomaly_map
        result["threshold"] = None if threshold is None else float(threshold)
        if threshold is not None:
            result["is_anomalous"] = bool(score >= threshold)
        if return_overlay:
            result["overlay"] = overlay_heatmap(model_outputs["image"], np.asarray(anomaly_map), alpha=overlay_alpha)
        return result


__all__ = ["AnomalyDetectionPipeline"]
