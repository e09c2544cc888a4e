"""The few-shot evaluation protocol: per category, K normal *train* images drawn with a seed become the model's
reference bank (`model.set_reference`), then that category's test images are evaluated; several seeds give
mean ± std.

```python
from visualad_hf.few_shot_evaluation import evaluate_few_shot, evaluate_few_shot_seeds

result = evaluate_few_shot(model, None, test_dataset, train_dataset, num_shots=4, seed=0)
result.info["few_shot"]          # {"num_shots": 4, "seed": 0, "references": {category: [image paths]}}
summary = evaluate_few_shot_seeds(model, None, test_dataset, train_dataset, num_shots=4, seeds=(0, 1, 2))
print(summary.format_table())    # mean ± std over seeds, per category and Mean
```

The draw is a function of (seed, category) only, over the category's normal train images sorted by path, so it
does not depend on the order of the dataset or on the other categories. The model's own bank (if any) is put back
afterwards.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .few_shot import ReferenceBankError
from .metrics.streaming import METRIC_HEADERS, METRIC_NAMES, AnomalyMetricsResult, mean_over_categories


def draw_references(train_dataset, category: str, num_shots: int, seed: int) -> list[int]:
    """Row indices of `num_shots` normal train images of `category`, drawn with `seed` (sorted by image path)."""
    categories, labels = train_dataset["category"], train_dataset["label"]
    paths = train_dataset["image_path"] if "image_path" in train_dataset.column_names else [""] * len(labels)
    normal = sorted((i for i, (c, y) in enumerate(zip(categories, labels)) if c == category and y == 0),
                    key=lambda i: (paths[i], i))  # fmt: skip
    if len(normal) < num_shots:
        raise ReferenceBankError(
            f"category {category!r} has {len(normal)} normal train images, fewer than --few-shot {num_shots}; "
            "lower K or add good images to its train split"
        )
    rng = np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])
    return sorted(int(normal[i]) for i in rng.choice(len(normal), size=num_shots, replace=False))


def evaluate_few_shot(
    model, image_processor, dataset, train_dataset, *, num_shots: int, seed: int = 0, batch_size: int = 8, **kwargs
):
    """Evaluate `dataset` category by category, each with a bank of `num_shots` normal images of that category from
    `train_dataset` (drawn with `seed`). `kwargs` go to `evaluate_model`. Returns one `EvaluationResult`."""
    from .evaluation import EvaluationResult, evaluate_model
    from .image_processing_visualad import VisualADImageProcessor

    if num_shots < 1:
        raise ReferenceBankError(f"--few-shot must be at least 1, got {num_shots}")
    unwrapped = kwargs["accelerator"].unwrap_model(model) if kwargs.get("accelerator") is not None else model
    if image_processor is None:
        image_processor = VisualADImageProcessor.from_model_config(unwrapped.config)
    categories = list(dict.fromkeys(dataset["category"]))
    rows_of = {c: [i for i, x in enumerate(dataset["category"]) if x == c] for c in categories}
    saved = _save_bank(unwrapped)
    per_category, num_images, per_image, failures, figures, references = {}, {}, [], [], {}, {}
    settings: dict[str, Any] = {}
    seconds = 0.0
    try:
        for category in categories:
            picked = draw_references(train_dataset, category, num_shots, seed)
            rows = [train_dataset[i] for i in picked]
            references[category] = [row.get("image_path", "") for row in rows]
            unwrapped.set_reference([row["image"].convert("RGB") for row in rows], image_processor=image_processor,
                                    batch_size=batch_size, names=references[category])  # fmt: skip
            result = evaluate_model(model, image_processor, dataset.select(rows_of[category]), batch_size=batch_size,
                                    **kwargs)  # fmt: skip
            per_category.update(result.per_category)
            num_images.update(result.metrics.num_images)
            settings = result.metrics.settings
            per_image += result.per_image
            failures += result.failures
            figures.update(result.figures)
            seconds += result.info.get("seconds", 0.0)
    finally:
        _restore_bank(unwrapped, saved)
    metrics = AnomalyMetricsResult(per_category, mean_over_categories(per_category), num_images, settings)
    info = {**result.info, "num_images": len(per_image), "num_failures": len(failures), "seconds": round(seconds, 3),
            "few_shot": {"num_shots": num_shots, "seed": seed, "references": references}}  # fmt: skip
    return EvaluationResult(metrics=metrics, per_image=per_image, failures=failures, figures=figures, info=info)


@dataclass
class FewShotSummary:
    """Few-shot results over several seeds: one `EvaluationResult` per seed, and their mean and std (population,
    ddof 0) per category and metric."""

    num_shots: int
    seeds: list[int]
    results: list[Any]
    mean: dict[str, dict[str, float | None]] = field(default_factory=dict)
    std: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def __post_init__(self):
        rows = [*self.results[0].per_category, "Mean"]
        for row in rows:
            self.mean[row], self.std[row] = {}, {}
            for name in METRIC_NAMES:
                values = [_row(r, row).get(name) for r in self.results]
                defined = [v for v in values if v is not None]
                ok = len(defined) == len(values) and defined
                self.mean[row][name] = float(np.mean(defined)) if ok else None
                self.std[row][name] = float(np.std(defined)) if ok else None

    def format_table(self) -> str:
        """Mean ± std ×100 per category and Mean, one column per defined metric."""
        names = [n for n in METRIC_NAMES if self.mean["Mean"].get(n) is not None]
        header = ["Category", *(METRIC_HEADERS[n] for n in names)]
        body = [[row, *(f"{100 * self.mean[row][n]:.1f}±{100 * self.std[row][n]:.1f}" for n in names)]
                for row in self.mean]  # fmt: skip
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        rule = "-" * len(line(header))
        title = f"{self.num_shots}-shot, seeds {', '.join(map(str, self.seeds))} (mean ± std over seeds)"
        return "\n".join([title, line(header), rule, *map(line, body[:-1]), rule, line(body[-1])])

    def to_dict(self) -> dict[str, Any]:
        return {"num_shots": self.num_shots, "seeds": self.seeds, "mean": self.mean, "std": self.std,
                "per_seed": [r.to_dict() for r in self.results]}  # fmt: skip


def evaluate_few_shot_seeds(
    model, image_processor, dataset, train_dataset, *, num_shots: int, seeds: Sequence[int], **kwargs
) -> FewShotSummary:
    """`evaluate_few_shot` once per seed; the summary holds every run and the mean ± std over seeds."""
    results = [evaluate_few_shot(model, image_processor, dataset, train_dataset, num_shots=num_shots, seed=seed,
                                 **kwargs) for seed in seeds]  # fmt: skip
    return FewShotSummary(num_shots=num_shots, seeds=list(seeds), results=results)


def _row(result, row: str) -> dict:
    return result.mean if row == "Mean" else result.per_category.get(row, {})


def _save_bank(model) -> tuple[dict, dict | None, int | None]:
    bank = model.reference_bank
    return dict(bank.tensors()), (dict(bank.metadata) if bank.metadata else None), model.config.reference_num_images


def _restore_bank(model, saved) -> None:
    tensors, metadata, count = saved
    model.reference_bank.clear()
    for name, tensor in tensors.items():
        model.reference_bank._set_buffer(name, tensor)
    model.reference_bank.metadata = metadata
    model.config.reference_num_images = count


__all__ = [
    "FewShotSummary",
    "draw_references",
    "evaluate_few_shot",
    "evaluate_few_shot_seeds",
]
