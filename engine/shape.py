"""The product's silhouette from the mask head, for the category vote (pure logic; the maps come from
`engine.features`).

A boot, a sandal and a shoe differ above all in outline, which features trained to ignore crops and
perspective partly give up. The mask head already outlines the product in every image it sees (the
embedding pass of masked pooling runs it), so its map, cropped to the product and shrunk to a small
grid, costs nothing extra. Ranking by it measured worse (it is blind to what a product looks like, and a
second photo from another side has another outline); choosing who votes for the category by it measured
better (README: Quality, "The silhouette in the category vote").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.augment import mask_box
from engine.localize import CleanupParams, padded_box

SHAPE_GRID = 8  # the silhouette's side in cells
SHAPE_CELLS = SHAPE_GRID * SHAPE_GRID


def silhouette(prob: np.ndarray, params: CleanupParams, grid: int = SHAPE_GRID) -> np.ndarray:
    """(grid * grid,) float32: the head's product probabilities over an image's padded square (S, S), cropped
    to the product (the cells at or above `params.threshold`, with `params.margin`), padded to a square
    keeping its aspect and averaged down to grid x grid; all zeros where the mask is not trusted (under
    `params.min_area` or over `params.max_area` of the map)."""
    prob = np.asarray(prob, dtype=np.float32)
    hard = prob >= params.threshold
    if not params.min_area <= float(hard.mean()) <= params.max_area:
        return np.zeros(grid * grid, np.float32)
    box = mask_box(hard)
    assert box is not None  # min_area > 0
    left, top, right, bottom = padded_box(box, params.margin, (prob.shape[1], prob.shape[0]))
    crop = prob[top:bottom, left:right]
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = crop
    return np.asarray(Image.fromarray(square).resize((grid, grid), Image.Resampling.BOX), np.float32).ravel()


def silhouettes(probs: np.ndarray, params: CleanupParams, grid: int = SHAPE_GRID) -> np.ndarray:
    """(N, grid * grid) silhouettes of (N, S, S) probability maps."""
    if not len(probs):
        return np.zeros((0, grid * grid), np.float32)
    return np.stack([silhouette(p, params, grid) for p in probs])


def _trusted(shapes: np.ndarray) -> np.ndarray:
    """(N,) bool: the rows that are silhouettes, not the all-zero row of an untrusted mask."""
    return np.abs(shapes).sum(axis=1) > 0


@dataclass(frozen=True)
class ShapeSpace:
    """Silhouettes centred on the catalog's mean silhouette and L2-normalised, so that their dot product is
    a cosine that tells outlines apart; an untrusted (all-zero) silhouette stays zero: it matches nothing."""

    mean: np.ndarray  # (grid * grid,)

    @classmethod
    def fit(cls, shapes: np.ndarray) -> ShapeSpace:
        shapes = np.asarray(shapes, dtype=np.float32)
        trusted = shapes[_trusted(shapes)]
        return cls((trusted.mean(axis=0) if len(trusted) else np.zeros(shapes.shape[1])).astype(np.float32))

    def apply(self, shapes: np.ndarray) -> np.ndarray:
        shapes = np.asarray(shapes, dtype=np.float32)
        centred = np.where(_trusted(shapes)[:, None], shapes - self.mean, 0.0)
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        return (centred / np.maximum(norms, 1e-12)).astype(np.float32)

    def save(self, path: Path, catalog_shapes: np.ndarray) -> None:
        """The mean and the catalog's shapes (already applied) in one file of an index version."""
        np.savez(path, mean=self.mean, shapes=np.asarray(catalog_shapes, dtype=np.float32))

    @classmethod
    def load(cls, path: Path) -> tuple[ShapeSpace, np.ndarray]:
        with np.load(path) as data:
            return cls(data["mean"].astype(np.float32)), data["shapes"].astype(np.float32)
