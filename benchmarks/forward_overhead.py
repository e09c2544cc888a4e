"""Forward time of VisualADModel vs the bare backbone forward on the same input.

Default: a ViT-L/14-shaped random CLIP (24 layers, width 1024) at 518 px, batch 1, fp32 on CPU, threads pinned,
median of several interleaved runs. `--backbone` picks another family at its ViT-L shape (width 1024, 24 layers,
16 heads): DINOv2 L/14 at 518 px, and DINOv3 L/16 (4 registers, RoPE), SigLIP L/16 and RADIO L/16 (10 prefix tokens,
CPE) at 512 px (32x32 patches). The VisualAD heads add about 4.5% of the backbone's multiply-adds at this size.
Whole-forward times on a shared 2-core machine drift by 10-20% between runs, more than the overhead being measured,
so the script also times the parts VisualAD adds (token-extended layers, final LayerNorms, SCA, SAF, maps) on their
own, back to back, which gives a drift-resistant estimate of the same ratio.

    python benchmarks/forward_overhead.py [--runs 5] [--threads 2] [--backbone clip|dinov2|dinov3|siglip|radio]
                                          [--attn sdpa|eager]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from visualad_hf import VisualADConfig, VisualADModel
from visualad_hf.modeling_visualad import topk_mean

VIT_L = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}


def vit_l_config(backbone: str):
    """The backbone family's config at ViT-L shape (None: VisualAD's default, CLIP ViT-L/14@336px)."""
    import transformers

    if backbone == "clip":
        return None
    if backbone == "dinov2":
        return transformers.Dinov2Config(**VIT_L, patch_size=14, image_size=518)
    if backbone == "dinov3":
        return transformers.DINOv3ViTConfig(**VIT_L, intermediate_size=4096, patch_size=16, num_register_tokens=4)
    if backbone == "siglip":
        return transformers.SiglipVisionConfig(**VIT_L, intermediate_size=4096, patch_size=16, image_size=512)
    if backbone == "radio":
        return transformers.RadioConfig(**VIT_L, mlp_ratio=4.0, patch_size=16)
    raise ValueError(backbone)


def multiply_adds(config: VisualADConfig) -> tuple[float, float]:
    """Approximate multiply-adds of the backbone and of the heads for one image (linear layers and attention)."""
    d, n = config.hidden_size, config.grid_size**2
    layers = config.vision_config.num_hidden_layers
    mlp = getattr(config.vision_config, "intermediate_size", None) or int(config.vision_config.mlp_ratio * d)
    tokens = n + config.num_prefix_tokens
    backbone = layers * (4 * tokens * d * d + 2 * tokens * mlp * d + 2 * tokens * tokens * d)
    backbone += n * 3 * config.patch_size**2 * d
    inner = config.saf_hidden_size or d
    per_layer = 2 * n * d * d + 2 * n * d * inner + n * d * 2  # SCA keys/values, SAF, cosine maps
    return float(backbone), float(len(config.feature_layers) * per_layer)


def time_parts(model: VisualADModel, pixel_values: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median times of the backbone layers with and without the two tokens, and of everything after them."""
    sequence, token_position = model._embed(pixel_values)
    with_tokens = torch.cat([model.tokens(pixel_values.shape[0], token_position), sequence], dim=1)
    layers = model.config.feature_layers
    layer_kwargs = model.backbone_layer_kwargs(pixel_values)
    kept, last = model.run_backbone_layers(with_tokens, layers, **layer_kwargs)

    grid = (pixel_values.shape[-2] // model.config.patch_size, pixel_values.shape[-1] // model.config.patch_size)

    def heads():
        maps, _ = model.layer_anomaly_maps(kept, last, grid)
        upsampled = torch.nn.functional.interpolate(maps, size=pixel_values.shape[-2:], mode="bilinear")
        return topk_mean(upsampled.sum(1), model.config.topk_ratio)

    candidates = {
        "layers without tokens": lambda: model.run_backbone_layers(sequence, layers, **layer_kwargs),
        "layers with tokens": lambda: model.run_backbone_layers(with_tokens, layers, **layer_kwargs),
        "heads": heads,
    }
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--image-size", type=int, default=None, help="default: 518 for patch 14, 512 for patch 16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--backbone", choices=["clip", "dinov2", "dinov3", "siglip", "radio"], default="clip")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = VisualADConfig(vision_config=vit_l_config(args.backbone), image_size=args.image_size)
    model = VisualADModel._from_config(config, attn_implementation=args.attn).eval()
    size = config.image_size
    pixel_values = torch.randn(args.batch_size, 3, size, size)
    # The backbone's own forward, resizing its position table where it has one (CLIP, SigLIP need the flag).
    backbone_kwargs = {"interpolate_pos_encoding": True} if args.backbone in ("clip", "siglip") else {}

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

    with torch.inference_mode():
        parts = time_parts(model, pixel_values, repeats=args.runs)

    backbone_macs, head_macs = multiply_adds(config)
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"settings: {args.backbone} ViT-L/{config.patch_size}-shaped random weights, {size}px "
          f"({config.grid_size}x{config.grid_size} patches), batch {args.batch_size}, fp32, attn {args.attn}, "
          f"feature layers {config.feature_layers}, {args.runs} interleaved runs (median)")
    print(f"heads / backbone multiply-adds: {head_macs / backbone_macs:.1%}")
    for name in ("backbone", "visualad"):
        print(f"{name:>9}: median {median[name]:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in timings[name])})")
    print(f"ratio VisualAD / backbone (whole forwards): {median['visualad'] / median['backbone']:.3f}x  (target <= 1.07x)")
    print("parts, median of back-to-back repeats: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in parts.items()))
    added = parts["heads"] + parts["layers with tokens"] - parts["layers without tokens"]
    print(f"ratio from parts (backbone + what VisualAD adds) / backbone: "
          f"{1 + added / parts['layers without tokens']:.3f}x")


if __name__ == "__main__":
    main()
