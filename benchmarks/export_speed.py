"""Deployment speed and int8 accuracy: torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8 vs OpenVINO.

Speed: a random VisualAD with the ViT-L/14 shape (CLIP ViT-L/14@336 layout: 24 layers, width 1024) at 518 px, each
variant computing the same thing (model + Gaussian smoothing + top-k score: the exported graph; for torch the same
`VisualADScoringGraph` module). Per-image latency at batch 1 and throughput at batch 8, the variants interleaved in
one process (so drift on a shared machine hits them alike), median over `--runs`, reported as ratios to torch.

Accuracy: the int8 graph against the fp32 graph on the same random input (scores and maps), and on the synthetic
benchmark (`visualad demo`'s trained tiny model): the metrics of torch, ORT fp32 and ORT int8 through the package's
own `evaluate_model`, and the change int8 makes.

    python benchmarks/export_speed.py --threads 2 --runs 2 [--work DIR] [--skip-openvino] [--skip-accuracy]
    python benchmarks/export_speed.py --layers 2 --width 128 --image-size 112 --runs 1   # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

VARIANTS = ("torch fp32", "ORT fp32", "ORT int8", "OpenVINO fp32")


def build_model(layers: int, width: int, image_size: int):
    from visualad_hf import VisualADConfig, VisualADModel
    from visualad_hf.configuration_visualad import CLIP_VIT_L14_336

    vision = {**CLIP_VIT_L14_336, "model_type": "clip_vision_model", "num_hidden_layers": layers}
    if width != CLIP_VIT_L14_336["hidden_size"]:
        vision.update(hidden_size=width, intermediate_size=4 * width, num_attention_heads=max(1, width // 64))
    step = max(1, layers // 4)
    feature_layers = sorted({min(layers, step * i) for i in range(1, 5)})
    torch.manual_seed(0)
    config = VisualADConfig(vision_config=vision, image_size=image_size, feature_layers=feature_layers)
    return VisualADModel(config).eval()


def export_variants(model, work: Path, skip_openvino: bool) -> dict[str, Path]:
    from visualad_hf.export import export_model, is_exported_folder

    settings = {"ORT fp32": {}, "ORT int8": {"quantize": "int8"}}
    if not skip_openvino:
        settings["OpenVINO fp32"] = {"format": "openvino"}
    folders = {}
    shape = f"{model.config.vision_config.num_hidden_layers}x{model.config.hidden_size}-{model.config.image_size}px"
    for name, kwargs in settings.items():
        folder = work / f"{name.lower().replace(' ', '-')}-{shape}"
        if is_exported_folder(folder):  # same seed, same shape: the same graph as last time
            print(f"reusing {folder}", flush=True)
            folders[name] = folder
            continue
        start = time.perf_counter()
        # int8 and OpenVINO derive from the fp32 ONNX folder (no second trace of the model)
        export_model(folders.get("ORT fp32", model), folder, check=False, **kwargs)
        print(f"exported {name} to {folder} in {time.perf_counter() - start:.0f} s", flush=True)
        folders[name] = folder
    return folders


def time_call(fn, pixel_values) -> float:
    start = time.perf_counter()
    fn(pixel_values)
    return time.perf_counter() - start


def speed(model, folders: dict[str, Path], image_size: int, runs: int, runs8: int, threads: int) -> dict:
    """Median seconds per call at batch 1 and batch 8 for every variant, interleaved."""
    from visualad_hf.export import load_exported
    from visualad_hf.export.graph import VisualADScoringGraph

    graph = VisualADScoringGraph(model).eval()

    def torch_fn(x):
        with torch.inference_mode():
            return graph(x)

    calls = {"torch fp32": torch_fn}
    runners = {name: load_exported(folder, num_threads=threads) for name, folder in folders.items()}
    for name, runner in runners.items():
        calls[name] = lambda x, runner=runner: runner(pixel_values=x)
    results: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 8):
        pixel_values = torch.randn(batch, 3, image_size, image_size, generator=generator)
        for fn in calls.values():  # warm-up: first calls allocate
            fn(pixel_values[:1])
        times: dict[str, list[float]] = {name: [] for name in calls}
        repeats = runs if batch == 1 else runs8
        for run in range(repeats):
            for name, fn in calls.items():
                times[name].append(time_call(fn, pixel_values))
                print(f"batch {batch} run {run + 1}/{repeats} {name}: {times[name][-1]:.2f} s", flush=True)
        for name, values in times.items():
            results.setdefault(name, {})[f"batch{batch}_s"] = statistics.median(values)
            results[name][f"batch{batch}_all_s"] = values
    with torch.inference_mode():
        pixel_values = torch.randn(4, 3, image_size, image_size, generator=generator)
        fp32 = runners["ORT fp32"](pixel_values=pixel_values)
        int8 = runners["ORT int8"](pixel_values=pixel_values)
        reference_maps, reference_scores = graph(pixel_values)
    spread = float(fp32.anomaly_map.max() - fp32.anomaly_map.min())
    differences = {
        "ORT fp32 vs torch, max |map|": float((fp32.anomaly_map - reference_maps).abs().max()),
        "ORT fp32 vs torch, max |score|": float((fp32.score - reference_scores).abs().max()),
        "int8 vs fp32, max |map|": float((int8.anomaly_map - fp32.anomaly_map).abs().max()),
        "int8 vs fp32, mean |map|": float((int8.anomaly_map - fp32.anomaly_map).abs().mean()),
        "int8 vs fp32, max |score|": float((int8.score - fp32.score).abs().max()),
        "fp32 map range (max - min)": spread,
    }
    return {"timings": results, "differences_random_vit_l": differences}


def accuracy(work: Path, threads: int) -> dict:
    """The synthetic benchmark's metrics for torch, ORT fp32 and ORT int8 on the demo's trained tiny model."""
    from visualad_hf.demo import TINY_CONFIG, run_demo
    from visualad_hf.evaluation import evaluate_model
    from visualad_hf.export import export_model, load_exported
    from visualad_hf.modeling_visualad import VisualADModel
    from visualad_hf.trainer import load_datasets, parse_args

    demo = work / "demo"
    if not (demo / "model" / "config.json").is_file():
        run_demo(demo)
    model_dir = demo / "model"
    argv = ["--config", str(TINY_CONFIG), "--train_data_dir", str(demo / "synthetic"),
            "--eval_data_dir", str(demo / "synthetic"), "--output_dir", str(work / "unused")]  # fmt: skip
    _, data_args, training_args = parse_args(argv)
    _, eval_dataset = load_datasets(data_args, training_args.seed)
    models = {"torch fp32": VisualADModel.from_pretrained(model_dir).eval()}
    for name, kwargs in (("ORT fp32", {}), ("ORT int8", {"quantize": "int8"})):
        folder = work / f"demo-{name.lower().replace(' ', '-')}"
        export_model(model_dir, folder, **kwargs)
        models[name] = load_exported(folder, num_threads=threads)
    tables, scores = {}, {}
    for name, model in models.items():
        result = evaluate_model(model, None, eval_dataset, batch_size=8, num_figure_samples=0, progress=False)
        tables[name] = result.mean
        scores[name] = torch.tensor([row["score"] for row in result.per_image], dtype=torch.float64)
        print(
            f"{name}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in result.mean.items() if v is not None), flush=True
        )
    change = {
        key: 100 * (tables["ORT int8"][key] - tables["ORT fp32"][key])
        for key in tables["ORT fp32"]
        if tables["ORT fp32"][key] is not None and tables["ORT int8"].get(key) is not None
    }
    fp32_vs_torch = {
        key: 100 * (tables["ORT fp32"][key] - tables["torch fp32"][key])
        for key in tables["torch fp32"]
        if tables["torch fp32"][key] is not None
    }
    score_differences = {
        "ORT fp32 vs torch, max |score|": float((scores["ORT fp32"] - scores["torch fp32"]).abs().max()),
        "int8 vs fp32, max |score|": float((scores["ORT int8"] - scores["ORT fp32"]).abs().max()),
        "int8 vs fp32, mean |score|": float((scores["ORT int8"] - scores["ORT fp32"]).abs().mean()),
        "fp32 score range (max - min)": float(scores["ORT fp32"].max() - scores["ORT fp32"].min()),
    }
    return {
        "metrics": tables,
        "int8_minus_fp32_points": change,
        "ort_fp32_minus_torch_points": fp32_vs_torch,
        "score_differences": score_differences,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="timed repetitions at batch 1")
    parser.add_argument("--runs8", type=int, default=None, help="timed repetitions at batch 8 (default: --runs)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--work", type=Path, default=Path("export_speed_work"))
    parser.add_argument("--skip-openvino", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.work.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "load_average_start": os.getloadavg(),
        "threads": args.threads,
        "runs": {"batch1": args.runs, "batch8": args.runs8 or args.runs},
        "shape": f"{args.layers} layers, width {args.width}, {args.image_size} px",
        "torch": torch.__version__,
    }
    if not args.skip_speed:
        model = build_model(args.layers, args.width, args.image_size)
        folders = export_variants(model, args.work, args.skip_openvino)
        report.update(speed(model, folders, args.image_size, args.runs, args.runs8 or args.runs, args.threads))
        del model
        torch_times = report["timings"]["torch fp32"]
        print("\n| variant | batch 1 (s/img) | ratio | batch 8 (img/s) | ratio |\n|---|---:|---:|---:|---:|")
        for name, values in report["timings"].items():
            print(
                f"| {name} | {values['batch1_s']:.2f} | {values['batch1_s'] / torch_times['batch1_s']:.2f}x | "
                f"{8 / values['batch8_s']:.3f} | {values['batch8_s'] / torch_times['batch8_s']:.2f}x (time) |"
            )
        print(json.dumps(report["differences_random_vit_l"], indent=2))
    if not args.skip_accuracy:
        report["synthetic"] = accuracy(args.work, args.threads)
        print(json.dumps(report["synthetic"], indent=2))
    report["load_average_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
