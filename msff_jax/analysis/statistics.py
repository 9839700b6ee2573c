"""Statistics for the study report: per-run measures, spread over seeds, bootstrap
confidence intervals and McNemar's test, computed from per-image predictions.

Why this exists: the paper's tables give one number per model and no error bars, and
several of its ablation gains are one to four points. On a test set of a few thousand
images such a gain can be noise, so the report says how precise each of our figures is
(bootstrap interval over test images, spread over seeds) and whether a difference between
two of our models is significant (McNemar's test on the same images) before it says that
our runs support or contradict one of the paper's claims.

Inputs are plain numpy arrays from a run's final test evaluation: `labels` (int, n) and
`predicted` (int, n, the top-1 class), aligned by image; reading them from disk is done
elsewhere. Only numpy and the standard library are used.

Units: every measure here is a *fraction* in [0, 1] (as in eval_results.json), never
percent; the paper's tables are in percent (points), so multiply by 100 to compare.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

# The keys of `classification_measures`, the same as in eval_results.json.
MEASURES = ("top1", "macro_precision", "macro_recall", "macro_f1")

EXACT = "exact"
CHI2_CC = "chi2_cc"

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
NOT_SIGNIFICANT = "not significant"

# Elements of the (resamples x images) index block the bootstrap gathers at once; bounds
# its memory (about 100 MB) whatever the test-set size. It does not change the result.
_BOOTSTRAP_BLOCK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- inputs


def _check_predictions(labels, predicted, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D integer arrays of one length with classes in [0, num_classes): a misaligned or
    mislabelled array would otherwise give a plausible but wrong figure."""
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    labels = np.asarray(labels)
    predicted = np.asarray(predicted)
    for name, array in (("labels", labels), ("predicted", predicted)):
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integer classes, got dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            raise ValueError(f"{name} has classes outside [0, {num_classes})")
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predicted {predicted.shape} differ in length")
    if labels.size == 0:
        raise ValueError("no test images")
    return labels.astype(np.int64), predicted.astype(np.int64)


# ----------------------------------------------------------------------------- per run


