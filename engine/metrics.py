"""Retrieval metrics (recall@k, AP@k, mAP@k, precision@k) and brute-force exact nearest neighbours."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

DISTANCES = ("cosine", "euclidean")


def recall_at_k(ranked_ids: Sequence[Sequence[Hashable]], true_ids: Sequence[Hashable], k: int) -> float:
    """Fraction of queries whose true id is among their first k ranked ids (rankings may be shorter than k).

    For product-level retrieval the rankings are product rankings (see `rank_products`) and the true id is
    the query's product.
    """
    _check_k(k)
    if len(ranked_ids) != len(true_ids):
        raise ValueError(f"{len(ranked_ids)} rankings but {len(true_ids)} true ids; give one per query")
    if not ranked_ids:
        raise ValueError("recall@k of no queries is undefined")
    hits = sum(1 for ranked, true in zip(ranked_ids, true_ids, strict=True) if true in list(ranked[:k]))
    return hits / len(ranked_ids)


def average_precision_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int = 10) -> float:
    """AP@k of one ranking against its set of relevant ids.

    AP@k = (sum of precision@i over the ranks i <= k that hold a relevant id, counting each id's first
    occurrence only) / min(k, |relevant|). With a single relevant id at rank r this is 1/r when r <= k,
    else 0, so mAP@k over single-relevant queries equals MRR@k. In product-level same-product retrieval
    the ranking is a product ranking and `relevant` is {the query's product}: one relevant item.
    """
    _check_k(k)
    relevant = set(relevant)
    if not relevant:
        raise ValueError("AP@k needs at least one relevant id")
    seen: set[Hashable] = set()
    hits = 0
    total = 0.0
    for rank, item in enumerate(ranked[:k], start=1):
        if item in relevant and item not in seen:
            hits += 1
            total += hits / rank
        seen.add(item)
    return total / min(k, len(relevant))


def map_at_k(
    ranked_lists: Sequence[Sequence[Hashable]], relevant_sets: Sequence[Collection[Hashable]], k: int = 10
) -> float:
    """Mean of `average_precision_at_k` over queries (one relevant set per ranking)."""
    if len(ranked_lists) != len(relevant_sets):
        raise ValueError(f"{len(ranked_lists)} rankings but {len(relevant_sets)} relevant sets")
    if not ranked_lists:
        raise ValueError("mAP@k of no queries is undefined")
    return float(
        np.mean([average_precision_at_k(r, rel, k) for r, rel in zip(ranked_lists, relevant_sets, strict=True)])
    )


def precision_at_k(ranked_labels: Sequence[Any], query_label: Any, k: int = 5) -> float:
    """Fraction of the first min(k, len(ranked_labels)) labels equal to `query_label` (0 for an empty list)."""
    _check_k(k)
    top = list(ranked_labels[:k])
    if not top:
        return 0.0
    return sum(1 for label in top if label == query_label) / len(top)


def exact_knn(
    queries: np.ndarray,
    base: np.ndarray,
    k: int,
    metric: str = "cosine",
    *,
    chunk_elements: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest rows of `base` for each row of `queries`.

    Returns `(idx, dist)`, both (Q, min(k, N)): int64 indices into `base` and float32 distances, nearest
    first, ties broken by the lower index. Cosine distance is 1 - cosine similarity (vectors are
    normalised here; a zero vector is at distance 1 from everything); Euclidean distance is the plain L2
    distance. Queries are processed in chunks of about `chunk_elements` distances to bound memory.
    """
    if metric not in DISTANCES:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(DISTANCES)}")
    _check_k(k)
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    b = np.atleast_2d(np.asarray(base, dtype=np.float32))
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions but the base has {b.shape[1]}")
    n = b.shape[0]
    if n == 0:
        raise ValueError("the base is empty")
    k = min(k, n)
    if metric == "cosine":
        q, b = _normalise(q), _normalise(b)
    else:
        base_sq = np.einsum("ij,ij->i", b, b)
    rows = max(1, chunk_elements // n)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    dist = np.empty((q.shape[0], k), dtype=np.float32)
    for start in range(0, q.shape[0], rows):
        chunk = q[start : start + rows]
        if metric == "cosine":
            d = 1.0 - chunk @ b.T
        else:
            sq = np.einsum("ij,ij->i", chunk, chunk)[:, None] - 2.0 * (chunk @ b.T) + base_sq[None, :]
            d = np.sqrt(np.maximum(sq, 0.0))
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), d.shape)
        part_d = np.take_along_axis(d, part, axis=1)
        order = np.lexsort((part, part_d), axis=1)  # by distance, then by index
        idx[start : start + rows] = np.take_along_axis(part, order, axis=1)
        dist[start : start + rows] = np.take_along_axis(part_d, order, axis=1)
    return idx, dist


def rank_products(
    image_ids_ranked: Sequence[Hashable],
    image_to_product: Mapping[Any, str] | Sequence[str],
    k: int,
    *,
    exclude: Collection[str] = (),
) -> list[str]:
    """Collapse an image ranking into the first k distinct products (an image's first occurrence wins).

    `image_to_product[image_id]` names each image's product (a list works for integer image ids).
    Products in `exclude` (e.g. the query's own product) are skipped.
    """
    _check_k(k)
    out: list[str] = []
    seen = set(exclude)
    for image_id in image_ids_ranked:
        product = image_to_product[image_id]
        if product in seen:
            continue
        seen.add(product)
        out.append(product)
        if len(out) == k:
            break
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_k(k: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive whole number, got {k!r}")
