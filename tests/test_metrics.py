"""Metrics against scikit-learn, brute force and slow, obviously-correct references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from visualad_hf.metrics import (
    AnomalyMetrics,
    aupro,
    auroc,
    average_precision,
    f1_max,
    f1_max_threshold,
    image_metrics,
    pixel_metrics,
)


# ------------------------------------------------------------------------------------------------------ data
def scores_and_labels(seed: int, n: int = 400, tied: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.35
    scores = rng.normal(size=n) + 0.8 * labels
    if tied:
        scores = np.round(scores * 3) / 3  # a dozen distinct values, ties across classes
    return scores, labels.astype(int)


def maps_and_masks(seed: int, n: int = 6, size: int = 24, levels: int | None = 12) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random maps (quantised to `levels` values -> many ties) and masks with several regions per image,
    some touching only by a corner, plus normal images with empty masks."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.85)
    masks[0] = False  # a normal image
    masks[1, 2, 2] = masks[1, 3, 3] = True  # diagonal neighbours: one region under 8-connectivity
    maps = (noise + rng.normal(scale=0.05, size=noise.shape)).astype(np.float32)
    if levels is not None:
        lo, hi = maps.min(), maps.max()
        maps = (np.round((maps - lo) / (hi - lo) * levels) / levels).astype(np.float32)
    return maps, masks


# ------------------------------------------------------------------------------------------------ references
def brute_force_f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    best, best_threshold = -1.0, None
    for threshold in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= threshold
        tp = np.sum(predicted & (labels == 1))
        precision = tp / predicted.sum()
        recall = tp / (labels == 1).sum()
        f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
        if f1 > best:
            best, best_threshold = f1, threshold
    return best, best_threshold


def regions_of(masks: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(image index, boolean region mask) for every 8-connected region (skimage, independent of the package)."""
    regions = []
    for index, mask in enumerate(masks):
        labelled = measure.label(mask, connectivity=2)
        regions += [(index, labelled == value) for value in range(1, labelled.max() + 1)]
    return regions


def area_to(points: list[tuple[float, float]], limit: float) -> float:
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """PRO and FPR at every distinct score, from (0, 0) down to the lowest score, integrated to `limit`."""
    regions = regions_of(masks)
    points = [(0.0, 0.0)]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        predicted = maps >= threshold
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        fpr = (predicted & ~masks).sum() / (~masks).sum()
        points.append((fpr, pro))
    return area_to(points, limit) / limit


def classic_aupro_loop(
    maps: np.ndarray, masks: np.ndarray, limit: float = 0.3, steps: int = 200, *, by_max_only: bool = False
) -> float:
    """AnomalyCLIP's `cal_pro_score` as SPEC §7 states it, written plainly (skimage regions, a Python loop)."""
    low, high = maps.min(), maps.max()
    delta = (high - low) / steps
    fprs, pros = [], []
    for threshold in np.arange(low, high, delta):
        predicted = maps > threshold
        per_region = []
        for index, mask in enumerate(masks):
            for region in measure.regionprops(measure.label(mask)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                per_region.append(predicted[index][rows, cols].sum() / region.area)
        fprs.append(np.logical_and(~masks, predicted).sum() / (~masks).sum())
        pros.append(np.mean(per_region))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    fprs, pros = fprs[keep], pros[keep]
    if by_max_only:  # what the first release did instead
        return auc(fprs / fprs.max(), pros)
    return auc((fprs - fprs.min()) / (fprs.max() - fprs.min()), pros)


# --------------------------------------------------------------------------------------------------- image-level
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_ap_equal_sklearn(seed, tied):
    scores, labels = scores_and_labels(seed, tied=tied)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_extreme_ties_and_perfect_separation():
    labels = np.array([0, 1, 0, 1, 1, 0])
    constant = np.full(6, 0.5)
    assert auroc(constant, labels) == roc_auc_score(labels, constant) == 0.5
    assert average_precision(constant, labels) == pytest.approx(average_precision_score(labels, constant))
    separated = labels * 2.0 - 1
    assert auroc(separated, labels) == 1.0 and average_precision(separated, labels) == 1.0
    assert auroc(-separated, labels) == 0.0


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_equals_brute_force(seed, tied):
    scores, labels = scores_and_labels(seed, n=150, tied=tied)
    best, threshold = f1_max_threshold(scores, labels)
    expected_best, expected_threshold = brute_force_f1_max(scores, labels)
    assert best == pytest.approx(expected_best, abs=1e-12)
    assert threshold == expected_threshold
    assert f1_max(scores, labels) == best


def test_image_metrics_accepts_torch_and_lists():
    scores, labels = scores_and_labels(3)
    expected = image_metrics(scores, labels)
    assert image_metrics(torch.tensor(scores), torch.tensor(labels)) == expected
    assert image_metrics(scores.tolist(), labels.astype(bool).tolist()) == expected
    assert set(expected) == {"auroc", "f1_max", "ap"}


def test_single_class_is_undefined_not_a_crash():
    assert image_metrics([0.1, 0.7, 0.3], [1, 1, 1]) == {"auroc": None, "f1_max": None, "ap": None}
    with pytest.raises(ValueError, match="both normal"):
        auroc([0.1, 0.7], [0, 0])
    with pytest.raises(ValueError, match="both normal"):
        f1_max_threshold([0.1, 0.7], [1, 1])


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, float("nan"), 0.3], [0, 1, 1], "NaN"),
        ([0.1, 0.2, 0.3], [0, 2, 1], "0 \\(normal\\) or 1"),
        ([0.1, 0.2, 0.3], [0, 1], "has 2 entries"),
        (["a", "b"], [0, 1], "numbers"),
    ],
)
def test_bad_input_is_named(scores, labels, message):
    with pytest.raises((ValueError, TypeError), match=message):
        auroc(scores, labels)


