"""Retrieval metrics against rankings worked out by hand."""

import numpy as np
import pytest

from sbir_engine.metrics import (
    average_precision,
    bootstrap_interval,
    confusion_matrix,
    hub_share,
    mcnemar_exact,
    retrieval_metrics,
    top_k_accuracy,
    true_class_ranks,
    wilson_interval,
)


def test_average_precision_by_hand():
    # Relevant at ranks 1, 3, 6 of 6: AP = (1/1 + 2/3 + 3/6) / 3.
    assert average_precision([1, 0, 1, 0, 0, 1]) == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    assert average_precision([0, 0, 1]) == pytest.approx(1 / 3)
    assert average_precision([1, 1, 0]) == 1.0
    assert average_precision([0, 0, 0]) == 0.0


def test_retrieval_metrics_on_a_hand_made_ranking():
    gallery = ["cat", "dog", "cat", "dog", "dog"]
    # Query 0 (cat) ranks gallery items 1, 0, 3, 2, 4; query 1 (dog) ranks 1, 3, 4, 0, 2.
    scores = np.array([[0.8, 0.9, 0.2, 0.5, 0.1], [0.3, 0.9, 0.1, 0.8, 0.7]])
    result = retrieval_metrics(scores, ["cat", "dog"], gallery, cutoffs=(2, 4))
    ap_cat = (1 / 2 + 2 / 4) / 2
    assert result["per_query"]["AP"] == pytest.approx([ap_cat, 1.0])
    assert result["mAP@all"] == pytest.approx((ap_cat + 1.0) / 2)
    assert result["P@2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert result["P@4"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert result["per_class"]["cat"]["mAP@all"] == pytest.approx(ap_cat)


def test_classification_helpers():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert top_k_accuracy(probabilities, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(probabilities, labels, 2) == pytest.approx(2 / 3)
    assert true_class_ranks(probabilities, labels).tolist() == [1, 2, 3]
    assert true_class_ranks(probabilities, np.array([2, -1, 2])).tolist() == [2, 0, 1]
    assert top_k_accuracy(probabilities, np.array([-1, -1, -1]), 3) == 0.0  # unknown labels miss
    # Ties take no credit: an untrained (uniform) head is right nowhere, not in an arbitrary third.
    uniform = np.full((3, 3), 1 / 3)
    assert true_class_ranks(uniform, labels).tolist() == [3, 3, 3]
    assert top_k_accuracy(uniform, labels, 1) == 0.0 and top_k_accuracy(uniform, labels, 3) == 1.0
    matrix = confusion_matrix(probabilities.argmax(axis=1), labels, 3)
    assert matrix.tolist() == [[0, 0, 1], [1, 1, 0], [0, 0, 0]]


def test_hub_share_finds_the_dominant_wrong_class():
    gallery = ["chair", "chair", "chair", "laptop"]
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    assert hub_share(scores, ["laptop"], gallery, k=3) == {"laptop": ("chair", 1.0)}


def test_wilson_interval_by_hand():
    # 50 of 100: centre 0.5, half-width 1.96 * sqrt(0.25/100 + 1.96²/(4 * 100²)) / (1 + 1.96²/100).
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    # None or all of 10: the far end is z² / (n + z²) from the edge, not a zero-width interval.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 1.96**2 / (10 + 1.96**2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + 1.96**2), 1.0))
    # 180 of 195 (top-1 0.923 on a 195-sketch test split): about ±3.5 points, ten times the
    # queries about a third of that.
    low, high = wilson_interval(180, 195)
    assert low < 180 / 195 < high and 0.06 < high - low < 0.08
    assert wilson_interval(1800, 1950)[1] - wilson_interval(1800, 1950)[0] < (high - low) / 3
    assert np.isnan(wilson_interval(0, 0)).all()


def test_bootstrap_interval_of_a_mean():
    hits = np.array([1.0] * 180 + [0.0] * 15)
    low, high = bootstrap_interval(hits)
    assert bootstrap_interval(hits) == (low, high)  # seeded
    # For 0/1 values it agrees with the normal approximation, ±1.96 standard errors.
    error = 1.96 * np.sqrt(hits.mean() * (1 - hits.mean()) / len(hits))
    assert low == pytest.approx(hits.mean() - error, abs=0.01)
    assert high == pytest.approx(hits.mean() + error, abs=0.01)
    assert bootstrap_interval([0.7] * 50) == pytest.approx((0.7, 0.7))
    assert np.isnan(bootstrap_interval([])).all()


def test_mcnemar_exact_matches_the_binomial_test():
    from scipy.stats import binomtest

    for only_a, only_b in [(3, 9), (9, 3), (0, 6), (5, 5), (1, 0), (12, 30)]:
        expected = binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) < 0.05 < mcnemar_exact(1, 6)  # 6 to 0 is the least that says "differ"
