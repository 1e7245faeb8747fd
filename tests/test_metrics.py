"""Retrieval metrics and exact k-NN against small cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.metrics import (
    average_precision_at_k,
    exact_knn,
    map_at_k,
    precision_at_k,
    rank_products,
    recall_at_k,
)

RANKED = [["a", "b", "c"], ["b", "a", "c"], ["c", "b", "a"]]
TRUE = ["a", "a", "x"]


def test_recall_at_1_and_5():
    # k=1: query 1 has "a" first (hit), query 2 has "b" first (miss), query 3 never has "x" -> 1/3
    assert recall_at_k(RANKED, TRUE, 1) == pytest.approx(1 / 3)
    # k=5: query 1 hit, query 2 hit ("a" at rank 2), query 3 miss -> 2/3
    assert recall_at_k(RANKED, TRUE, 5) == pytest.approx(2 / 3)


def test_recall_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 rankings but 1"):
        recall_at_k([["a"], ["b"]], ["a"], 1)
    with pytest.raises(ValueError, match="no queries"):
        recall_at_k([], [], 1)
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(RANKED, TRUE, 0)


def test_average_precision_by_hand():
    # relevant {a, b}: hits at rank 2 (precision 1/2) and rank 4 (precision 2/4); divide by min(10, 2) = 2
    # -> (0.5 + 0.5) / 2 = 0.5
    assert average_precision_at_k(["x", "a", "y", "b"], {"a", "b"}, k=10) == pytest.approx(0.5)
    # k=2 cuts the list after "a": (1/2) / min(2, 2) = 0.25
    assert average_precision_at_k(["x", "a", "y", "b"], {"a", "b"}, k=2) == pytest.approx(0.25)
    # one relevant item at rank 3 -> 1/3 (mAP with single relevant items is MRR)
    assert average_precision_at_k(["x", "y", "a"], {"a"}, k=10) == pytest.approx(1 / 3)
    # relevant item beyond k -> 0
    assert average_precision_at_k(["x", "y", "a"], {"a"}, k=2) == 0.0
    # a repeated hit counts once: rank 1 precision 1/1, divided by 1 -> 1.0 (not 2.0)
    assert average_precision_at_k(["a", "a"], {"a"}, k=10) == pytest.approx(1.0)


def test_map_at_10_by_hand():
    # (0.5 + 1/3) / 2 = 5/12
    value = map_at_k([["x", "a", "y", "b"], ["x", "y", "a"]], [{"a", "b"}, {"a"}], k=10)
    assert value == pytest.approx(5 / 12)
    with pytest.raises(ValueError, match="relevant"):
        average_precision_at_k(["a"], set(), k=10)


def test_precision_at_5_by_hand():
    # first 5: boot, shoe, boot, boot, sandal -> 3 boots of 5 = 0.6 (the 6th label is ignored)
    labels = ["boot", "shoe", "boot", "boot", "sandal", "boot"]
    assert precision_at_k(labels, "boot", 5) == pytest.approx(0.6)
    # fewer than k results: 1 of the 2 returned = 0.5
    assert precision_at_k(["boot", "shoe"], "boot", 5) == pytest.approx(0.5)
    assert precision_at_k([], "boot", 5) == 0.0


BASE = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=np.float32)


def test_exact_knn_cosine_by_hand():
    # query (2, 0): cosine similarities 1, 0, 1/sqrt(2), -1 -> distances 0, 1, 1 - 0.7071, 2
    idx, dist = exact_knn(np.array([[2.0, 0.0]]), BASE, k=3, metric="cosine")
    assert idx.tolist() == [[0, 2, 1]]
    assert dist[0] == pytest.approx([0.0, 1 - 1 / math.sqrt(2), 1.0], abs=1e-6)


def test_exact_knn_euclidean_by_hand():
    # query (2, 0): distances 1, sqrt(5) = 2.236, sqrt(2) = 1.414, 3
    idx, dist = exact_knn(np.array([[2.0, 0.0]]), BASE, k=4, metric="euclidean")
    assert idx.tolist() == [[0, 2, 1, 3]]
    assert dist[0] == pytest.approx([1.0, math.sqrt(2), math.sqrt(5), 3.0], abs=1e-5)


def test_exact_knn_ties_clamping_and_chunks():
    same = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    for metric in ("cosine", "euclidean"):
        idx, _ = exact_knn(np.array([[1.0, 0.0]]), same, k=10, metric=metric)
        assert idx.tolist() == [[0, 1, 2]]  # equal distances: lower index first; k clamped to 3
    rng = np.random.default_rng(0)
    queries, base = rng.normal(size=(37, 8)), rng.normal(size=(50, 8))
    for metric in ("cosine", "euclidean"):
        whole = exact_knn(queries, base, k=7, metric=metric)
        chunked = exact_knn(queries, base, k=7, metric=metric, chunk_elements=60)  # one query per chunk
        assert np.array_equal(whole[0], chunked[0])
        assert np.allclose(whole[1], chunked[1])
        # against a plain full sort
        if metric == "euclidean":
            full = np.linalg.norm(queries[:, None, :] - base[None, :, :], axis=2)
            assert np.array_equal(whole[0], np.argsort(full, axis=1, kind="stable")[:, :7])


def test_exact_knn_rejects_bad_input():
    with pytest.raises(ValueError, match="dimensions"):
        exact_knn(np.zeros((1, 3)), BASE, k=1)
    with pytest.raises(ValueError, match="unknown metric"):
        exact_knn(np.zeros((1, 2)), BASE, k=1, metric="manhattan")


def test_rank_products_collapses_images():
    image_to_product = ["p1", "p1", "p2", "p3", "p2"]
    # images 3 (p3), 0 (p1), 1 (p1 again), 2 (p2), 4 (p2 again)
    assert rank_products([3, 0, 1, 2, 4], image_to_product, k=10) == ["p3", "p1", "p2"]
    assert rank_products([3, 0, 1, 2, 4], image_to_product, k=2) == ["p3", "p1"]
    assert rank_products([3, 0, 1, 2, 4], image_to_product, k=10, exclude={"p1"}) == ["p3", "p2"]
    assert rank_products(["i2", "i1"], {"i1": "a", "i2": "b"}, k=5) == ["b", "a"]