# --------------------------------------------------------------------------------------------------- pixel-level
@pytest.mark.parametrize("levels", [None, 12, 3])
def test_pixel_auroc_ap_f1_equal_references(levels):
    maps, masks = maps_and_masks(0, levels=levels)
    metrics = pixel_metrics(maps, masks)
    flat_scores, flat_labels = maps.ravel(), masks.ravel().astype(int)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(flat_labels, flat_scores), abs=1e-9)
    assert metrics["ap"] == pytest.approx(average_precision_score(flat_labels, flat_scores), abs=1e-9)
    assert metrics["f1_max"] == pytest.approx(brute_force_f1_max(flat_scores, flat_labels)[0], abs=1e-12)


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, 12), (2, 4)])
def test_exact_aupro_equals_reference(seed, levels, limit):
    maps, masks = maps_and_masks(seed, n=5, size=20, levels=levels)
    assert len(regions_of(masks)) >= 4
    expected = reference_aupro(maps, masks, limit)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-10)
    assert pixel_metrics(maps, masks, fpr_limit=limit)["aupro"] == pytest.approx(expected, abs=1e-10)


def test_exact_aupro_ties_between_normal_and_anomalous_pixels():
    # Every score is shared by normal and anomalous pixels: the curve has only diagonal steps.
    maps = np.array([[[0.9, 0.9, 0.1], [0.5, 0.5, 0.1], [0.9, 0.1, 0.5]]], dtype=np.float32)
    masks = np.array([[[1, 0, 0], [1, 0, 1], [0, 0, 1]]], dtype=bool)
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx(reference_aupro(maps, masks, 0.5), abs=1e-12)


def test_regions_are_8_connected():
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # one region (corner contact), 2 px
    masks[0, 4, 4] = True  # a second region, 1 px
    maps = np.zeros((1, 6, 6), np.float32)
    maps[0, 1, 1] = 1.0  # half of region one found first, region two last
    # Thresholds 1.0 -> PRO (0.5 + 0)/2 = 0.25 at FPR 0; then everything at FPR 1.
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(reference_aupro(maps, masks, 1.0))
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx((0.25 + 1.0) / 2)


@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, 12)])
def test_classic_aupro_equals_the_loop(seed, levels):
    maps, masks = maps_and_masks(seed, n=4, size=16, levels=levels)
    expected = classic_aupro_loop(maps, masks)
    assert aupro(maps, masks, method="classic") == pytest.approx(expected, abs=1e-12)
    assert pixel_metrics(maps, masks, aupro_method="classic")["aupro"] == pytest.approx(expected, abs=1e-12)


