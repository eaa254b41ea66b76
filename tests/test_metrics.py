"""Retrieval metrics against rankings worked out by hand."""

import numpy as np
import pytest

from sbir_engine.metrics import (
    average_precision,
    confusion_matrix,
    hub_share,
    retrieval_metrics,
    top_k_accuracy,
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
    assert result["ap"] == pytest.approx([ap_cat, 1.0])
    assert result["mAP@all"] == pytest.approx((ap_cat + 1.0) / 2)
    assert result["P@2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert result["P@4"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert result["per_class"]["cat"]["mAP@all"] == pytest.approx(ap_cat)


def test_classification_helpers():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert top_k_accuracy(probabilities, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(probabilities, labels, 2) == pytest.approx(2 / 3)
    matrix = confusion_matrix(probabilities.argmax(axis=1), labels, 3)
    assert matrix.tolist() == [[0, 0, 1], [1, 1, 0], [0, 0, 0]]


def test_hub_share_finds_the_dominant_wrong_class():
    gallery = ["chair", "chair", "chair", "laptop"]
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    assert hub_share(scores, ["laptop"], gallery, k=3) == {"laptop": ("chair", 1.0)}
