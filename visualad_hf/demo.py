"""`visualad demo`: the whole method offline, end to end, in a few minutes on a laptop CPU.

1. writes the synthetic benchmark (`visualad_hf.data.synthetic`): auxiliary families to train on, disjoint target
   families to evaluate on (the zero-shot protocol);
2. evaluates the freshly initialised model on the target families (the "before" row);
3. trains it with the `synthetic_tiny` recipe (`resources/synthetic_tiny.yaml`, the same file as
   `training/configs/synthetic_tiny.yaml`) through `visualad_hf.trainer.train`;
4. evaluates it again, prints both tables and the gain, and writes overlay panels of target images through the
   `anomaly-detection` pipeline loaded from the trained folder.

The backbone is a tiny *random* ViT, so the figures show that training works, not what VisualAD reaches with CLIP or
DINOv2 (see the model cards for the paper's numbers).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

TINY_CONFIG = Path(__file__).resolve().parent / "resources" / "synthetic_tiny.yaml"
HEADLINE_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")
# The demo's benchmark: 40 test images per family (16 normal), so 160 to train on and 160 to evaluate on. The defects
# are scratches, holes and stains; cut-and-paste patches (same texture, moved) are left out, since a random backbone
# gives the heads little to tell them by.
DEMO_BENCHMARK = {
    "num_train": 16,  # good train images: the few-shot banks and the normal-only fine-tuning (few_shot_demo.py)
    "num_test_normal": 16,
    "num_test_anomalous": 24,
    "defect_types": ("scratch", "hole", "stain"),
}
SMALL_BENCHMARK = {**DEMO_BENCHMARK, "num_train": 4, "num_test_normal": 4, "num_test_anomalous": 6}
DEFAULT_THREADS = 1
"""torch CPU threads the demo uses by default. The tiny model's operations are too small to gain from more: on an
idle 2-core machine 2 threads save a few seconds, but on a busy one every operation waits for the slower thread
and the demo took 3x (load 3) to 30x (8 busy processes) longer. See benchmarks/README.md, "Offline demo"."""


def demo_benchmark(out: Path, *, small: bool = False, **overrides):
    """Write the demo's synthetic benchmark (the families of `synthetic_tiny.yaml`) to `out`."""
    import yaml

    from .data import generate_synthetic_benchmark

    config = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    sizes = {**(SMALL_BENCHMARK if small else DEMO_BENCHMARK), **overrides}
    return generate_synthetic_benchmark(
        out, auxiliary_categories=config["train_categories"], target_categories=config["eval_categories"], **sizes
    )


