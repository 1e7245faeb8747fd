"""Pure functions that turn VGG16 conv feature maps into compact, comparable vectors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

POOLINGS = ("max", "avg", "gem", "rmac")
GEM_P = 3.0


def l2n(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """L2-normalise rows, so cosine similarity is a dot product."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def max_pool(maps: torch.Tensor) -> torch.Tensor:
    return maps.amax(dim=(2, 3))


def avg_pool(maps: torch.Tensor) -> torch.Tensor:
    return maps.mean(dim=(2, 3))


def gem_pool(maps: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean: p=1 is average, p->inf is max; p=3 is the usual retrieval choice."""
    return maps.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def rmac_regions(h: int, w: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """R-MAC square regions (y, x, size, size) at `levels` scales with ~40% overlap (Tolias et al.)."""
    regions = []
    short = min(h, w)
    for level in range(1, levels + 1):
        size = max(1, int(2 * short / (level + 1)))
        steps_y = max(1, round((h - size) / size * 2.5) + 1) if h > size else 1
        steps_x = max(1, round((w - size) / size * 2.5) + 1) if w > size else 1
        for iy in range(steps_y):
            y = 0 if steps_y == 1 else round(iy * (h - size) / (steps_y - 1))
            for ix in range(steps_x):
                x = 0 if steps_x == 1 else round(ix * (w - size) / (steps_x - 1))
                regions.append((y, x, size, size))
    return regions


def rmac_pool(maps: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Sum of L2-normalised max-pooled regions (without the per-region PCA of the paper)."""
    _, _, h, w = maps.shape
    total = torch.zeros(maps.shape[0], maps.shape[1], dtype=maps.dtype)
    for y, x, sh, sw in rmac_regions(h, w, levels):
        region = maps[:, :, y : y + sh, x : x + sw].amax(dim=(2, 3))
        total += F.normalize(region, dim=1)
    return total


def pool(maps: torch.Tensor, method: str) -> np.ndarray:
    """(N, C, H, W) conv maps -> (N, C) float32 L2-normalised vectors."""
    maps = maps.float()
    if method == "max":
        pooled = max_pool(maps)
    elif method == "avg":
        pooled = avg_pool(maps)
    elif method == "gem":
        pooled = gem_pool(maps)
    elif method == "rmac":
        pooled = rmac_pool(maps)
    else:
        raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLINGS)}")
    return l2n(_to_numpy(pooled))


def raw_flat(maps: torch.Tensor) -> np.ndarray:
    """The seed article's vector: VGG16 conv output after its last 2x2 max-pool, flattened, not normalised."""
    return _to_numpy(F.max_pool2d(maps.float(), 2).flatten(1))


