"""The evaluation's measures and statistics: PSNR, IoU, medians, Spearman's rho, Wilson intervals,
a relation between two centroids, colourfulness and a mask's coverage of a coarse grid."""

from __future__ import annotations

import math

import numpy as np


#: The PSNR of pixels that did not change at all: a finite ceiling, so that a median counts a
#: perfect sample (an untouched background) among the best instead of dropping it as infinite.
PSNR_CEILING_DB = 100.0


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR of ``a`` against ``b`` over the pixels ``where``: NaN (not scored) when there are none,
    `PSNR_CEILING_DB` when they are identical."""
    if not where.any():
        return float("nan")
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2)[where].mean()
    return PSNR_CEILING_DB if mse == 0 else min(PSNR_CEILING_DB, float(10 * np.log10(255.0**2 / mse)))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    return float((a & b).sum() / max(1, (a | b).sum()))


def median(values) -> float | None:
    """The median of the finite values (None and NaN left out); None when there are none."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else None


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equally long sequences (ties get their average rank); NaN
    when either is constant, shorter than 2 or holds a NaN."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"two 1-d sequences of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2 or np.isnan(x).any() or np.isnan(y).any():
        return float("nan")

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v), np.float64)
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # average the ranks of ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def rho_summary(factors, rhos: list[float], curves: list[list[float]]) -> dict:
    """Median / mean of the finite rhos, how many were scored or undefined, the median effect per
    factor, and how large the effect is: per sample the effect at the largest factor minus that at
    the smallest (``median_effect_change``, signed) and the curve's max minus min
    (``median_effect_range``). A rho of +-1 says only that a curve is monotonic; these say whether
    the weight changes the image by more than rounding."""
    finite = [r for r in rhos if np.isfinite(r)]
    whole = [c for c in curves if np.all(np.isfinite(c))]
    return {"median_rho": median(finite), "mean_rho": float(np.mean(finite)) if finite else None,
            "n_scored": len(finite), "n_undefined": len(rhos) - len(finite),
            "median_effect_by_factor": {str(f): median([c[i] for c in curves]) for i, f in enumerate(factors)},
            "median_effect_change": median([float(c[-1] - c[0]) for c in whole]),
            "median_effect_range": median([float(np.max(c) - np.min(c)) for c in whole])}


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (Wilson, 1927) of a rate ``successes / n``: the range of true rates
    that the observation does not reject at the level of ``z`` (1.96: 95%). With 16 samples a rate
    is uncertain by up to +/- 22 points, with 32 by up to +/- 16, which the evaluation tables show."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """Whether object A at centroid ``a`` is ``relation`` object B at ``b`` (``(x, y)`` px, y down):
    the displacement's dominant axis and direction must agree ("next to": horizontal, either side)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    horizontal = abs(dx) > abs(dy)
    if relation == "next to":
        return horizontal
    if relation == "left of":
        return horizontal and dx > 0
    if relation == "right of":
        return horizontal and dx < 0
    if relation == "above":
        return not horizontal and dy > 0
    if relation == "below":
        return not horizontal and dy < 0
    raise ValueError(f"unknown relation {relation!r}")


def colourfulness(image: np.ndarray) -> float:
    """Mean over pixels of the spread between the largest and smallest channel (0 for gray)."""
    img = image.astype(np.float32)
    return float((img.max(-1) - img.min(-1)).mean())


def cell_coverage(mask: np.ndarray, side: int) -> np.ndarray:
    """The share of each cell of a ``side x side`` grid that ``mask`` (64x64 bool) covers."""
    f = mask.shape[0] // side
    return mask.reshape(side, f, side, f).mean((1, 3))  # (side, side)
