"""`evaluate` adapter for the VisualAD anomaly-detection metrics.

`evaluate` is in maintenance mode, so this is a thin wrapper: the computation is `visualad_hf.metrics`. Load it
offline from the installed package:

```python
import evaluate
from visualad_hf.metrics import METRIC_DIR

image = evaluate.load(str(METRIC_DIR))             # predictions: image scores, references: 0/1 labels
image.compute(predictions=[0.1, 0.9, 0.4], references=[0, 1, 0])
pixel = evaluate.load(str(METRIC_DIR), "pixel")    # predictions: [H, W] maps, references: [H, W] masks
pixel.add_batch(predictions=maps, references=masks)
pixel.compute(fpr_limit=0.3, aupro_method="exact")
```

For a whole benchmark prefer `visualad_hf.metrics.AnomalyMetrics`: it keeps 4 bytes per pixel and reports per
category, while `evaluate` stores every map in an Arrow table first.
"""

import datasets
import evaluate
import numpy as np

from visualad_hf.metrics import image_metrics, pixel_metrics

_DESCRIPTION = """
Exact anomaly-detection metrics of the VisualAD evaluation protocol. Config "image": AUROC, F1-max and average
precision of image scores against 0/1 labels. Config "pixel": AUROC, F1-max, average precision and AUPRO (per-region
overlap integrated up to an FPR limit, 0.3 by default, divided by the limit; 8-connected regions) of anomaly maps
against binary masks. Metrics are fractions in [0, 1]; None where only one class is present.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: image scores (config "image") or [H, W] anomaly maps (config "pixel"); higher is more anomalous.
    references: 0/1 labels (config "image") or [H, W] masks (config "pixel"), binarised at 0.5.
    fpr_limit (pixel only): FPR limit of AUPRO, default 0.3.
    aupro_method (pixel only): "exact" (default, every distinct threshold) or "classic" (evenly spaced thresholds).
    num_thresholds (pixel only): thresholds of the classic AUPRO, default 200.
Returns:
    image: {"image_auroc", "image_f1_max", "image_ap"}; pixel: {"pixel_auroc", "pixel_f1_max", "pixel_ap",
    "pixel_aupro"}.
Examples:
    >>> metric = evaluate.load(str(METRIC_DIR))
    >>> metric.compute(predictions=[0.1, 0.9, 0.4, 0.8], references=[0, 1, 0, 1])["image_auroc"]
    1.0
"""

_CITATION = """
@inproceedings{visualad2026,
  title={VisualAD: Language-Free Zero-Shot Anomaly Detection via Vision Transformer},
  booktitle={CVPR},
  year={2026},
  note={arXiv:2603.07952}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VisualadAnomaly(evaluate.Metric):
    def _info(self):
        if self.config_name == "pixel":
            map_feature = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
            features = datasets.Features({"predictions": map_feature, "references": map_feature})
        elif self.config_name in ("default", "image"):
            features = datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            )
        else:
            raise ValueError(f"Unknown config {self.config_name!r} of visualad_anomaly; use 'image' or 'pixel'.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
        )

    def _compute(self, predictions, references, fpr_limit=0.3, aupro_method="exact", num_thresholds=200):
        if self.config_name == "pixel":
            maps, masks = np.asarray(predictions, dtype=np.float32), np.asarray(references)
            values = pixel_metrics(
                maps, masks, fpr_limit=fpr_limit, aupro_method=aupro_method, num_thresholds=num_thresholds
            )
            return {f"pixel_{name}": value for name, value in values.items()}
        values = image_metrics(np.asarray(predictions), np.asarray(references))
        return {f"image_{name}": value for name, value in values.items()}
