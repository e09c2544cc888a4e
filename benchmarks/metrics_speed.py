"""Speed and memory of the full metric suite on an MVTec-AD-sized synthetic benchmark.

    python benchmarks/metrics_speed.py                       # 15 categories, 1,725 maps of 518x518 (about 1 min)
    python benchmarks/metrics_speed.py --scale 0.1           # a quick check
    python benchmarks/metrics_speed.py --storage-dir /tmp/m  # pixel data spilled to disk

What is timed: `AnomalyMetrics.add_batch` for every batch (mask labelling, splitting) plus `compute` (sorts and all
seven metrics for every category, exact AUPRO), i.e. everything after the model. Map generation is not timed.
Peak memory is the process's maximum resident set size (`resource.getrusage(...).ru_maxrss`, which sees numpy's
buffers, unlike tracemalloc), reported in total and above the resident size after imports and warm-up.

For comparison, the classic way (scikit-learn's roc_auc_score, average_precision_score and precision_recall_curve
on the flattened pixels, plus the AnomalyCLIP-style 200-threshold AUPRO loop with skimage regions) is run on a
subset of one category and scaled linearly to the benchmark's pixel count.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from visualad_hf.metrics import AnomalyMetrics, pixel_metrics

# MVTec AD test split: (category, normal images, anomalous images) -> 1,725 images, 1,258 anomalous.
MVTEC_TEST = [
    ("bottle", 20, 63), ("cable", 58, 92), ("capsule", 23, 109), ("carpet", 28, 89), ("grid", 21, 57),
    ("hazelnut", 40, 70), ("leather", 32, 92), ("metal_nut", 22, 93), ("pill", 26, 141), ("screw", 41, 119),
    ("tile", 33, 84), ("toothbrush", 12, 30), ("transistor", 60, 40), ("wood", 19, 60), ("zipper", 32, 119),
]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {memory:.0f} GiB RAM, "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
    )


def synthetic_batch(rng: np.random.Generator, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps like the model's (a 37x37 grid of values upsampled bilinearly) with raised, noisy defect regions.

    Anomalous images get 1-3 elliptic defects whose areas are log-uniform between 0.05 % and 8 % of the image
    (MVTec's defects range from a few dozen pixels to large parts of the object).
    """
    count = len(labels)
    grid = torch.from_numpy(rng.normal(size=(count, 1, 37, 37)).astype(np.float32))
    maps = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    masks = np.zeros((count, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size]
    for index in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            area = size * size * 10 ** rng.uniform(np.log10(5e-4), np.log10(8e-2))
            aspect = rng.uniform(0.3, 1.0)
            ry = np.sqrt(area / np.pi * aspect)
            rx = area / np.pi / ry
            cy, cx = rng.uniform(0, size, 2)
            masks[index] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        maps[index] += masks[index] * rng.uniform(0.5, 2.0)
    maps += rng.normal(scale=0.1, size=maps.shape).astype(np.float32)
    return maps, masks


def category_plan(scale: float) -> list[tuple[str, int, int]]:
    return [(name, max(1, round(good * scale)), max(1, round(bad * scale))) for name, good, bad in MVTEC_TEST]


def run_suite(args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(args.seed)
    metrics = AnomalyMetrics(storage_dir=args.storage_dir, aupro_method=args.aupro)
    accumulate = generate = accumulate_cpu = 0.0
    num_maps = num_pixels = 0
    for name, good, bad in category_plan(args.scale):
        labels_all = np.r_[np.zeros(good, int), np.ones(bad, int)]
        rng.shuffle(labels_all)
        for start in range(0, len(labels_all), args.batch_size):
            labels = labels_all[start : start + args.batch_size]
            tic = time.perf_counter()
            maps, masks = synthetic_batch(rng, labels, args.size)
            scores = maps.reshape(len(labels), -1).max(axis=1)
            generate += time.perf_counter() - tic
            tic, cpu = time.perf_counter(), time.process_time()
            metrics.add_batch(scores, labels, maps, masks, categories=name)
            accumulate += time.perf_counter() - tic
            accumulate_cpu += time.process_time() - cpu
            num_maps += len(labels)
            num_pixels += maps.size
    tic, cpu = time.perf_counter(), time.process_time()
    result = metrics.compute(num_workers=args.metric_workers)
    compute, compute_cpu = time.perf_counter() - tic, time.process_time() - cpu
    print(result.format_table())
    metrics.reset()
    return {
        "maps": num_maps, "pixels": num_pixels, "generate_s": generate, "accumulate_s": accumulate,
        "compute_s": compute, "suite_s": accumulate + compute, "suite_cpu_s": accumulate_cpu + compute_cpu,
    }


def classic_suite(maps: np.ndarray, masks: np.ndarray, steps: int = 200, limit: float = 0.3) -> dict[str, float]:
    """scikit-learn pixel AUROC/AP/F1-max and the 200-threshold AUPRO loop, as many projects compute them."""
    labels, scores = masks.ravel(), maps.ravel()
    values = {"auroc": roc_auc_score(labels, scores), "ap": average_precision_score(labels, scores)}
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    values["f1_max"] = float(f1.max())
    low, high = maps.min(), maps.max()
    fprs, pros = [], []
    region_sets = [measure.regionprops(measure.label(mask)) for mask in masks]
    inverse = ~masks
    for threshold in np.arange(low, high, (high - low) / steps):
        predicted = maps > threshold
        per_region = [
            predicted[i][region.coords[:, 0], region.coords[:, 1]].sum() / region.area
            for i, regions in enumerate(region_sets)
            for region in regions
        ]
        fprs.append(np.logical_and(inverse, predicted).sum() / inverse.sum())
        pros.append(np.mean(per_region))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    values["aupro_classic"] = auc(fprs[keep] / fprs[keep].max(), pros[keep])
    return values


def run_classic(args: argparse.Namespace, total_pixels: int) -> None:
    rng = np.random.default_rng(args.seed + 1)
    labels = np.r_[np.zeros(args.classic_maps // 4, int), np.ones(args.classic_maps - args.classic_maps // 4, int)]
    maps, masks = synthetic_batch(rng, labels, args.size)
    tic = time.process_time()
    classic = classic_suite(maps, masks)
    seconds = time.process_time() - tic
    scale = total_pixels / maps.size
    tic = time.process_time()
    ours = pixel_metrics(maps, masks)
    ours_classic = pixel_metrics(maps, masks, aupro_method="classic")
    ours_seconds = time.process_time() - tic
    print(f"\nClassic suite on {len(maps)} maps: {seconds:.1f} s CPU -> scaled x{scale:.0f} to the benchmark: "
          f"{seconds * scale / 60:.1f} min CPU (pixel metrics only; linear scaling, optimistic for the sorts)")
    print(f"Same subset with visualad_hf.metrics (exact and classic AUPRO): {ours_seconds:.2f} s CPU")
    print("Agreement on the subset: "
          f"AUROC {abs(ours['auroc'] - classic['auroc']):.1e}, AP {abs(ours['ap'] - classic['ap']):.1e}, "
          f"F1-max {abs(ours['f1_max'] - classic['f1_max']):.1e}, "
          f"classic AUPRO {abs(ours_classic['aupro'] - classic['aupro_classic']):.1e}; "
          f"exact AUPRO {ours['aupro']:.4f} vs 200-threshold {classic['aupro_classic']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of MVTec's image counts (1.0 = 1,725 maps)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--metric-workers", type=int, default=2, help="threads for compute()")
    parser.add_argument("--storage-dir", default=None, help="spill pixel data to .npy files here")
    parser.add_argument("--aupro", choices=("exact", "classic"), default="exact")
    parser.add_argument("--classic-maps", type=int, default=8, help="maps in the classic-suite subset (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    print(f"Machine: {machine()}")
    print(f"Settings: scale {args.scale}, maps {args.size}x{args.size}, batch {args.batch_size}, "
          f"metric workers {args.metric_workers}, AUPRO {args.aupro}, storage {args.storage_dir or 'memory'}\n")
    warm_maps, warm_masks = synthetic_batch(np.random.default_rng(1), np.array([0, 1]), 64)
    pixel_metrics(warm_maps, warm_masks)
    baseline = current_rss_gib()
    load_before = f"{os.getloadavg()[0]:.1f}"
    figures = run_suite(args)
    peak = peak_rss_gib()
    print(
        f"\n{figures['maps']} maps, {figures['pixels'] / 1e6:.0f} M pixels: metric suite {figures['suite_s']:.1f} s "
        f"(add_batch {figures['accumulate_s']:.1f} s + compute {figures['compute_s']:.1f} s), "
        f"CPU time {figures['suite_cpu_s']:.1f} s over all threads; map generation {figures['generate_s']:.1f} s, "
        f"not counted; load average before/after {load_before} / {os.getloadavg()[0]:.1f}"
    )
    print(f"Peak memory (ru_maxrss): {peak:.2f} GiB in total, {peak - baseline:.2f} GiB above the "
          f"{baseline:.2f} GiB after imports (maps are generated one batch at a time)")
    if args.classic_maps:
        run_classic(args, figures["pixels"])


if __name__ == "__main__":
    main()
