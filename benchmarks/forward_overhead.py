"""Forward time of VisualADModel vs the bare backbone forward on the same input.

Default: a ViT-L/14-shaped random CLIP (24 layers, width 1024) at 518 px, batch 1, fp32 on CPU, threads pinned,
median of several interleaved runs. The VisualAD heads add about 4.5% of the backbone's multiply-adds at this size.

    python benchmarks/forward_overhead.py [--runs 5] [--threads 2] [--backbone clip|dinov2] [--attn sdpa|eager]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from visualad_hf import VisualADConfig, VisualADModel


def multiply_adds(config: VisualADConfig) -> tuple[float, float]:
    """Approximate multiply-adds of the backbone and of the heads for one image (linear layers and attention)."""
    d, n = config.hidden_size, config.grid_size**2
    layers = config.vision_config.num_hidden_layers
    mlp = getattr(config.vision_config, "intermediate_size", None) or int(config.vision_config.mlp_ratio * d)
    tokens = n + 1
    backbone = layers * (4 * tokens * d * d + 2 * tokens * mlp * d + 2 * tokens * tokens * d) + n * 3 * 14 * 14 * d
    inner = config.saf_hidden_size or d
    per_layer = 2 * n * d * d + 2 * n * d * inner + n * d * 2  # SCA keys/values, SAF, cosine maps
    return float(backbone), float(len(config.feature_layers) * per_layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--backbone", choices=["clip", "dinov2"], default="clip")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vision_config = None
    if args.backbone == "dinov2":
        from transformers import Dinov2Config

        vision_config = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                                     image_size=518)
    config = VisualADConfig(vision_config=vision_config, image_size=args.image_size)
    model = VisualADModel._from_config(config, attn_implementation=args.attn).eval()
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    backbone_kwargs = {"interpolate_pos_encoding": True} if args.backbone == "clip" else {}

    def run_backbone():
        return model.backbone(pixel_values, **backbone_kwargs)

    def run_visualad():
        return model(pixel_values)

    timings: dict[str, list[float]] = {"backbone": [], "visualad": []}
    with torch.inference_mode():
        run_backbone(), run_visualad()  # warm-up
        for _ in range(args.runs):  # interleaved, so drifting machine load hits both alike
            for name, fn in (("backbone", run_backbone), ("visualad", run_visualad)):
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)

    backbone_macs, head_macs = multiply_adds(config)
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"settings: {args.backbone} ViT-L/14-shaped random weights, {args.image_size}px "
          f"({config.grid_size}x{config.grid_size} patches), batch {args.batch_size}, fp32, attn {args.attn}, "
          f"feature layers {config.feature_layers}, {args.runs} interleaved runs (median)")
    print(f"heads / backbone multiply-adds: {head_macs / backbone_macs:.1%}")
    for name in ("backbone", "visualad"):
        print(f"{name:>9}: median {median[name]:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in timings[name])})")
    print(f"ratio VisualAD / backbone: {median['visualad'] / median['backbone']:.3f}x  (target <= 1.07x)")


if __name__ == "__main__":
    main()
