"""What the few-shot reference mode costs: time and peak memory per image against zero-shot, and bank size against K.

    python benchmarks/few_shot_cost.py --shape clip-l --shots 1 4 16 --runs 3     # CLIP ViT-L/14 shape, 518 px
    python benchmarks/few_shot_cost.py --shape demo --shots 1 4 16 64 --runs 5    # the demo's tiny ViT, 96 px

Random weights of the given shape (the cost does not depend on the values). Each configuration runs in its own
subprocess, so its peak resident memory (`ru_maxrss`) is its own: zero-shot first, then a bank of K images built
with `set_reference` and the same forward with fusion. Times: `--runs` forwards of one batch with the bank and as
many without it, interleaved in the same process (so that the load of a shared machine hits both alike), after one
warm-up; medians, divided by the batch size; "vs zero" is the median of the paired ratios. The bank size is what `reference_bank.safetensors` holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPES = {
    # CLIP ViT-L/14@336 as VisualAD runs it (SPEC §1): 518 px, 37x37 patches, feature layers 6/12/18/24.
    "clip-l": {"vision": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                               "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "image_size": 336,
                               "hidden_act": "quick_gelu"},
                   "feature_layers": [6, 12, 18, 24], "image_size": 518, "overrides": {}},
    # The demo's model (resources/synthetic_tiny.yaml).
    "demo": {"vision": {"model_type": "clip_vision_model", "hidden_size": 96, "intermediate_size": 192,
                             "num_hidden_layers": 4, "num_attention_heads": 4, "patch_size": 8, "image_size": 96},
                 "feature_layers": [1, 2], "image_size": 96, "overrides": {"gaussian_sigma": 1.0, "max_patches": 256}},
}  # fmt: skip


def multiply_adds(shape: str, shots: int) -> tuple[float, float]:
    """(backbone, nearest-neighbour lookup) multiply-adds per image: the steady part of the ratio. Backbone: per layer
    QKV + output projections (4 d^2) and the MLP (2 d·intermediate) per token, plus attention (2 n^2 d)."""
    spec = SHAPES[shape]
    vision = spec["vision"]
    d, depth, inner = vision["hidden_size"], vision["num_hidden_layers"], vision["intermediate_size"]
    patches = (spec["image_size"] // vision["patch_size"]) ** 2
    tokens = patches + 3  # anomaly and normal tokens, CLS
    backbone = depth * (tokens * (4 * d * d + 2 * d * inner) + 2 * tokens * tokens * d)
    lookup = len(spec["feature_layers"]) * patches * (shots * patches) * d
    return float(backbone), float(lookup)


def measure(shape: str, shots: int, batch: int, runs: int, threads: int) -> dict:
    """One configuration (shots 0: zero-shot), in this process."""
    import resource

    import torch

    from visualad_hf import VisualADConfig, VisualADModel

    torch.set_num_threads(threads)
    spec = SHAPES[shape]
    config = VisualADConfig(vision_config=spec["vision"], feature_layers=spec["feature_layers"],
                            image_size=spec["image_size"], **spec["overrides"])  # fmt: skip
    torch.manual_seed(0)
    model = VisualADModel(config).eval()
    size = spec["image_size"]
    build_seconds, bank_bytes = None, 0
    if shots:
        start = time.perf_counter()
        model.set_reference(torch.randn(shots, 3, size, size), batch_size=batch)
        build_seconds = time.perf_counter() - start
        bank_bytes = model.reference_bank.nbytes()
    pixels = torch.randn(batch, 3, size, size)
    bank = model.reference_bank
    metadata = bank.metadata
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        model(pixels)  # warm-up
        for _ in range(runs):  # interleaved: the same load on a shared machine hits both alike
            for fused in (False, True) if shots else (False,):
                bank.metadata = metadata if fused else None  # the bank's buffers stay; only its use switches
                start = time.perf_counter()
                model(pixels)
                times[fused].append(time.perf_counter() - start)
    bank.metadata = metadata
    zero = statistics.median(times[False]) / batch
    fused = statistics.median(times[True]) / batch if shots else zero
    ratios = [b / a for a, b in zip(times[False], times[True])] if shots else [1.0]
    return {
        "shape": shape, "shots": shots, "batch": batch, "seconds_per_image": fused, "zero_shot_seconds_per_image": zero,
        "ratio": statistics.median(ratios),
        "build_seconds": build_seconds, "bank_bytes": bank_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: a single configuration
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.shape, args.one, args.batch, args.runs, args.threads)))
        return

    rows = []
    for shots in [0, *args.shots]:
        command = [sys.executable, __file__, "--shape", args.shape, "--batch", str(args.batch), "--runs",
                   str(args.runs), "--threads", str(args.threads), "--one", str(shots)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ})
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        backbone, lookup = multiply_adds(args.shape, shots)
        rows[-1]["lookup_share"] = 100 * lookup / backbone
    zero = rows[0]
    print(f"few-shot cost, shape {args.shape}, batch {args.batch}, {args.threads} thread(s), median of {args.runs}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'K':>4} {'bank MiB':>9} {'build s':>8} {'ms/image':>9} {'vs zero':>8} {'MACs +%':>8} {'peak RSS MiB':>13} "
          f"{'+RSS MiB':>9}")  # fmt: skip
    for row in rows:
        build = f"{row['build_seconds']:.2f}" if row["build_seconds"] is not None else "-"
        print(f"{row['shots'] or 'zero':>4} {row['bank_bytes'] / 2**20:9.1f} {build:>8} "
              f"{1000 * row['seconds_per_image']:9.1f} {row['ratio']:7.2f}x {row['lookup_share']:7.1f}% "
              f"{row['peak_rss_bytes'] / 2**20:13.0f} {(row['peak_rss_bytes'] - zero['peak_rss_bytes']) / 2**20:9.0f}")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
