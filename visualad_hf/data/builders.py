"""`datasets` builders for the anomaly-detection benchmarks, and `load_anomaly_dataset`.

`datasets` 5 no longer runs loading scripts, so the builder is a `GeneratorBasedBuilder` subclass shipped here and
instantiated directly. Caching: the folder is scanned on every call (it only lists files), and the Arrow cache is
keyed by a fingerprint of the scan result (root, split and every sample's paths, label, category and defect
type) plus the feature schema. A folder that gains, loses or renames files therefore gets a new cache entry
instead of the stale one `datasets` would otherwise serve; a file edited in place needs nothing, because the
table stores file paths, not pixels. Old entries stay under `<cache_dir>/<dataset name>/` until you delete them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets

from .layouts import SPLIT_ALIASES, Sample
from .registry import dataset_spec, scan_dataset

LABEL_NAMES = ["normal", "anomalous"]

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "mask": datasets.Image(),  # the dataset's own mask file; None for normal images and mask-less sets
        "label": datasets.ClassLabel(names=LABEL_NAMES),
        "category": datasets.Value("string"),
        "defect_type": datasets.Value("string"),  # "good" for every normal image
        "image_path": datasets.Value("string"),  # POSIX path relative to data_dir
    }
)


class AnomalyDatasetBuilder(datasets.GeneratorBasedBuilder):
    """Builds one split of a benchmark folder (`dataset` is a name of `DATASETS`) into a cached Arrow table.

    Rows are sorted by (category, image_path). The `image` and `mask` cells reference the files by absolute path,
    so the table stays valid only while the folder stays put (`Dataset.save_to_disk` embeds the bytes).
    `info.dataset_name` is the dataset's registry name, so `dataset_spec(ds.info.dataset_name)` finds its flags.
    """

    VERSION = datasets.Version("1.0.0")

    def __init__(
        self,
        dataset: str,
        data_dir: str | os.PathLike,
        split: str = "test",
        categories: str | Sequence[str] | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        **options,
    ):
        self.spec = dataset_spec(dataset)
        self.samples: list[Sample] = scan_dataset(self.spec.name, data_dir, split, categories, **options)
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(data_dir))))
        self.split_name = datasets.Split(SPLIT_ALIASES.get(split, split))
        super().__init__(
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            dataset_name=self.spec.name,
            config_name=str(self.split_name),
            data_dir=str(self.root),
            hash=fingerprint(self.root, str(self.split_name), self.samples),
        )

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=f"{self.spec.title} ({self.spec.name}); anomaly_only={self.spec.anomaly_only}",
            features=FEATURES,
            homepage=self.spec.url or "",
        )

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=self.split_name)]

    def _generate_examples(self):
        for index, sample in enumerate(self.samples):
            yield (
                index,
                {
                    "image": str(self.root / sample.image),
                    "mask": None if sample.mask is None else str(self.root / sample.mask),
                    "label": sample.label,
                    "category": sample.category,
                    "defect_type": sample.defect_type,
                    "image_path": sample.image,
                },
            )


def fingerprint(root: Path, split: str, samples: Sequence[Sample]) -> str:
    """A short hash of everything the Arrow table is made of; it names the cache entry."""
    digest = hashlib.sha256()
    digest.update(json.dumps([str(root), split, FEATURES.to_dict()], sort_keys=True).encode())
    for s in samples:
        digest.update(json.dumps([s.image, s.mask, s.label, s.category, s.defect_type]).encode())
    return digest.hexdigest()[:16]


def load_anomaly_dataset(
    name: str,
    data_dir: str | os.PathLike,
    split: str = "test",
    categories: str | Sequence[str] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    **options,
) -> datasets.Dataset:
    """Load one split of an anomaly-detection benchmark that you downloaded to `data_dir`.

    Args:
        name: a key of `DATASETS` (`"mvtec"`, `"visa"`, ..., `"meta_json"`, `"folder"`); see the README table.
        data_dir: the dataset's root folder, laid out as the README (and any error message) describes.
        split: `"test"` (the zero-shot protocol uses only test splits, also to train on the auxiliary dataset),
            or `"train"`/`"validation"` where the layout has them.
        categories: keep only these categories; an unknown one is an error that lists the available ones.
        cache_dir: where `datasets` caches the Arrow table (default: the `datasets` cache).
        **options: per-dataset options: `ksdd2` (`protocol="rebuilt"|"official"`, `seed=0`), `meta_json`
            (`meta_file="meta.json"`, `check_mask_names=True`), `folder` (`normal_dir`, `abnormal_dir`, `mask_dir`,
            `mask_suffix`, `category`).

    Returns:
        A `datasets.Dataset` with columns `image`, `mask` (Image or None), `label` (ClassLabel normal/anomalous),
        `category`, `defect_type` and `image_path` (relative to `data_dir`). Turn a row's mask into booleans with
        `visualad_hf.data.load_mask(row)`.
    """
    builder = AnomalyDatasetBuilder(name, data_dir, split, categories, cache_dir=cache_dir, **options)
    builder.download_and_prepare()
    return builder.as_dataset(split=builder.split_name)
