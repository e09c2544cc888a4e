"""Benchmark evaluation (SPEC §7): the runner, its result type, and the per-category figures.

```python
from visualad_hf.evaluation import evaluate_model
from visualad_hf.data import load_anomaly_dataset

dataset = load_anomaly_dataset("mvtec", "/data/mvtec_anomaly_detection")
result = evaluate_model(model, None, dataset, batch_size=8)     # image processor from the model config
print(result)                     # per-category table + Mean, x100, one decimal (the paper's layout)
result.mean["pixel_aupro"]        # fractions in [0, 1]
result.save("eval/mvtec")         # metrics.json/.csv/.md, scores.csv, figures/<category>.png
```

`runner.py` scores a dataset (one or several processes), `rows.py` turns dataset rows into batches, `result.py`
holds `EvaluationResult`, `figures.py` picks the figure samples (drawn by `visualad_hf.visualization`). The
command line is `visualad evaluate` (`visualad_hf/commands/evaluate.py`), also
`accelerate launch training/evaluate.py ...` and `python -m visualad_hf.evaluation ...`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .figures import DEFAULT_FIGURE_SAMPLES, FIGURE_TILE_SIZE, render_category_figure
from .result import EvaluationResult
from .rows import EvaluationCollator, EvaluationDataError, dataset_flags, decode_image_cell
from .runner import (
    ModelLoadError,
    RunSettings,
    evaluate_benchmark,
    evaluate_model,
    load_model_and_processor,
    score_batch,
)


def main(argv: Sequence[str] | None = None, prog: str = "training/evaluate.py") -> int:
    """`visualad evaluate` under another name (the training script and `python -m` use it)."""
    from ..cli import run_command

    return run_command("evaluate", argv, prog=prog)


def __getattr__(name: str):
    # The command's argparse lives in visualad_hf.commands.evaluate; these names stay importable from here.
    if name in ("add_arguments", "run"):
        from ..commands import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_FIGURE_SAMPLES",
    "FIGURE_TILE_SIZE",
    "EvaluationCollator",
    "EvaluationDataError",
    "EvaluationResult",
    "ModelLoadError",
    "RunSettings",
    "add_arguments",
    "dataset_flags",
    "decode_image_cell",
    "evaluate_benchmark",
    "evaluate_model",
    "load_model_and_processor",
    "main",
    "render_category_figure",
    "run",
    "score_batch",
]
