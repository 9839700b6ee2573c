"""msff_jax.analysis.statistics against independent computations (scikit-learn, scipy,
the standard library and small pure-Python references)."""

import math
import statistics as pystats
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import precision_recall_fscore_support

from msff_jax.analysis import statistics as st


def _predictions(n, num_classes, accuracy, seed):
    """Labels and predictions where about `accuracy` of the images are right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    wrong = rng.random(n) > accuracy
    predicted = labels.copy()
    predicted[wrong] = (labels[wrong] + rng.integers(1, num_classes, size=wrong.sum())) % num_classes
    return labels, predicted


# ----------------------------------------------------------------------------- measures


@pytest.mark.parametrize("n,num_classes,accuracy,seed", [
    (500, 15, 0.8, 0), (37, 5, 0.3, 1), (2000, 3, 0.95, 2), (60, 15, 0.5, 3)])
def test_measures_match_sklearn(n, num_classes, accuracy, seed):
    labels, predicted = _predictions(n, num_classes, accuracy, seed)
    ours = st.classification_measures(labels, predicted, num_classes)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(num_classes), average="macro", zero_division=0)
    assert set(ours) == set(st.MEASURES)
    assert ours["top1"] == pytest.approx(np.mean(labels == predicted), abs=1e-12)
    assert ours["macro_precision"] == pytest.approx(precision, abs=1e-12)
    assert ours["macro_recall"] == pytest.approx(recall, abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(f1, abs=1e-12)


def test_measures_with_classes_never_predicted_or_absent():
    # class 2 is never predicted, class 3 appears nowhere, class 0 is predicted but absent
    labels = np.array([1, 1, 2, 2, 1, 4, 4, 4])
    predicted = np.array([1, 0, 1, 0, 1, 4, 4, 0])
    ours = st.classification_measures(labels, predicted, 5)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(5), average="macro", zero_division=0)
    assert (ours["macro_precision"], ours["macro_recall"], ours["macro_f1"]) == pytest.approx(
        (precision, recall, f1), abs=1e-12)
    # by hand: precision (0, 2/3, 0, 0, 1), recall (0, 2/3, 0, 0, 2/3)
    assert ours["macro_precision"] == pytest.approx((2 / 3 + 1) / 5)
    assert ours["macro_recall"] == pytest.approx((2 / 3 + 2 / 3) / 5)
    assert ours["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 5)
    assert ours["top1"] == pytest.approx(4 / 8)


def test_confusion_matrix_rows_are_true_classes():
    confusion = st.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 1], 3)
    np.testing.assert_array_equal(confusion, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])


@pytest.mark.parametrize("labels,predicted,num_classes", [
    ([0, 1], [0, 1, 1], 3),            # lengths differ
    ([0, 3], [0, 1], 3),               # class out of range
    ([0, -1], [0, 1], 3),              # negative class
    ([0.0, 1.0], [0, 1], 3),           # not integers
    ([], [], 3),                       # no images
    ([[0, 1]], [[0, 1]], 3),           # not 1-D
    ([0, 1], [0, 1], 0),               # no classes
])
def test_bad_predictions_are_refused(labels, predicted, num_classes):
    with pytest.raises(ValueError):
        st.classification_measures(np.array(labels), np.array(predicted), num_classes)


# ----------------------------------------------------------------------------- seeds


def test_mean_and_std_over_seeds():
    values = [0.8123, 0.7991, 0.8302, 0.8050]
    summary = st.mean_and_std(values)
    assert summary.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert summary.std == pytest.approx(pystats.stdev(values), abs=1e-15)
    assert summary.std != pytest.approx(np.std(values), abs=1e-6)  # ddof=1, not 0
    assert summary.num_seeds == 4


def test_single_seed_has_no_std():
    summary = st.mean_and_std([0.81])
    assert summary == st.SeedSummary(mean=0.81, std=None, num_seeds=1)


def test_summarize_seeds_per_measure():
    per_seed = [{"top1": 0.8, "macro_precision": 0.7, "macro_recall": 0.6, "macro_f1": 0.65},
                {"top1": 0.9, "macro_precision": 0.75, "macro_recall": 0.62, "macro_f1": 0.7},
                {"top1": 0.85, "macro_precision": 0.71, "macro_recall": 0.7, "macro_f1": 0.66}]
    summary = st.summarize_seeds(per_seed)
    assert set(summary) == set(st.MEASURES)
    for key in st.MEASURES:
        values = [seed[key] for seed in per_seed]
        assert summary[key].mean == pytest.approx(pystats.mean(values), abs=1e-15)
        assert summary[key].std == pytest.approx(pystats.stdev(values), abs=1e-15)
    with pytest.raises(ValueError):
        st.summarize_seeds([{"top1": 0.8}])
    with pytest.raises(ValueError):
        st.summarize_seeds([])
    with pytest.raises(ValueError):
        st.mean_and_std([0.8, float("nan")])


# ----------------------------------------------------------------------------- bootstrap


def _reference_percentile(values, q):
    """Linear-interpolation percentile (numpy's default), written out."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (position - lower) * (ordered[upper] - ordered[lower])


def _reference_bootstrap(labels, predicted, num_classes, num_resamples, seed):
    """The documented resampling, one image at a time, with F1 from precision and recall."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    top1s, f1s = [], []
    for _ in range(num_resamples):
        index = rng.integers(0, n, size=n)
        pairs = [(int(labels[i]), int(predicted[i])) for i in index]
        top1s.append(sum(t == p for t, p in pairs) / n)
        per_class = []
        for k in range(num_classes):
            tp = sum(t == k and p == k for t, p in pairs)
            n_pred = sum(p == k for _, p in pairs)
            n_true = sum(t == k for t, _ in pairs)
            precision = tp / n_pred if n_pred else 0.0
            recall = tp / n_true if n_true else 0.0
            per_class.append(2 * precision * recall / (precision + recall)
                             if precision + recall else 0.0)
        f1s.append(sum(per_class) / num_classes)
    return ({"top1": (_reference_percentile(top1s, 2.5), _reference_percentile(top1s, 97.5)),
             "macro_f1": (_reference_percentile(f1s, 2.5), _reference_percentile(f1s, 97.5))})


def test_bootstrap_matches_pure_python_reference():
    # 6 classes on 40 images: many resamples miss a class, which then scores 0
    labels, predicted = _predictions(40, 6, 0.6, seed=4)
    ours = st.bootstrap_confidence_intervals(labels, predicted, 6, num_resamples=300, seed=11)
    reference = _reference_bootstrap(labels, predicted, 6, 300, seed=11)
    for key in ("top1", "macro_f1"):
        assert (ours[key].low, ours[key].high) == pytest.approx(reference[key], abs=1e-12)
        assert ours[key].num_resamples == 300 and ours[key].seed == 11
        assert ours[key].confidence == 0.95
    assert ours["top1"].estimate == pytest.approx(np.mean(labels == predicted))
    assert ours["macro_f1"].estimate == pytest.approx(
        st.classification_measures(labels, predicted, 6)["macro_f1"])


def test_bootstrap_blocks_do_not_change_the_result(monkeypatch):
    labels, predicted = _predictions(300, 4, 0.7, seed=5)
    whole = st.bootstrap_confidence_intervals(labels, predicted, 4, num_resamples=50, seed=3)
    monkeypatch.setattr(st, "_BOOTSTRAP_BLOCK_ELEMENTS", 300 * 7)  # blocks of 7 resamples
    blocked = st.bootstrap_confidence_intervals(labels, predicted, 4, num_resamples=50, seed=3)
    assert blocked == whole


def test_bootstrap_is_reproducible_and_seeded():
    labels, predicted = _predictions(1000, 15, 0.8, seed=6)
    first = st.bootstrap_confidence_intervals(labels, predicted, 15, seed=7)
    again = st.bootstrap_confidence_intervals(labels, predicted, 15, seed=7)
    other = st.bootstrap_confidence_intervals(labels, predicted, 15, seed=8)
    assert first == again
    assert (first["top1"].low, first["top1"].high) != (other["top1"].low, other["top1"].high)


def test_bootstrap_interval_contains_estimate_and_narrows_with_n():
    small = _predictions(2000, 15, 0.8, seed=9)
    large = (np.tile(small[0], 4), np.tile(small[1], 4))  # same measures, 4x the images
    ci_small = st.bootstrap_confidence_intervals(*small, 15, seed=1)
    ci_large = st.bootstrap_confidence_intervals(*large, 15, seed=1)
    for key in ("top1", "macro_f1"):
        for interval in (ci_small[key], ci_large[key]):
            assert interval.low < interval.estimate < interval.high
        assert ci_small[key].estimate == pytest.approx(ci_large[key].estimate)
        ratio = (ci_large[key].high - ci_large[key].low) / (ci_small[key].high - ci_small[key].low)
        assert 0.4 < ratio < 0.6, ratio  # 1/sqrt(4) = 0.5
    # binomial standard error of top-1: the 95% interval is about +-1.96 of it
    p = ci_small["top1"].estimate
    expected_width = 2 * 1.96 * math.sqrt(p * (1 - p) / 2000)
    assert ci_small["top1"].high - ci_small["top1"].low == pytest.approx(expected_width, rel=0.15)


def test_bootstrap_confidence_level_changes_width():
    labels, predicted = _predictions(1000, 5, 0.75, seed=10)
    wide = st.bootstrap_confidence_intervals(labels, predicted, 5, confidence=0.99)
    narrow = st.bootstrap_confidence_intervals(labels, predicted, 5, confidence=0.5)
    assert narrow["top1"].high - narrow["top1"].low < wide["top1"].high - wide["top1"].low


def test_bootstrap_is_fast():
    labels, predicted = _predictions(5000, 15, 0.85, seed=12)
    start = time.perf_counter()
    st.bootstrap_confidence_intervals(labels, predicted, 15, num_resamples=1000)
    elapsed = time.perf_counter() - start
    # well under a second on an idle core; the margin is for a loaded shared machine
    assert elapsed < 3.0, elapsed


# ----------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize("b,c", [
    (0, 5), (5, 0), (7, 3), (3, 7), (1, 1), (12, 12), (400, 460), (10000, 10300),
    (30, 70), (0, 40)])
def test_exact_p_value_matches_scipy_binomtest(b, c):
    expected = scipy_stats.binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    assert st.mcnemar_exact_p_value(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_exact_p_value_without_discordant_pairs_is_one():
    assert st.mcnemar_exact_p_value(0, 0) == 1.0
    assert st.mcnemar_chi2_p_value(0, 0) == 1.0


def test_exact_p_value_is_stable_for_large_counts():
    p = st.mcnemar_exact_p_value(100000, 101500)
    expected = scipy_stats.binomtest(100000, 201500, 0.5).pvalue
    assert 0.0 < p < 1.0 and p == pytest.approx(expected, rel=1e-8)
    assert st.mcnemar_exact_p_value(3000, 4000) == pytest.approx(
        scipy_stats.binomtest(3000, 7000, 0.5).pvalue, rel=1e-8)  # a p-value near 1e-32


def _chi2_cc_statistic(b, c):
    return max(abs(b - c) - 1, 0) ** 2 / (b + c)


@pytest.mark.parametrize("b,c", [(0, 5), (7, 3), (400, 460), (10000, 10300), (12, 12), (5, 6)])
def test_chi2_p_value_matches_scipy(b, c):
    ours = st.mcnemar_chi2_p_value(b, c)
    assert ours == pytest.approx(scipy_stats.chi2.sf(_chi2_cc_statistic(b, c), 1), rel=1e-9)
    # the same test as a goodness-of-fit of (b, c) to equal halves, each count moved
    # half a unit towards the expected (b + c) / 2 but not past it (Yates)
    shift = min(0.5, abs(b - c) / 2) * np.sign(b - c)
    gof = scipy_stats.chisquare([b - shift, c + shift])
    assert ours == pytest.approx(gof.pvalue, rel=1e-9)


def test_mcnemar_counts_from_predictions():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    pred_a = np.array([0, 1, 2, 0, 1, 0, 0, 2, 2, 1])  # right on 7
    pred_b = np.array([0, 0, 0, 0, 1, 2, 1, 1, 2, 2])  # right on 6
    result = st.mcnemar_test(labels, pred_a, pred_b)
    # A right and B wrong: images 1, 2, 6; A wrong and B right: 5, 7
    assert (result.b, result.c, result.n) == (3, 2, 10)
    assert result.accuracy_a == pytest.approx(0.7) and result.accuracy_b == pytest.approx(0.6)
    assert result.accuracy_difference == pytest.approx(0.1)
    assert result.p_value == pytest.approx(scipy_stats.binomtest(2, 5, 0.5).pvalue)
    assert result.method == st.EXACT and result.num_seeds == 1
    swapped = st.mcnemar_test(labels, pred_b, pred_a)
    assert (swapped.b, swapped.c) == (2, 3)
    assert swapped.accuracy_difference == pytest.approx(-0.1)
    assert swapped.p_value == pytest.approx(result.p_value)
    chi2 = st.mcnemar_test(labels, pred_a, pred_b, method=st.CHI2_CC)
    assert chi2.method == st.CHI2_CC
    assert chi2.p_value == pytest.approx(scipy_stats.chi2.sf(0 / 5, 1))
    with pytest.raises(ValueError):
        st.mcnemar_test(labels, pred_a, pred_b, method="mid-p")


def test_pooled_mcnemar_concatenates_seeds():
    seeds_a, seeds_b, correct_a, correct_b = [], [], [], []
    for seed in range(3):
        labels, pred_a = _predictions(200, 15, 0.85, seed=20 + seed)
        _, pred_b = _predictions(200, 15, 0.75, seed=40 + seed)
        pred_b = np.where(np.random.default_rng(seed).random(200) < 0.75, labels, pred_b)
        seeds_a.append((labels, pred_a))
        seeds_b.append((labels, pred_b))
        correct_a.append(pred_a == labels)
        correct_b.append(pred_b == labels)
    pooled = st.pooled_mcnemar_test(seeds_a, seeds_b)
    all_a, all_b = np.concatenate(correct_a), np.concatenate(correct_b)
    b = int(np.sum(all_a & ~all_b))
    c = int(np.sum(~all_a & all_b))
    assert (pooled.b, pooled.c, pooled.n, pooled.num_seeds) == (b, c, 600, 3)
    assert pooled.b == sum(st.mcnemar_test(l, pa, pb).b
                           for (l, pa), (_, pb) in zip(seeds_a, seeds_b))
    assert pooled.accuracy_difference == pytest.approx(all_a.mean() - all_b.mean())
    assert pooled.p_value == pytest.approx(
        scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)


def test_pooled_mcnemar_refuses_misaligned_seeds():
    labels, pred = _predictions(50, 5, 0.8, seed=30)
    shuffled = np.random.default_rng(0).permutation(50)
    with pytest.raises(ValueError, match="same images"):
        st.pooled_mcnemar_test([(labels, pred)], [(labels[shuffled], pred[shuffled])])
    with pytest.raises(ValueError):
        st.pooled_mcnemar_test([(labels, pred)], [(labels, pred), (labels, pred)])
    with pytest.raises(ValueError):
        st.pooled_mcnemar_test([], [])


# ----------------------------------------------------------------------------- claims


def _result(b, c, n=1000):
    return st.mcnemar_from_correctness(
        np.r_[np.ones(b, bool), np.zeros(c, bool), np.ones(n - b - c, bool)],
        np.r_[np.zeros(b, bool), np.ones(c, bool), np.ones(n - b - c, bool)])


def test_judge_claim():
    a_better = _result(60, 20)  # p about 1e-5
    assert a_better.p_value < 0.001 and a_better.accuracy_difference == pytest.approx(0.04)
    assert st.judge_claim(+4.07, a_better) == st.SUPPORTED
    assert st.judge_claim(-1.24, a_better) == st.CONTRADICTED
    b_better = _result(20, 60)
    assert st.judge_claim(+4.07, b_better) == st.CONTRADICTED
    assert st.judge_claim(-0.5, b_better) == st.SUPPORTED
    close = _result(30, 22)  # p about 0.33
    assert close.p_value > 0.05
    assert st.judge_claim(+4.07, close) == st.NOT_SIGNIFICANT
    assert st.judge_claim(-4.07, close) == st.NOT_SIGNIFICANT
    assert st.judge_claim(+4.07, close, alpha=0.5) == st.SUPPORTED
    assert st.judge_claim(+4.07, _result(10, 10), alpha=0.999) == st.NOT_SIGNIFICANT
    with pytest.raises(ValueError):
        st.judge_claim(0.0, a_better)
