"""Pure ranking helpers: image hits -> product matches (a product appears once, at its best image)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProductHit:
    product_id: str
    score: float
    image_index: int


def angular_to_cosine(distance: float) -> float:
    """Annoy's angular distance is sqrt(2 - 2 cos) of the normalised vectors."""
    return 1.0 - distance * distance / 2.0


def best_per_product(
    image_hits: Iterable[tuple[int, float]],
    image_products: Sequence[str],
    limit: int,
    exclude: frozenset[str] = frozenset(),
) -> list[ProductHit]:
    """`image_hits` are (image index, cosine score); keep each product's best image, highest first."""
    best: dict[str, ProductHit] = {}
    for index, score in image_hits:
        pid = image_products[index]
        if pid in exclude:
            continue
        current = best.get(pid)
        if current is None or score > current.score:
            best[pid] = ProductHit(pid, score, index)
    ranked = sorted(best.values(), key=lambda h: (-h.score, h.product_id))
    return ranked[:limit]


def alpha_query_expansion(queries: np.ndarray, index: np.ndarray, neighbours: int = 3, alpha: float = 3.0) -> np.ndarray:
    """Alpha query expansion (Radenović et al.): each query plus its top index vectors weighted by
    similarity**alpha, re-normalised. Rows are L2-normalised; the output is too."""
    sims = queries @ index.T
    n = min(neighbours, index.shape[0])
    top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
    weights = np.clip(np.take_along_axis(sims, top, axis=1), 0, None) ** alpha
    expanded = queries + np.einsum("qn,qnd->qd", weights, index[top])
    return expanded / np.maximum(np.linalg.norm(expanded, axis=1, keepdims=True), 1e-12)