def _inverse_sqrt(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """cov^-1/2 as its eigenvectors, largest eigenvalue first, each scaled by 1/sqrt(eigenvalue + `shrinkage` x
    the mean eigenvalue), so that near-zero directions are not blown up into noise."""
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = np.maximum(eigvals[order], 0), eigvecs[:, order]
    shrink = shrinkage * max(float(eigvals.mean()), 1e-12)
    return eigvecs / np.sqrt(eigvals + shrink)


def learned_projection(anchors: np.ndarray, positives: np.ndarray, shrinkage: float = 0.1) -> np.ndarray:
    """(D, D) whitening learned from matching pairs (Radenović et al.): the inverse square root of the
    covariance of the pairs' differences. Directions in which a catalog image and a photo of the same
    product differ (background, light, crop) are damped; directions that hold steady are kept."""
    a = np.asarray(anchors, dtype=np.float64)
    b = np.asarray(positives, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"learned whitening needs 2 or more pairs of equal shape, got {a.shape} and {b.shape}")
    diff = b - a
    return _inverse_sqrt(diff.T @ diff / len(diff), shrinkage).astype(np.float32)


def category_directions(vectors: np.ndarray, labels: Sequence[str], regularisation: float = 0.1) -> np.ndarray:
    """(D, k) orthonormal basis of the k = classes - 1 directions that best tell the labelled classes of (N, D)
    vectors apart (Fisher's LDA): the span of the inverse within-class covariance (the mean of the classes'
    covariances plus `regularisation` x its mean variance) applied to the differences of the class means."""
    x = np.asarray(vectors, dtype=np.float64)
    of_vector = np.asarray(labels)
    if x.ndim != 2 or of_vector.shape != (len(x),):
        raise ValueError(f"one label per vector needed, got {of_vector.shape} labels for {x.shape}")
    names = sorted(set(of_vector.tolist()))
    members = [x[of_vector == name] for name in names]
    if len(names) < 2 or min(len(m) for m in members) < 2:
        raise ValueError("category directions need 2 or more classes of 2 or more vectors each")
    within = sum(np.cov(m, rowvar=False) for m in members) / len(members)
    within += regularisation * max(float(np.trace(within)) / x.shape[1], 1e-12) * np.eye(x.shape[1])
    means = np.stack([m.mean(axis=0) for m in members])
    spread = np.linalg.solve(within, (means[1:] - means[0]).T)  # (D, classes - 1)
    basis, singular, _ = np.linalg.svd(spread, full_matrices=False)
    return basis[:, singular > singular[0] * 1e-9]


def stretch_directions(projection: np.ndarray, directions: np.ndarray, stretch: float) -> np.ndarray:
    """`projection` followed by scaling the span of the orthonormal `directions` by 1 + `stretch`."""
    p = np.asarray(projection, dtype=np.float64)
    u = np.asarray(directions, dtype=np.float64)
    return (p + stretch * (p @ u) @ u.T).astype(np.float32)


@dataclass(frozen=True)
class Whitening:
    """Whitening of a catalog's vectors: centred on the catalog, then PCA-whitened on its own covariance
    (Jégou & Chum), or projected by a whitening learned from pairs (`learned_projection`)."""

    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D, dims)

    @property
    def dims(self) -> int:
        return int(self.projection.shape[1])

    @classmethod
    def fit(
        cls, vectors: np.ndarray, dims: int | None = None, shrinkage: float = 0.1, learned: np.ndarray | None = None
    ) -> Whitening:
        """Fit on (N, D) L2-normalised vectors.

        `shrinkage` adds a fraction of the mean eigenvalue (of the full spectrum) to every eigenvalue, so
        that the near-zero directions of a small catalog are not blown up into noise. `dims` keeps only the
        leading principal directions (None or >= D: all); the kept ones are whitened exactly as at full dims.
        `learned` (a `learned_projection`) replaces the PCA whitening: the vectors are centred on their mean
        and projected by it; with `dims`, onto the leading principal directions of the projected catalog.
        """
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError("whitening needs at least 2 vectors")
        if dims is not None and dims < 1:
            raise ValueError(f"dims must be at least 1, got {dims}")
        mean = x.mean(axis=0)
        centred = x - mean
        keep = min(dims or x.shape[1], x.shape[1])
        if learned is not None:
            projection = np.asarray(learned, dtype=np.float64)
            if projection.shape != (x.shape[1], x.shape[1]):
                raise ValueError(f"a learned whitening of shape {projection.shape} does not fit {x.shape[1]}-dim vectors")
            if keep < x.shape[1]:
                projected = centred @ projection
                _, rotation = np.linalg.eigh(projected.T @ projected)
                projection = projection @ rotation[:, ::-1][:, :keep]
            return cls(mean=mean.astype(np.float32), projection=projection.astype(np.float32))
        projection = _inverse_sqrt(centred.T @ centred / (x.shape[0] - 1), shrinkage)
        return cls(mean=mean.astype(np.float32), projection=projection[:, :keep].astype(np.float32))

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        return l2n((np.asarray(vectors, dtype=np.float32) - self.mean) @ self.projection)

    def save(self, path) -> None:
        np.savez(path, mean=self.mean, projection=self.projection)

    @classmethod
    def load(cls, path) -> Whitening:
        with np.load(path) as data:
            return cls(mean=data["mean"], projection=data["projection"])