def run_demo(
    out: Path, *, steps: int | None = None, seed: int | None = None, small: bool = False,
    finetune_steps: int | None = None,
) -> dict:
    """Run the demo into `out`; return the metrics before and after training and their difference."""
    from accelerate.utils import set_seed

    from .data import generate_synthetic_benchmark
    from .evaluation import evaluate_model
    from .trainer import build_model, load_datasets, parse_args, train

    start = time.perf_counter()
    out = Path(out).absolute()
    data_dir, model_dir = out / "synthetic", out / "model"

    # The config names the families; the benchmark is written with exactly those.
    argv = ["--config", str(TINY_CONFIG), "--train_data_dir", str(data_dir), "--eval_data_dir", str(data_dir),
            "--output_dir", str(model_dir), "--overwrite_output_dir", "true", "--save_steps", "0"]  # fmt: skip
    if steps is not None:
        argv += ["--max_steps", str(steps)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    model_args, data_args, training_args = parse_args(argv)
    sizes = SMALL_BENCHMARK if small else DEMO_BENCHMARK
    _say(f"1/5  Writing the synthetic benchmark to {data_dir}")
    benchmark = generate_synthetic_benchmark(
        data_dir,
        auxiliary_categories=data_args.train_categories,
        target_categories=data_args.eval_categories,
        **sizes,
    )
    _say(f"     train on (auxiliary): {', '.join(benchmark.auxiliary_categories)}")
    _say(f"     evaluate on (target, never seen in training): {', '.join(benchmark.target_categories)}")

    _say("2/5  Evaluating the untrained model on the target families")
    _quiet_libraries()
    _, eval_dataset = load_datasets(data_args, training_args.seed)
    set_seed(training_args.seed)  # the same initialisation `train` starts from
    untrained = build_model(model_args)
    before = evaluate_model(untrained, None, eval_dataset, batch_size=training_args.per_device_eval_batch_size,
                            num_figure_samples=0, progress=False)  # fmt: skip
    del untrained
    before.save(out / "eval_before_training")

    _say(f"3/5  Training ({model_dir})")
    result = train(model_args, data_args, training_args)
    after = result.eval_results

    _say("4/5  Overlays of target images")
    overlays = write_overlays(model_dir, eval_dataset, out / "overlays")

    _say("5/5  Beyond zero-shot: few-shot reference banks, and fine-tuning on the target families' good images")
    from .few_shot_demo import beyond_zero_shot

    beyond = beyond_zero_shot(model_dir, eval_dataset, benchmark.load("target", split="train"),
                              (model_args, data_args, training_args), out / "model_finetuned_normal_only",
                              **({"finetune_steps": finetune_steps} if finetune_steps else {}))  # fmt: skip
    beyond["few_shot"].save(out / "eval_few_shot")

    gain = {name: _difference(after.mean.get(name), before.mean.get(name)) for name in after.mean}
    elapsed = time.perf_counter() - start
    _say("")
    _say("Before training (fresh heads), target families:")
    _say(before.format_table())
    _say("")
    _say(f"After training ({result.global_step} steps, {result.skipped_steps} skipped), target families:")
    _say(after.format_table())
    _say("")
    _say("Gain (mean over target families, points x100): " + ", ".join(
        f"{name} {100 * gain[name]:+.1f}" for name in HEADLINE_METRICS if gain.get(name) is not None
    ))  # fmt: skip
    _say_beyond(beyond, after)
    _say(
        "Note: the backbone is a tiny random ViT, so these figures show that training works, not what VisualAD "
        "reaches with CLIP or DINOv2 (the paper reports e.g. 92.2 image AUROC on MVTec-AD with CLIP)."
    )
    _say(f"Model folder: {model_dir}  (VisualADModel.from_pretrained / pipeline('anomaly-detection', model=...))")
    _say(f"Overlays: {out / 'overlays'} ({len(overlays)} panels)")
    _say(f"Evaluation files and figures: {out / 'eval_before_training'} (before), {model_dir / 'eval_results'} (after)")
    _say(f"Few-shot and fine-tuned: {out / 'eval_few_shot'}, {out / 'model_finetuned_normal_only'}")
    _say(f"Done in {elapsed:.0f} s.")
    return {"before": before.mean, "after": after.mean, "gain": gain, "overlays": overlays, "seconds": elapsed,
            "few_shot": beyond["few_shot"].mean, "fine_tuned": beyond["fine_tuned"].mean}  # fmt: skip


def _say_beyond(beyond: dict, zero_shot) -> None:
    """The few-shot and normal-only fine-tuned tables, each with its gain over the zero-shot table."""
    shots = beyond["few_shot"].info["few_shot"]
    for title, result in (
        (f"Few-shot (K={shots['num_shots']} good train images per family, seed {shots['seed']}), target families:",
         beyond["few_shot"]),
        ((f"Fine-tuned on the target families' good train images only (synthetic defects, {beyond['finetune_steps']} "
         "steps from the model above), target families:"), beyond["fine_tuned"]),
    ):  # fmt: skip
        _say("")
        _say(title)
        _say(result.format_table())
        _say("Gain over zero-shot (points x100): " + ", ".join(
            f"{name} {100 * (result.mean[name] - zero_shot.mean[name]):+.1f}" for name in HEADLINE_METRICS
            if result.mean.get(name) is not None and zero_shot.mean.get(name) is not None
        ))  # fmt: skip


def write_overlays(model_dir: Path, dataset, out_dir: Path) -> list[Path]:
    """Panels (image | heatmap | overlay) of target images, scored by the pipeline loaded from `model_dir`: per
    category one normal image and one image of each defect type, with one colour scale for all panels so that
    they compare."""
    from transformers import pipeline

    from .visualization import render_panel

    detector = pipeline("anomaly-detection", model=str(model_dir), device="cpu")
    rows = pick_overlay_rows(dataset)
    images = [dataset[index]["image"].convert("RGB") for index in rows]
    results = detector(images, batch_size=8)
    low = min(float(r["anomaly_map"].min()) for r in results)
    high = max(float(r["anomaly_map"].max()) for r in results)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image, result in zip(rows, images, results):
        row = dataset[index]
        title = f"{row['category']} / {row['defect_type']}"
        panel = render_panel(image, result["anomaly_map"], result["score"], title=title, value_range=(low, high))
        path = out_dir / f"{row['category']}_{Path(row['image_path']).parent.name}_{Path(row['image_path']).stem}.png"
        panel.save(path)
        paths.append(path)
    return paths


def pick_overlay_rows(dataset) -> list[int]:
    """Per category, in dataset order: the first normal image, then the first image of each defect type."""
    picked: dict[tuple[str, str], int] = {}
    for index, (category, defect) in enumerate(zip(dataset["category"], dataset["defect_type"])):
        picked.setdefault((category, defect), index)
    order = {category: i for i, category in enumerate(dict.fromkeys(dataset["category"]))}
    keys = sorted(picked, key=lambda key: (order[key[0]], key[1] != "good", picked[key]))
    return [picked[key] for key in keys]


def _difference(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    logging.getLogger("visualad_hf.trainer").setLevel(logging.WARNING)


def _say(text: str) -> None:
    print(text, flush=True)


__all__ = ["DEFAULT_THREADS", "TINY_CONFIG", "demo_benchmark", "pick_overlay_rows", "run_demo", "write_overlays"]
