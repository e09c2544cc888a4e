"""Time and peak memory of one VisualAD training step against one inference forward pass, same input.

    python benchmarks/train_step.py                      # CLIP ViT-L/14 shape, 518 px, batch 1 (heavy on a CPU)
    python benchmarks/train_step.py --preset small       # ViT-S/14 shape, 518 px: a quick check
    python benchmarks/train_step.py --backbone dinov2 --device cuda --batch-size 8 --repeats 10

Three measurements on a randomly initialised model of the chosen shape (weights do not change the cost):

- `forward`: inference, `model.eval()` under `torch.inference_mode()`, as the pipeline runs it;
- `train step`: `model.train()`, forward with labels and masks (all three losses), backward (through the frozen
  backbone to the tokens), per-token gradient clipping, AdamW step, zero_grad: the trainer's step;
- `train step + GC`: the same with gradient checkpointing of the backbone layers
  (`model.activation_checkpointing_enable()`).

Each measurement runs in a fresh subprocess, so that peak memory is its own: on CUDA `torch.cuda.max_memory_allocated`,
on CPU the growth of the process's peak resident set (`ru_maxrss`) over the model and inputs (for the training step
this includes gradients and the AdamW state). Times are medians over
`--repeats` runs after `--warmup` runs. The target for the training step is at most 2.3x the forward time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("forward", "train", "train_gc")
LABELS = {"forward": "forward (inference)", "train": "train step", "train_gc": "train step + GC"}
TARGET_RATIO = 2.3
PRESETS = {
    # (hidden, layers, heads, intermediate, feature layers)
    "vit-l": (1024, 24, 16, 4096, (6, 12, 18, 24)),
    "small": (384, 12, 6, 1536, (3, 6, 9, 12)),
}


def build_model(backbone: str, preset: str, image_size: int):
    from transformers import CLIPVisionConfig, Dinov2Config

    from visualad_hf import VisualADConfig, VisualADModel

    hidden, layers, heads, intermediate, feature_layers = PRESETS[preset]
    if backbone == "clip":
        vision = CLIPVisionConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
            patch_size=14, image_size=336, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        )  # fmt: skip
    else:
        vision = Dinov2Config(
            hidden_size=hidden, mlp_ratio=intermediate // hidden, num_hidden_layers=layers, num_attention_heads=heads,
            patch_size=14, image_size=518,
        )  # fmt: skip
    config = VisualADConfig(vision_config=vision, feature_layers=list(feature_layers), image_size=image_size)
    return VisualADModel(config)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(settings: dict) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from visualad_hf.trainer import VisualADTrainingArguments, build_optimizer, clip_token_gradients

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    mode = settings["mode"]
    torch.manual_seed(0)
    model = build_model(settings["backbone"], settings["preset"], settings["image_size"]).to(device)
    size, batch = settings["image_size"], settings["batch_size"]
    pixel_values = torch.randn(batch, 3, size, size, device=device)
    masks = torch.zeros(batch, size, size, device=device)
    masks[:, size // 3 : size // 2, size // 4 : size // 2] = 1.0
    masks[: batch // 2] = 0.0  # half of the batch normal
    labels = masks.flatten(1).amax(1)

    if mode == "forward":
        model.eval()

        def step():
            with torch.inference_mode():
                model(pixel_values)

    else:
        model.train()
        if mode == "train_gc":
            model.activation_checkpointing_enable()
        optimizer = build_optimizer(model, VisualADTrainingArguments())

        def step():
            outputs = model(pixel_values, labels=labels, masks=masks)
            outputs.loss.backward()
            clip_token_gradients(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Memory is counted from here: the model and inputs exist; activations, gradients and the AdamW state (created
    # by the first step) are what a step adds.
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_bytes()
    for _ in range(settings["warmup"]):
        step()
    sync()
    times = []
    for _ in range(settings["repeats"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    return {
        "mode": mode,
        "seconds": statistics.median(times),
        "all_seconds": times,
        "peak_extra_bytes": max(0, peak - base),
        "peak_bytes": peak,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "threads": torch.get_num_threads(),
    }


def machine_description(device: str, threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {threads} torch threads"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=("clip", "dinov2"), default="clip")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="vit-l", help="model shape (vit-l: the paper's)")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    settings = {
        "backbone": args.backbone, "preset": args.preset, "image_size": args.image_size, "batch_size": args.batch_size,
        "warmup": args.warmup, "repeats": args.repeats, "device": args.device, "threads": args.threads,
    }  # fmt: skip
    hidden, layers, heads, _, feature_layers = PRESETS[args.preset]
    threads = args.threads or __import__("torch").get_num_threads()
    machine = machine_description(args.device, threads)
    print(f"machine: {machine}")
    print(
        f"model: {args.backbone} {args.preset} (width {hidden}, {layers} layers, {heads} heads, patch 14, "
        f"feature layers {list(feature_layers)}), random weights, fp32; input {args.batch_size}x3x{args.image_size}"
        f"x{args.image_size} ({(args.image_size // 14) ** 2} patches); warmup {args.warmup}, median of {args.repeats}"
    )
    results = {}
    for mode in args.modes:
        command = [sys.executable, __file__, "--worker", json.dumps({**settings, "mode": mode})]
        process = subprocess.run(command, capture_output=True, text=True, check=False)
        if process.returncode != 0:
            print(f"{LABELS[mode]}: failed\n{process.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[mode] = json.loads(process.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"  {LABELS[mode]:<22} {r['seconds']:8.3f} s   peak memory +{r['peak_extra_bytes'] / 2**20:8.0f} MiB "
            f"(process peak {r['peak_bytes'] / 2**30:.2f} GiB)",
            flush=True,
        )
    if "forward" in results:
        base = results["forward"]["seconds"]
        for mode in ("train", "train_gc"):
            if mode in results:
                ratio = results[mode]["seconds"] / base
                verdict = "within" if ratio <= TARGET_RATIO else "ABOVE"
                print(f"  {LABELS[mode]} / forward = {ratio:.2f}x ({verdict} the {TARGET_RATIO}x target)")
    first = next(iter(results.values()))
    print(f"  parameters: {first['params']:,} ({first['trainable_params']:,} trainable)")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
