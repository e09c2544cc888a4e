"""Which few-shot fusion rule and weight: a sweep on the demo's model and held-out synthetic families.

    visualad demo --out demo_output                       # trains the demo model (demo_output/model)
    python benchmarks/few_shot_fusion.py --model demo_output/model --seeds 0 1 2

For every (fusion, weight) it runs the few-shot protocol (K normal train images per category, drawn per seed) on the
demo's target families and prints mean ± std over seeds of image AUROC, pixel AUROC and AUPRO, next to zero-shot.
The benchmark is the demo's (same seed, families and defect types), written with normal train images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the demo's trained model folder")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=16, help="normal train images per category to draw from")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    import visualad_hf  # noqa: F401
    from visualad_hf.demo import demo_benchmark
    from visualad_hf.evaluation import evaluate_model
    from visualad_hf.few_shot_evaluation import evaluate_few_shot_seeds
    from visualad_hf.modeling_visualad import VisualADModel

    torch.set_num_threads(args.threads)
    model = VisualADModel.from_pretrained(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        benchmark = demo_benchmark(Path(tmp) / "synthetic", num_train=args.train_images)
        test, train = benchmark.load("target"), benchmark.load("target", split="train")
        quiet = {"num_figure_samples": 0, "progress": False}
        zero = evaluate_model(model, None, test, **quiet).mean
        rows = [("zero-shot", "-", {k: (zero[k], 0.0) for k in zero}, 0.0)]
        for fusion, weights in (("add", args.weights), ("replace", [1.0])):
            for weight in weights:
                model.config.reference_fusion, model.config.reference_weight = fusion, weight
                start = time.perf_counter()
                summary = evaluate_few_shot_seeds(model, None, test, train, num_shots=args.shots, seeds=args.seeds,
                                                  **quiet)  # fmt: skip
                stats = {k: (summary.mean["Mean"][k], summary.std["Mean"][k]) for k in summary.mean["Mean"]}
                rows.append((fusion, f"{weight:g}", stats, time.perf_counter() - start))
    shown = ("image_auroc", "pixel_auroc", "pixel_aupro")
    print(f"{args.shots}-shot on the demo's target families, seeds {args.seeds} (mean ± std over seeds, x100)")
    print(f"{'fusion':10} {'weight':>6}  " + "  ".join(f"{n:>13}" for n in shown))
    for fusion, weight, stats, _ in rows:
        cells = [f"{100 * stats[n][0]:6.1f} ± {100 * stats[n][1]:4.1f}" for n in shown]
        print(f"{fusion:10} {weight:>6}  " + "  ".join(cells))
    if args.json:
        args.json.write_text(json.dumps([{"fusion": f, "weight": w, "stats": s} for f, w, s, _ in rows], indent=2))
    print(f"torch threads: {args.threads}; total {sum(r[3] for r in rows):.0f} s of few-shot evaluation; "
          f"numpy {np.__version__}")  # fmt: skip


if __name__ == "__main__":
    main()