def normal_pixels_above_anomalous(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps where some normal pixels score above every anomalous one: the lowest kept FPR is then above 0, which is
    where `(f - fmin) / (fmax - fmin)` and `f / fmax` disagree."""
    maps, masks = maps_and_masks(seed, n=4, size=16, levels=None)
    rng = np.random.default_rng(seed)
    hot = ~masks & (rng.random(masks.shape) < 0.1)  # 10 % of the normal pixels: above every anomalous score
    maps = np.where(hot, maps.max() + 1.0, maps).astype(np.float32)
    return maps, masks


@pytest.mark.parametrize("seed", [0, 3])
def test_classic_aupro_rescales_by_the_smallest_and_largest_kept_fpr(seed):
    maps, masks = normal_pixels_above_anomalous(seed)
    assert maps[~masks].max() > maps[masks].max()
    expected = classic_aupro_loop(maps, masks)
    assert aupro(maps, masks, method="classic") == pytest.approx(expected, abs=1e-12)
    # the formula the first release used (divide by the largest kept FPR) gives another number on such maps
    assert abs(classic_aupro_loop(maps, masks, by_max_only=True) - expected) > 0.05


def test_classic_aupro_undefined_when_every_kept_fpr_is_equal():
    # Two anomalous pixels, normal pixels at 0 and 1: every threshold below the top has FPR 0.5, above none kept.
    maps = np.array([[[0.0, 1.0], [0.5, 0.5]]], np.float32)
    masks = np.array([[[0, 0], [1, 1]]], bool)
    assert pixel_metrics(maps, masks, aupro_method="classic", fpr_limit=0.6)["aupro"] is None
    with pytest.raises(ValueError, match="fmax - fmin"):
        aupro(maps, masks, fpr_limit=0.6, method="classic")


def test_metrics_stay_in_the_unit_interval_and_zero_is_not_negative():
    # A perfect ranking of 9 distinct positives: the recall steps sum to 1 + 2e-16 in floating point.
    scores, labels = np.r_[np.arange(9) + 10.0, np.zeros(3)], np.r_[np.ones(9), np.zeros(3)]
    assert average_precision(scores, labels) == 1.0
    assert image_metrics(scores, labels)["ap"] == 1.0
    # Anomalous pixels below every normal one: the classic AUPRO is 0 and must not come out as -0.0.
    maps = np.array([[[0.0, 0.1], [0.5, 0.6]], [[0.7, 0.8], [0.9, 1.0]]], np.float32)
    masks = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], bool)
    value = aupro(maps, masks, method="classic", fpr_limit=1.0)
    assert value == 0.0 and np.copysign(1.0, value) == 1.0
    metrics = AnomalyMetrics(aupro_method="classic", fpr_limit=1.0)
    metrics.add_batch(anomaly_maps=maps, masks=masks)
    assert "-0.0" not in metrics.compute().format_table()


def test_pixel_metrics_edge_cases():
    maps, masks = maps_and_masks(0, n=3)
    empty = np.zeros_like(masks)
    assert pixel_metrics(maps, empty) == {"auroc": None, "f1_max": None, "ap": None, "aupro": None}
    with pytest.raises(ValueError, match="both anomalous and normal"):
        aupro(maps, empty)
    with pytest.raises(ValueError, match="resize the masks"):
        pixel_metrics(maps, masks[:, :-1])
    with pytest.raises(ValueError, match="fpr_limit"):
        pixel_metrics(maps, masks, fpr_limit=0)
    soft = masks * 0.8 + 0.1  # bilinearly resized masks: binarised at 0.5
    assert pixel_metrics(maps, soft) == pixel_metrics(maps, masks)
    assert pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks)) == pixel_metrics(maps, masks)
    assert pixel_metrics(maps[1], masks[1]) == pixel_metrics(maps[1:2], masks[1:2])


def test_negative_zero_ties_with_zero():
    maps = np.array([[[-0.0, 0.0], [1.0, -1.0]]], np.float32)
    masks = np.array([[[1, 0], [1, 0]]], bool)
    assert pixel_metrics(maps, masks)["auroc"] == roc_auc_score(masks.ravel(), maps.ravel())


# ------------------------------------------------------------------------------------------------------ streaming
def benchmark_batches(seed: int = 0):
    """Three categories, uneven batches, categories interleaved within batches."""
    rng = np.random.default_rng(seed)
    maps, masks = maps_and_masks(seed, n=18, size=16)
    labels = masks.reshape(18, -1).any(1).astype(int)
    scores = rng.normal(size=18) + labels
    categories = np.array(["bottle", "cable", "wood"])[rng.integers(0, 3, 18)]
    return maps, masks, labels, scores, categories


def one_shot(maps, masks, labels, scores, categories, method="exact"):
    expected = {}
    for category in dict.fromkeys(categories):
        index = categories == category
        image = image_metrics(scores[index], labels[index])
        pixel = pixel_metrics(maps[index], masks[index], aupro_method=method)
        expected[category] = {f"image_{k}": v for k, v in image.items()} | {f"pixel_{k}": v for k, v in pixel.items()}
    return expected


@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("method", ["exact", "classic"])
def test_streaming_equals_one_shot(tmp_path, spill, method):
    maps, masks, labels, scores, categories = benchmark_batches()
    metrics = AnomalyMetrics(aupro_method=method, storage_dir=tmp_path if spill else None)
    for start, stop in [(0, 5), (5, 6), (6, 13), (13, 18)]:
        part = slice(start, stop)
        metrics.add_batch(scores[part], labels[part], maps[part], masks[part], categories[part].tolist())
    result = metrics.compute(num_workers=2)
    expected = one_shot(maps, masks, labels, scores, categories, method)
    assert result.per_category == expected
    assert list(result.per_category) == list(dict.fromkeys(categories))
    assert result.mean["pixel_aupro"] == pytest.approx(np.mean([m["pixel_aupro"] for m in expected.values()]))
    assert sum(result.num_images.values()) == 18 == len(metrics)
    if spill:
        assert any(tmp_path.rglob("*.npy"))
        metrics.reset()
        assert not any(tmp_path.rglob("*.npy"))


def test_merged_shards_equal_one_accumulator_bit_for_bit():
    maps, masks, labels, scores, categories = benchmark_batches(1)
    whole = AnomalyMetrics()
    whole.add_batch(scores, labels, maps, masks, categories.tolist())
    # shards in a different order: results must not depend on arrival order
    first, second = AnomalyMetrics(), AnomalyMetrics()
    first.add_batch(scores[9:], labels[9:], maps[9:], masks[9:], categories[9:].tolist())
    second.add_batch(scores[:9], labels[:9], maps[:9], masks[:9], categories[:9].tolist())
    merged = second.merge(first).compute(categories=whole.categories)
    assert merged.per_category == whole.compute().per_category


@pytest.mark.parametrize("spill", [False, True])
def test_merge_copies_so_the_states_stay_independent(tmp_path, spill):
    maps, masks, labels, scores, categories = benchmark_batches(2)
    names = categories.tolist()

    def shard(part, folder):
        metrics = AnomalyMetrics(storage_dir=folder if spill else None)
        metrics.add_batch(scores[part], labels[part], maps[part], masks[part], names[part])
        return metrics

    first, second = shard(slice(0, 9), tmp_path / "a"), shard(slice(9, 18), tmp_path / "b")
    whole = shard(slice(0, 18), tmp_path / "c").compute().per_category
    merged = AnomalyMetrics(storage_dir=tmp_path / "m" if spill else None).merge(first).merge(second)
    # later changes to the merged-in objects, even deleting their spilled files, leave the merge unchanged
    second.add_batch(scores[:3], labels[:3], maps[:3], masks[:3], names[:3])
    first.reset()
    second.reset()
    assert merged.compute(categories=list(whole)).per_category == whole
    # and adding to the merged object leaves the others alone
    extra = shard(slice(0, 9), tmp_path / "d")
    before = extra.compute().per_category
    AnomalyMetrics().merge(extra).add_batch(scores[9:], labels[9:], maps[9:], masks[9:], names[9:])
    assert extra.compute().per_category == before


def test_a_bad_batch_stores_nothing():
    maps, masks, labels, scores, _ = benchmark_batches()
    metrics = AnomalyMetrics()
    metrics.add_batch(scores[:4], labels[:4], maps[:4], masks[:4], categories="a")
    before = metrics.compute().per_category
    broken = maps[4:8].copy()
    broken[3, 0, 0] = np.nan  # only the last image, of the second category, is bad
    with pytest.raises(ValueError, match="NaN"):
        metrics.add_batch(scores[4:8], labels[4:8], broken, masks[4:8], categories=["a", "a", "a", "b"])
    assert metrics.categories == ["a"] and len(metrics) == 4
    assert metrics.compute().per_category == before


def test_accumulator_modes_and_errors():
    maps, masks, labels, scores, _ = benchmark_batches()
    pixel_only = AnomalyMetrics()
    pixel_only.add_batch(anomaly_maps=maps, masks=masks, categories="brain")  # labels from the masks
    result = pixel_only.compute()
    assert result.per_category["brain"]["image_auroc"] is None
    assert result.per_category["brain"]["pixel_auroc"] == pixel_metrics(maps, masks)["auroc"]
    assert result.metric_names == ["pixel_auroc", "pixel_f1_max", "pixel_ap", "pixel_aupro"]

    anomalous_only = AnomalyMetrics()  # an anomaly-only dataset: image metrics undefined, pixel metrics fine
    keep = labels == 1
    anomalous_only.add_batch(scores[keep], labels[keep], maps[keep], masks[keep])
    values = anomalous_only.compute().per_category["all"]
    assert values["image_auroc"] is None and values["pixel_aupro"] is not None

    image_only = AnomalyMetrics()
    image_only.add_batch(scores, labels)
    assert image_only.compute().per_category["all"]["image_auroc"] == auroc(scores, labels)

    with pytest.raises(ValueError, match="without masks"):
        AnomalyMetrics().add_batch(scores, labels, anomaly_maps=maps)
    with pytest.raises(ValueError, match="categories for"):
        AnomalyMetrics().add_batch(scores, labels, categories=["a", "b"])
    with pytest.raises(KeyError, match="No data"):
        image_only.compute(categories=["missing"])
    with pytest.raises(ValueError, match="different"):
        AnomalyMetrics().merge(AnomalyMetrics(aupro_method="classic"))


def test_result_tables(tmp_path):
    maps, masks, labels, scores, categories = benchmark_batches()
    metrics = AnomalyMetrics()
    metrics.add_batch(scores, labels, maps, masks, categories.tolist())
    result = metrics.compute(categories=["bottle", "cable", "wood"])
    markdown = result.to_markdown(tmp_path / "table.md")
    lines = markdown.strip().splitlines()
    assert lines[0] == "| Category | I-AUROC | I-F1max | I-AP | P-AUROC | P-F1max | P-AP | P-AUPRO |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["bottle", "cable", "wood", "**Mean**"]
    assert f"{100 * result.per_category['cable']['pixel_aupro']:.1f}" in lines[3]
    csv_text = result.to_csv(tmp_path / "table.csv")
    assert csv_text.splitlines()[0].startswith("category,num_images,image_auroc")
    assert len(csv_text.splitlines()) == 5
    import json

    loaded = json.loads((tmp_path / "r.json").read_text()) if result.to_json(tmp_path / "r.json") else None
    assert loaded["per_category"] == result.per_category and loaded["settings"]["aupro_method"] == "exact"
    assert "Mean" in str(result)


# ------------------------------------------------------------------------------------------------ evaluate adapter
def test_evaluate_adapter_loads_offline_and_matches():
    import evaluate

    from visualad_hf.metrics import METRIC_DIR

    scores, labels = scores_and_labels(4, n=60, tied=True)
    image = evaluate.load(str(METRIC_DIR))
    image.add_batch(predictions=scores[:25], references=labels[:25])
    image.add_batch(predictions=scores[25:], references=labels[25:])
    expected = image_metrics(scores, labels)
    assert image.compute() == {f"image_{k}": pytest.approx(v, abs=1e-12) for k, v in expected.items()}

    maps, masks = maps_and_masks(5, n=3, size=12)
    pixel = evaluate.load(str(METRIC_DIR), "pixel")
    computed = pixel.compute(predictions=list(maps), references=list(masks.astype(np.float32)), aupro_method="classic")
    expected = pixel_metrics(maps, masks, aupro_method="classic")
    assert computed == {f"pixel_{k}": pytest.approx(v, abs=1e-12) for k, v in expected.items()}
    with pytest.raises(ValueError, match="Unknown config"):
        evaluate.load(str(METRIC_DIR), "segmentation")
