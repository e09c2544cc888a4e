"""Exact anomaly-detection metrics: AUROC, F1-max, AP and AUPRO, from one sort per call.

Every metric is computed on *all* distinct thresholds, with ties handled as scikit-learn does (a threshold `t`
predicts "anomalous" for scores `>= t`). Instead of sorting every score, the negatives are sorted once and each
distinct positive score is located in them with a binary search: every quantity below changes only at a positive
score (or is linear in between), so that is enough to get the curves exactly and is several times faster than
`sklearn.metrics` on full-resolution pixel sets.

Precision: image scores are compared in float64; pixel scores (anomaly maps) in float32, the precision of the model's
output, which halves the memory of a benchmark's maps. Masks are binarised with `mask > 0.5`.

AUPRO regions are the 8-connected components of each ground-truth mask (the default of `skimage.measure.label` and
of the MVTec AD evaluation code). The PRO at a threshold is the mean, over every region of every image, of the
fraction of the region's pixels at or above it; the FPR is over all normal pixels of all images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

PIXEL_DTYPE = np.float32
"""Precision in which anomaly maps are compared and stored."""

REGION_STRUCTURE = np.ones((3, 3), dtype=bool)
"""8-connectivity: pixels touching by an edge or a corner belong to the same ground-truth region."""

AuproMethod = Literal["exact", "classic"]
AUPRO_METHODS: tuple[str, ...] = ("exact", "classic")
DEFAULT_FPR_LIMIT = 0.3
DEFAULT_NUM_THRESHOLDS = 200


# --------------------------------------------------------------------------------------------------- input handling
def to_numpy(array: Any) -> np.ndarray:
    """A NumPy view of a NumPy array, torch tensor (any device) or nested list."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy() if array.dtype.is_floating_point else array.detach().cpu().numpy()
    return np.asarray(array)


def _check_scores(scores: Any, dtype: np.dtype, name: str) -> np.ndarray:
    scores = to_numpy(scores)
    if scores.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numbers, got dtype {scores.dtype}.")
    scores = scores.astype(dtype, copy=False)
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise ValueError(f"{name} contain {bad} NaN or infinite value(s); metrics need finite scores.")
    # -0.0 and +0.0 compare equal but are different numbers to a sort; adding 0.0 turns -0.0 into +0.0.
    return scores + dtype.type(0)


def _check_labels(labels: Any, size: int, name: str = "labels") -> np.ndarray:
    labels = to_numpy(labels).reshape(-1)
    if labels.size != size:
        raise ValueError(f"{name} has {labels.size} entries but there are {size} scores.")
    if labels.dtype != bool:
        values = np.unique(labels)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name} must be 0 (normal) or 1 (anomalous), found values {values[:10].tolist()}.")
        labels = labels.astype(bool)
    return labels


def binarize_masks(masks: Any) -> np.ndarray:
    """Boolean masks from bool, {0, 1}, {0, 255} or soft (resized) masks: `mask > 0.5`."""
    masks = to_numpy(masks)
    return masks if masks.dtype == bool else masks > 0.5


# ------------------------------------------------------------------------------------------------ the sorted split
@dataclass(frozen=True)
class RankedScores:
    """Scores split by ground truth and sorted: everything the metrics need, in a compact form.

    `positive_weights` (aligned with `positives`) are `1 / size of the pixel's region`; with `num_regions` they give
    the per-region overlap of AUPRO. They are absent for image-level data.
    """

    negatives: np.ndarray
    positives: np.ndarray
    positive_weights: np.ndarray | None = None
    num_regions: int = 0

    @classmethod
    def from_parts(
        cls,
        negatives: np.ndarray,
        positives: np.ndarray,
        region_sizes: np.ndarray | None = None,
        num_regions: int = 0,
        *,
        overwrite: bool = False,
    ) -> RankedScores:
        """Sort unsorted parts (`negatives` in place when `overwrite`). Ties among positives are ordered by weight,
        so the result does not depend on the order in which the data arrived (sharded evaluation gives bit-identical
        metrics)."""
        negatives = _sorted(negatives, overwrite)
        if region_sizes is None:
            return cls(negatives, np.sort(positives))
        weights = 1.0 / region_sizes.astype(np.float64)
        order = np.lexsort((weights, positives))
        return cls(negatives, positives[order], weights[order], num_regions)


def _sorted(values: np.ndarray, overwrite: bool) -> np.ndarray:
    values = values if overwrite else values.copy()
    values.sort()
    return values