def confusion_matrix(labels, predicted, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows true class, columns predicted."""
    labels, predicted = _check_predictions(labels, predicted, num_classes)
    counts = np.bincount(labels * num_classes + predicted, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def _measures_from_confusions(confusions: np.ndarray) -> dict[str, np.ndarray]:
    """The four measures for a stack (..., K, K) of confusion matrices.

    Per class, with zero_division=0 as scikit-learn: precision = tp / predicted (0 if the
    class is never predicted), recall = tp / support (0 if absent), F1 = 2 tp / (2 tp + fp
    + fn), which equals 2PR / (P + R) and is 0 when tp = 0. Macro = unweighted mean over
    all K classes, including classes absent from both labels and predictions (they score
    0), i.e. sklearn with labels=range(K), as msff_jax's evaluation does.
    """
    confusions = np.asarray(confusions, np.float64)
    true_positives = np.diagonal(confusions, axis1=-2, axis2=-1)
    predicted_count = confusions.sum(-2)
    support = confusions.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted_count > 0, true_positives / predicted_count, 0.0)
        recall = np.where(support > 0, true_positives / support, 0.0)
        denominator = predicted_count + support  # = 2 tp + fp + fn
        f1 = np.where(denominator > 0, 2.0 * true_positives / denominator, 0.0)
    total = confusions.sum((-2, -1))
    return {
        "top1": true_positives.sum(-1) / total,
        "macro_precision": precision.mean(-1),
        "macro_recall": recall.mean(-1),
        "macro_f1": f1.mean(-1),
    }


def classification_measures(labels, predicted, num_classes: int) -> dict[str, float]:
    """Top-1 accuracy and macro precision, recall and F1 of one run, as fractions.

    Keys are MEASURES (as in eval_results.json). The macro averages are scikit-learn's
    `precision_recall_fscore_support(labels, predicted, labels=range(num_classes),
    average='macro', zero_division=0)`: every one of the `num_classes` classes counts,
    including a class that appears neither in `labels` nor in `predicted` (it scores 0).
    Without `labels=`, sklearn would average only over classes present in either array.
    """
    confusion = confusion_matrix(labels, predicted, num_classes)
    return {key: float(value) for key, value in _measures_from_confusions(confusion).items()}


# ----------------------------------------------------------------------------- seeds


@dataclasses.dataclass(frozen=True)
class SeedSummary:
    """Mean and sample standard deviation (ddof=1) of one measure over seeds.

    `std` is None with a single seed (a spread cannot be estimated from one run; None, not
    nan, so that it is written as JSON null and printed as 'n/a', never as a number)."""

    mean: float
    std: Optional[float]
    num_seeds: int


def mean_and_std(values: Iterable[float]) -> SeedSummary:
    """Mean and sample standard deviation (ddof=1, the unbiased variance's root) of one
    measure over seeds; std None for a single seed."""
    values = np.asarray(list(values), np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("need at least one value")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"values must be finite, got {values.tolist()}")
    std = float(values.std(ddof=1)) if values.size > 1 else None
    return SeedSummary(mean=float(values.mean()), std=std, num_seeds=int(values.size))


def summarize_seeds(per_seed: Sequence[Mapping[str, float]],
                    keys: Sequence[str] = MEASURES) -> dict[str, SeedSummary]:
    """For each key, mean and std over seeds of `per_seed` (one mapping per seed, e.g.
    `classification_measures` or eval_results.json). Every seed must have every key."""
    if not per_seed:
        raise ValueError("no seeds")
    summary = {}
    for key in keys:
        missing = [i for i, measures in enumerate(per_seed) if key not in measures]
        if missing:
            raise ValueError(f"seeds {missing} have no {key!r}")
        summary[key] = mean_and_std(float(measures[key]) for measures in per_seed)
    return summary


# ----------------------------------------------------------------------------- bootstrap


@dataclasses.dataclass(frozen=True)
class ConfidenceInterval:
    """A percentile-bootstrap interval for one measure of one run (fractions).

    `estimate` is the measure on the whole test set (not the mean of the resamples);
    `low` and `high` are the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles of
    the measure over `num_resamples` resamples of the test images."""

    estimate: float
    low: float
    high: float
    confidence: float
    num_resamples: int
    seed: int


def bootstrap_confidence_intervals(
    labels, predicted, num_classes: int, *, num_resamples: int = 1000,
    confidence: float = 0.95, seed: int = 0,
) -> dict[str, ConfidenceInterval]:
    """Percentile-bootstrap intervals over test images for one run's "top1" and
    "macro_f1" (the returned dict's keys).

    Why: the interval shows how much a figure could move on another test set of the same
    size drawn from the same distribution; it does not cover the variation between
    training seeds (see `summarize_seeds`).

    Resampling, fixed so that results are reproducible and checkable:
    `rng = np.random.default_rng(seed)`, then for each resample in turn
    `rng.integers(0, n, size=n)` (n images drawn with replacement). Each resample's
    measures come from its confusion matrix (one bincount for a block of resamples), with
    the definitions of `classification_measures`; a class missing from a resample scores
    0 in its macro F1. The interval ends are `np.percentile(..., method='linear')`.
    """
    labels, predicted = _check_predictions(labels, predicted, num_classes)
    if int(num_resamples) != num_resamples or num_resamples < 1:
        raise ValueError(f"num_resamples must be a positive integer, got {num_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n = labels.size
    k2 = num_classes * num_classes
    codes = labels * num_classes + predicted  # one confusion-matrix cell per image
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BOOTSTRAP_BLOCK_ELEMENTS // n)
    top1 = np.empty(num_resamples)
    macro_f1 = np.empty(num_resamples)
    for start in range(0, num_resamples, rows_per_block):
        rows = min(rows_per_block, num_resamples - start)
        index = np.stack([rng.integers(0, n, size=n) for _ in range(rows)])
        cells = codes[index] + (np.arange(rows, dtype=np.int64) * k2)[:, None]
        confusions = np.bincount(cells.ravel(), minlength=rows * k2)
        measures = _measures_from_confusions(confusions.reshape(rows, num_classes, num_classes))
        top1[start:start + rows] = measures["top1"]
        macro_f1[start:start + rows] = measures["macro_f1"]

    point = _measures_from_confusions(
        np.bincount(codes, minlength=k2).reshape(num_classes, num_classes))
    tail = 100.0 * (1.0 - confidence) / 2.0
    intervals = {}
    for key, samples in (("top1", top1), ("macro_f1", macro_f1)):
        low, high = np.percentile(samples, [tail, 100.0 - tail])
        intervals[key] = ConfidenceInterval(
            estimate=float(point[key]), low=float(low), high=float(high),
            confidence=float(confidence), num_resamples=int(num_resamples), seed=int(seed))
    return intervals


# ----------------------------------------------------------------------------- McNemar


@dataclasses.dataclass(frozen=True)
class McNemarResult:
    """McNemar's test of models A and B on the same test images.

    b: images A classified correctly and B wrongly; c: the reverse; n: paired images
    (summed over seeds when pooled). `accuracy_difference` is A's top-1 accuracy minus
    B's as a *fraction* ((b - c) / n; multiply by 100 for points). `method` is EXACT
    (two-sided binomial) or CHI2_CC (chi-square with continuity correction)."""

    b: int
    c: int
    n: int
    accuracy_a: float
    accuracy_b: float
    accuracy_difference: float
    p_value: float
    method: str
    num_seeds: int = 1


def _log_sum_exp(values: np.ndarray) -> float:
    peak = float(values.max())
    return peak + math.log(float(np.exp(values - peak).sum()))


def mcnemar_exact_p_value(b: int, c: int) -> float:
    """Exact two-sided p-value: min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2);
    1 when b + c = 0. Summed in log space (math.lgamma and log-sum-exp), so it neither
    overflows nor loses the tail for b + c in the tens of thousands; a p-value below
    about 1e-308 comes back as 0.0."""
    b, c = _check_counts(b, c)
    total = b + c
    if total == 0:
        return 1.0
    smaller = min(b, c)
    log_total_factorial = math.lgamma(total + 1)
    log_terms = np.array([
        log_total_factorial - math.lgamma(k + 1) - math.lgamma(total - k + 1)
        for k in range(smaller + 1)
    ])
    log_tail = _log_sum_exp(log_terms) - total * math.log(2.0)
    return min(1.0, math.exp(math.log(2.0) + log_tail))


def mcnemar_chi2_p_value(b: int, c: int) -> float:
    """Chi-square (1 degree of freedom) p-value with continuity correction:
    statistic max(|b - c| - 1, 0)^2 / (b + c), survival function erfc(sqrt(stat / 2));
    1 when b + c = 0. The correction is capped at |b - c| (as scipy's Yates correction
    is), so b = c gives p = 1. An approximation: prefer `mcnemar_exact_p_value` when
    b + c is small (under about 25)."""
    b, c = _check_counts(b, c)
    if b + c == 0:
        return 1.0
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    return math.erfc(math.sqrt(statistic / 2.0))


def _check_counts(b, c) -> tuple[int, int]:
    if int(b) != b or int(c) != c or b < 0 or c < 0:
        raise ValueError(f"b and c must be non-negative integers, got {b!r}, {c!r}")
    return int(b), int(c)


def mcnemar_from_correctness(correct_a, correct_b, *, method: str = EXACT,
                             num_seeds: int = 1) -> McNemarResult:
    """McNemar's test from per-image correctness (boolean arrays aligned by image)."""
    correct_a = np.asarray(correct_a, bool)
    correct_b = np.asarray(correct_b, bool)
    if correct_a.ndim != 1 or correct_a.shape != correct_b.shape or correct_a.size == 0:
        raise ValueError(f"need two non-empty 1-D arrays of one length, got "
                         f"{correct_a.shape} and {correct_b.shape}")
    if method not in (EXACT, CHI2_CC):
        raise ValueError(f"method must be {EXACT!r} or {CHI2_CC!r}, got {method!r}")
    b = int(np.count_nonzero(correct_a & ~correct_b))
    c = int(np.count_nonzero(~correct_a & correct_b))
    n = int(correct_a.size)
    p_value = mcnemar_exact_p_value(b, c) if method == EXACT else mcnemar_chi2_p_value(b, c)
    return McNemarResult(
        b=b, c=c, n=n,
        accuracy_a=float(correct_a.mean()), accuracy_b=float(correct_b.mean()),
        accuracy_difference=(b - c) / n, p_value=p_value, method=method,
        num_seeds=int(num_seeds))


def mcnemar_test(labels, predicted_a, predicted_b, *, method: str = EXACT) -> McNemarResult:
    """McNemar's test of model A against model B on one seed's test images; `labels`,
    `predicted_a` and `predicted_b` are aligned by image."""
    labels = np.asarray(labels)
    predicted_a = np.asarray(predicted_a)
    predicted_b = np.asarray(predicted_b)
    if not (labels.shape == predicted_a.shape == predicted_b.shape) or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape}, predicted_a {predicted_a.shape} and "
                         f"predicted_b {predicted_b.shape} must be 1-D of one length")
    return mcnemar_from_correctness(predicted_a == labels, predicted_b == labels,
                                    method=method)


