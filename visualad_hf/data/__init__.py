"""Benchmarks as `datasets`: loaders for the paper's datasets (and more), mask handling, and a synthetic benchmark.

```python
from visualad_hf.data import load_anomaly_dataset, load_mask, dataset_spec

ds = load_anomaly_dataset("mvtec", "/data/mvtec_anomaly_detection", categories=["bottle"])
row = ds[0]                     # image, mask (or None), label, category, defect_type, image_path
pixels = load_mask(row)         # bool [H, W]; the per-format threshold rule lives in `masks.py`
dataset_spec("kvasir").anomaly_only   # True: report pixel metrics only
```
"""

from .builders import FEATURES, LABEL_NAMES, AnomalyDatasetBuilder, load_anomaly_dataset
from .collator import VisualADCollator
from .layouts import ANOMALY, GOOD, DatasetLayoutError, Sample
from .masks import binarize_mask, load_mask, mask_threshold
from .registry import DATASETS, DatasetSpec, dataset_spec, display_name, scan_dataset
from .synthetic import SyntheticBenchmark, generate_synthetic_benchmark

__all__ = [
    "ANOMALY",
    "DATASETS",
    "FEATURES",
    "GOOD",
    "LABEL_NAMES",
    "AnomalyDatasetBuilder",
    "DatasetLayoutError",
    "DatasetSpec",
    "Sample",
    "SyntheticBenchmark",
    "VisualADCollator",
    "binarize_mask",
    "dataset_spec",
    "display_name",
    "generate_synthetic_benchmark",
    "load_anomaly_dataset",
    "load_mask",
    "mask_threshold",
    "scan_dataset",
]