def split_image_scores(scores: Any, labels: Any) -> RankedScores:
    """Image scores (float64) split into sorted normal and anomalous scores."""
    scores = _check_scores(scores, np.dtype(np.float64), "scores").reshape(-1)
    labels = _check_labels(labels, scores.size)
    return RankedScores.from_parts(scores[~labels], scores[labels], overwrite=True)


def split_pixel_scores(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Split maps `[B, H, W]` (or `[H, W]`) by their masks into unsorted parts for `RankedScores.from_parts`.

    Returns `(negatives, positives, region_sizes, num_regions)`: normal-pixel scores, anomalous-pixel scores, and for
    every anomalous pixel the size of its 8-connected ground-truth region.
    """
    maps = _check_scores(anomaly_maps, np.dtype(PIXEL_DTYPE), "anomaly maps")
    masks = binarize_masks(masks)
    if maps.shape != masks.shape:
        raise ValueError(
            f"anomaly maps have shape {tuple(maps.shape)} but masks have shape {tuple(masks.shape)}; resize the masks "
            "to the map size (the image processor's input size) before computing pixel metrics."
        )
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.ndim != 3:
        raise ValueError(f"anomaly maps must be [B, H, W] or [H, W], got shape {tuple(maps.shape)}.")
    region_sizes, num_regions = [], 0
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        # Label the mask's bounding box only; its pixels keep their row-major order, as in `maps[masks]`.
        box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        regions, count = ndimage.label(box, structure=REGION_STRUCTURE)
        region_sizes.append(np.bincount(regions.ravel()).astype(np.int32)[regions[box]])
        num_regions += count
    sizes = np.concatenate(region_sizes) if region_sizes else np.zeros(0, np.int32)
    return maps[~masks], maps[masks], sizes, num_regions


def rank_pixel_scores(anomaly_maps: Any, masks: Any) -> RankedScores:
    """`split_pixel_scores` followed by the sort."""
    return RankedScores.from_parts(*split_pixel_scores(anomaly_maps, masks), overwrite=True)


# ---------------------------------------------------------------------------------------------- the threshold sweep
@dataclass(frozen=True)
class _Sweep:
    """Counts at each distinct positive score `t`, in descending order of `t`."""

    thresholds: np.ndarray
    tp: np.ndarray  # positives >= t
    fp: np.ndarray  # negatives >= t
    fp_above: np.ndarray  # negatives > t
    num_positives: int
    num_negatives: int


def _sweep(ranked: RankedScores) -> _Sweep:
    pos, neg = ranked.positives, ranked.negatives
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    thresholds = pos[starts]
    below = np.searchsorted(neg, thresholds, side="left")
    at_or_below = np.searchsorted(neg, thresholds, side="right")
    n_pos, n_neg = pos.size, neg.size
    return _Sweep(
        thresholds=thresholds[::-1],
        tp=(n_pos - starts)[::-1],
        fp=(n_neg - below)[::-1],
        fp_above=(n_neg - at_or_below)[::-1],
        num_positives=n_pos,
        num_negatives=n_neg,
    )


def _is_binary_problem(ranked: RankedScores) -> bool:
    return ranked.positives.size > 0 and ranked.negatives.size > 0


def _auroc(sweep: _Sweep) -> float:
    # Mann-Whitney U with ties counted 1/2: equals the trapezoidal area under the ROC curve. Integer arithmetic.
    below = sweep.num_negatives - sweep.fp
    ties = sweep.fp - sweep.fp_above
    counts = np.diff(sweep.tp, prepend=0)
    doubled_u = int(np.dot(counts, 2 * below + ties))
    return doubled_u / (2.0 * sweep.num_positives * sweep.num_negatives)


def _average_precision(sweep: _Sweep) -> float:
    precision = sweep.tp / (sweep.tp + sweep.fp)
    recall_steps = np.diff(sweep.tp, prepend=0) / sweep.num_positives
    # The recall steps sum to 1 only up to rounding, so a perfect ranking could give 1 + 2e-16.
    return _fraction(float(np.dot(recall_steps, precision)))


def _fraction(value: float) -> float:
    """`value` clipped to [0, 1], with -0.0 turned into 0.0 (a table would print it as "-0.0")."""
    return min(1.0, max(0.0, value)) + 0.0


def _f1_max(sweep: _Sweep) -> tuple[float, float]:
    f1 = 2.0 * sweep.tp / (sweep.tp + sweep.fp + sweep.num_positives)
    best = int(np.argmax(f1))  # first maximum = the highest threshold reaching it
    return float(f1[best]), float(sweep.thresholds[best])


def _pro_at(ranked: RankedScores, num_above: np.ndarray) -> np.ndarray:
    """Per-region overlap when the `num_above` highest-scoring anomalous pixels are predicted anomalous."""
    cumulative = np.concatenate([[0.0], np.cumsum(ranked.positive_weights[::-1])])
    return cumulative[num_above] / ranked.num_regions


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the polyline (x non-decreasing) from x[0] to `limit`, interpolated at the limit."""
    end = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    area = float(np.trapezoid(y[:end], x[:end])) if end > 1 else 0.0
    if end < x.size:
        x0, y0, x1, y1 = x[end - 1], y[end - 1], x[end], y[end]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return area


def _aupro_exact(ranked: RankedScores, sweep: _Sweep, fpr_limit: float) -> float:
    # The PRO/FPR curve over every distinct threshold, with collinear points dropped: between two positive scores
    # only the FPR moves, so the curve is a polyline through, for each positive score t (descending),
    # (FPR(>t), PRO(>t)) and (FPR(>=t), PRO(>=t)), starting at (0, 0) and ending at (1, 1).
    pro = _pro_at(ranked, sweep.tp)
    pro_before = np.concatenate([[0.0], pro[:-1]])
    n_neg = sweep.num_negatives
    x = np.concatenate([[0.0], np.column_stack([sweep.fp_above / n_neg, sweep.fp / n_neg]).ravel(), [1.0]])
    y = np.concatenate([[0.0], np.column_stack([pro_before, pro]).ravel(), [pro[-1]]])
    return _fraction(float(_area_to_limit(x, y, fpr_limit) / fpr_limit))


def _round_down_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The largest `dtype` numbers <= `values`: for x of that dtype, `x > v` iff `x > result`, so sorted arrays can
    be searched without casting them to the wider type."""
    rounded = values.astype(dtype)
    too_high = rounded > values
    rounded[too_high] = np.nextafter(rounded[too_high], dtype.type(-np.inf))
    return rounded


def _aupro_classic(ranked: RankedScores, fpr_limit: float, num_thresholds: int) -> float | None:
    """AnomalyCLIP's `cal_pro_score` (SPEC §7), vectorised: thresholds `np.arange(min, max, (max - min) / n)` in
    the maps' dtype, prediction `score > t`, PRO = mean region overlap, FPR over normal pixels; the points with
    FPR < `fpr_limit` are kept, their FPRs rescaled by `(f - fmin) / (fmax - fmin)`, and `sklearn.metrics.auc`
    integrates PRO over that. None where the formula divides by zero (fmax == fmin, or no point is kept)."""
    from sklearn.metrics import auc

    pos, neg = ranked.positives, ranked.negatives
    low, high = min(pos[0], neg[0]), max(pos[-1], neg[-1])
    if high == low:
        return None
    thresholds = _round_down_to(np.arange(low, high, (high - low) / num_thresholds), neg.dtype)
    fpr = (neg.size - np.searchsorted(neg, thresholds, side="right")) / neg.size
    pro = _pro_at(ranked, pos.size - np.searchsorted(pos, thresholds, side="right"))
    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size == 0 or fpr.max() == fpr.min():
        return None
    # auc() integrates along decreasing FPRs with a sign flip, which can give -0.0.
    return _fraction(float(auc((fpr - fpr.min()) / (fpr.max() - fpr.min()), pro)))


# ------------------------------------------------------------------------------------------------ metric suites
def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}.")


def binary_metrics(ranked: RankedScores) -> dict[str, float | None]:
    """AUROC, F1-max and AP of ranked scores; all None when only one class is present."""
    if not _is_binary_problem(ranked):
        return {"auroc": None, "f1_max": None, "ap": None}
    sweep = _sweep(ranked)
    return {"auroc": _auroc(sweep), "f1_max": _f1_max(sweep)[0], "ap": _average_precision(sweep)}


def ranked_pixel_metrics(
    ranked: RankedScores,
    *,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    aupro_method: AuproMethod = "exact",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
) -> dict[str, float | None]:
    """Pixel AUROC, F1-max, AP and AUPRO of ranked pixel scores (with region weights); None where undefined."""
    _check_fpr_limit(fpr_limit)
    if aupro_method not in AUPRO_METHODS:
        raise ValueError(f"aupro_method must be one of {AUPRO_METHODS}, got {aupro_method!r}.")
    if not _is_binary_problem(ranked):
        return {"auroc": None, "f1_max": None, "ap": None, "aupro": None}
    sweep = _sweep(ranked)
    if aupro_method == "exact":
        aupro = _aupro_exact(ranked, sweep, fpr_limit)
    else:
        aupro = _aupro_classic(ranked, fpr_limit, num_thresholds)
    return {
        "auroc": _auroc(sweep),
        "f1_max": _f1_max(sweep)[0],
        "ap": _average_precision(sweep),
        "aupro": aupro,
    }


def image_metrics(scores: Any, labels: Any) -> dict[str, float | None]:
    """Image AUROC, F1-max and AP; None when the images are all normal or all anomalous."""
    return binary_metrics(split_image_scores(scores, labels))


def pixel_metrics(
    anomaly_maps: Any,
    masks: Any,
    *,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    aupro_method: AuproMethod = "exact",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
) -> dict[str, float | None]:
    """Pixel AUROC, F1-max, AP and AUPRO of maps `[B, H, W]` against masks of the same shape, from one sort.

    `aupro_method="exact"` (default) integrates the PRO curve over every distinct threshold; `"classic"` is
    AnomalyCLIP's 200-threshold formula (see `aupro`). Metrics are None when the
    masks are all empty (or all full).
    """
    return ranked_pixel_metrics(
        rank_pixel_scores(anomaly_maps, masks),
        fpr_limit=fpr_limit,
        aupro_method=aupro_method,
        num_thresholds=num_thresholds,
    )


# ------------------------------------------------------------------------------------------- single-metric functions
def _sweep_of(scores: Any, labels: Any, metric: str) -> _Sweep:
    ranked = split_image_scores(scores, labels)
    if not _is_binary_problem(ranked):
        raise ValueError(
            f"{metric} needs both normal (0) and anomalous (1) samples, got {ranked.negatives.size} normal and "
            f"{ranked.positives.size} anomalous."
        )
    return _sweep(ranked)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (equals `sklearn.metrics.roc_auc_score`)."""
    return _auroc(_sweep_of(scores, labels, "AUROC"))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, the step-wise area under the precision-recall curve (equals
    `sklearn.metrics.average_precision_score`)."""
    return _average_precision(_sweep_of(scores, labels, "AP"))


def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """`(best F1, threshold)`: the maximum F1 over all thresholds, predicting anomalous for `score >= threshold`.

    Among thresholds with the same F1 the highest is returned.
    """
    return _f1_max(_sweep_of(scores, labels, "F1-max"))


def f1_max(scores: Any, labels: Any) -> float:
    """The maximum F1 score over all thresholds."""
    return f1_max_threshold(scores, labels)[0]


def aupro(
    anomaly_maps: Any,
    masks: Any,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    *,
    method: AuproMethod = "exact",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by `fpr_limit` (in [0, 1]).

    `method="exact"` (default): one curve over every distinct threshold, integrated with the trapezoid rule and
    interpolated at `fpr_limit`.

    `method="classic"`: AnomalyCLIP's `cal_pro_score`, exactly (SPEC §7): `num_thresholds` thresholds
    `np.arange(min, max, (max - min) / num_thresholds)` over all pixels' scores, prediction `score > t`, PRO = mean
    overlap of the 8-connected mask regions, FPR over normal pixels; points with FPR < `fpr_limit` are kept, their
    FPRs rescaled to [0, 1] by `(f - fmin) / (fmax - fmin)` and `sklearn.metrics.auc` taken of PRO over them. It is
    not an area up to `fpr_limit`: the stretch below the smallest kept FPR is dropped and the rest stretched to
    [0, 1], so it can differ from the exact value by several points, most where normal pixels score above every
    anomalous one (then fmin > 0).
    """
    ranked = rank_pixel_scores(anomaly_maps, masks)
    if not _is_binary_problem(ranked):
        raise ValueError("AUPRO needs masks with both anomalous and normal pixels.")
    value = ranked_pixel_metrics(ranked, fpr_limit=fpr_limit, aupro_method=method, num_thresholds=num_thresholds)
    if value["aupro"] is None:
        raise ValueError(
            "The classic AUPRO is undefined here: the thresholds with FPR below the limit all have the same FPR "
            "(or there are none), so (f - fmin) / (fmax - fmin) divides by zero."
        )
    return value["aupro"]