def pooled_mcnemar_test(runs_a: Sequence[tuple[np.ndarray, np.ndarray]],
                        runs_b: Sequence[tuple[np.ndarray, np.ndarray]], *,
                        method: str = EXACT) -> McNemarResult:
    """McNemar's test pooled over seeds: `runs_a[s]` and `runs_b[s]` are the (labels,
    predicted) of seed s of A and of B, and are paired with each other.

    The choice: the per-image correctness vectors of all seeds are concatenated (seed s
    of A against seed s of B), so b, c and n are sums over seeds and one test is made.
    This uses every run and keeps the pairing by image, but treats the seeds' (correlated)
    answers on one image as independent pairs, so its p-value is somewhat optimistic
    about training-seed variation; read it beside the spread over seeds
    (`summarize_seeds`). Each pair's labels must be equal (the same images in the same
    order): a cheap check that catches most misalignments.
    """
    if len(runs_a) != len(runs_b) or not runs_a:
        raise ValueError(f"need the same, non-zero number of seeds for A and B, got "
                         f"{len(runs_a)} and {len(runs_b)}")
    correct_a, correct_b = [], []
    for seed, ((labels_a, predicted_a), (labels_b, predicted_b)) in enumerate(zip(runs_a, runs_b)):
        labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
        predicted_a, predicted_b = np.asarray(predicted_a), np.asarray(predicted_b)
        if labels_a.shape != labels_b.shape or not np.array_equal(labels_a, labels_b):
            raise ValueError(f"seed pair {seed}: A and B were not evaluated on the same "
                             "images in the same order (their labels differ)")
        if predicted_a.shape != labels_a.shape or predicted_b.shape != labels_b.shape:
            raise ValueError(f"seed pair {seed}: predictions and labels differ in shape")
        correct_a.append(predicted_a == labels_a)
        correct_b.append(predicted_b == labels_b)
    return mcnemar_from_correctness(np.concatenate(correct_a), np.concatenate(correct_b),
                                    method=method, num_seeds=len(runs_a))


# ----------------------------------------------------------------------------- claims


def judge_claim(claimed_gain: float, test: McNemarResult, alpha: float = 0.05) -> str:
    """Whether our runs support a top-1 gain the paper claims for A over B.

    `claimed_gain` is the paper's A minus B (any unit: only its sign is used, e.g. +4.07
    points); `test` compares the same A and B on our test images (McNemar tests top-1
    accuracy, so the claim should be one in top-1, the paper's "Precision"). Returns
    SUPPORTED when our difference has the claimed sign and p < alpha, CONTRADICTED when
    it has the opposite sign and p < alpha, NOT_SIGNIFICANT otherwise (including no
    difference). Not significant is not evidence of no gain: a small test set may be
    unable to resolve a small gain. No correction for testing several claims is made.
    """
    if not math.isfinite(claimed_gain) or claimed_gain == 0:
        raise ValueError(f"claimed_gain must be a non-zero number, got {claimed_gain!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if test.p_value >= alpha or test.b == test.c:
        return NOT_SIGNIFICANT
    same_sign = (test.b > test.c) == (claimed_gain > 0)
    return SUPPORTED if same_sign else CONTRADICTED
