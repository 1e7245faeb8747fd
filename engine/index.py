"""Versioned Annoy indexes on disk: build into a new folder, switch a CURRENT pointer atomically, keep 3.

Layout under VSEARCH_DATA_DIR/index/:
    CURRENT                 the name of the version readers use (replaced atomically with os.replace)
    <version>/manifest.json what the index was built with (weights, pooling, dims, counts, catalog)
    <version>/vectors.ann   Annoy index, angular metric, item i = images[i]
    <version>/images.json   [[product_id, image source], ...]
    <version>/products.json {product_id: Product dict}
    <version>/whitening.npz optional whitening (PCA or learned, centred on the catalog) applied to queries and items
    <version>/shapes.npz    optional silhouettes of the images and their mean (engine.shape), for the category vote
    <version>/errors.csv    catalog rows that were not indexed, with line numbers and reasons
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from annoy import AnnoyIndex

from engine.errors import IndexNotReady
from engine.pooling import Whitening
from engine.shape import ShapeSpace
from engine.types import Product

MANIFEST_VERSION = 1
KEEP_VERSIONS = 3
CURRENT_FILE = "CURRENT"
BUILDING_PREFIX = ".building-"
BUILDER_PID_FILE = "builder.pid"


@dataclass(frozen=True)
class Manifest:
    version: str
    created: str
    weights: str  # weights identity, e.g. "imagenet:397923af"
    arch: str
    pooling: str
    whitening: bool
    image_size: int
    dims: int
    products: int
    images: int
    images_failed: int
    catalog_path: str
    catalog_sha256: str
    n_trees: int
    build_seconds: float
    framing: str = "whole"  # "product": catalog images cropped to their product (queries are localised)
    feature_block: int = 5  # the conv block whose output was pooled (VSEARCH_FEATURE_BLOCK)
    whitening_method: str = "pca"  # "pca" (fitted on the catalog), "learned" (the weights'), "off"
    shapes: bool = False  # shapes.npz holds the images' silhouettes (masked pooling; engine.shape)
    manifest_version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def new_version_name() -> str:
    """Sortable by creation time, unique across processes."""
    now = time.time()
    micros = int(now * 1_000_000) % 1_000_000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{micros:06d}Z-" + secrets.token_hex(3)


@dataclass
class LoadedIndex:
    """An index version opened for reading (the Annoy file is memory-mapped)."""

    manifest: Manifest
    annoy: AnnoyIndex
    image_products: list[str]
    image_sources: list[str]
    products: dict[str, Product]
    whitening: Whitening | None
    product_images: dict[str, list[int]]
    shape_space: ShapeSpace | None = None  # with `shapes`: the catalog's mean silhouette, for queries
    shapes: np.ndarray | None = None  # (images, SHAPE_GRID**2) silhouettes, centred and normalised

    @property
    def version(self) -> str:
        return self.manifest.version

    def category_of(self, product_id: str) -> str | None:
        return self.products[product_id].category


class IndexStore:
    def __init__(self, index_dir: Path) -> None:
        self.index_dir = Path(index_dir)

    def current_version(self) -> str | None:
        try:
            name = (self.index_dir / CURRENT_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def versions(self) -> list[str]:
        if not self.index_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.index_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file()
        )

    def read_manifest(self, version: str | None = None) -> Manifest:
        version = version or self.current_version()
        if version is None:
            raise IndexNotReady("No index has been built yet.", "Run `vsearch index CATALOG` first.")
        data = json.loads((self.index_dir / version / "manifest.json").read_text(encoding="utf-8"))
        return Manifest.from_dict(data)

    def start_build(self) -> tuple[str, Path]:
        """A fresh hidden folder to write a new version into; readers never look at it."""
        version = new_version_name()
        tmp = self.index_dir / f"{BUILDING_PREFIX}{version}"
        tmp.mkdir(parents=True)
        try:
            (tmp / BUILDER_PID_FILE).write_text(str(os.getpid()), encoding="ascii")
        except OSError:
            self.abandon(tmp)
            raise
        return version, tmp

    def publish(self, version: str, tmp: Path) -> None:
        """Move a finished build into place, then point CURRENT at it in one atomic rename."""
        final = self.index_dir / version
        (tmp / BUILDER_PID_FILE).unlink(missing_ok=True)
        os.replace(tmp, final)
        _fsync_dir(final)
        pointer_tmp = self.index_dir / f".{CURRENT_FILE}.{secrets.token_hex(4)}"
        pointer_tmp.write_text(version + "\n", encoding="utf-8")
        with pointer_tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(pointer_tmp, self.index_dir / CURRENT_FILE)
        _fsync_dir(self.index_dir)

    def abandon(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def prune(self, keep: int = KEEP_VERSIONS) -> list[str]:
        """Delete all but the newest `keep` versions (never the current one) and stale build folders.

        A process still reading a deleted version keeps working: its Annoy file stays mapped.
        """
        current = self.current_version()
        versions = self.versions()
        doomed = [v for v in versions[:-keep] if v != current] if len(versions) > keep else []
        for version in doomed:
            shutil.rmtree(self.index_dir / version, ignore_errors=True)
        for folder in self.index_dir.glob(f"{BUILDING_PREFIX}*"):
            if _build_is_abandoned(folder):
                shutil.rmtree(folder, ignore_errors=True)
        return doomed

    def load(self, version: str | None = None) -> LoadedIndex:
        version = version or self.current_version()
        if version is None:
            raise IndexNotReady("No index has been built yet.", "Run `vsearch index CATALOG` first.")
        folder = self.index_dir / version
        manifest = self.read_manifest(version)
        annoy = AnnoyIndex(manifest.dims, "angular")
        annoy.load(str(folder / "vectors.ann"), prefault=False)
        images = json.loads((folder / "images.json").read_text(encoding="utf-8"))
        products_raw = json.loads((folder / "products.json").read_text(encoding="utf-8"))
        products = {pid: Product.from_dict(p) for pid, p in products_raw.items()}
        whitening_path = folder / "whitening.npz"
        whitening = Whitening.load(whitening_path) if whitening_path.is_file() else None
        shape_space, shapes = ShapeSpace.load(folder / "shapes.npz") if manifest.shapes else (None, None)
        product_images: dict[str, list[int]] = {}
        for i, (pid, _source) in enumerate(images):
            product_images.setdefault(pid, []).append(i)
        return LoadedIndex(
            manifest=manifest,
            annoy=annoy,
            image_products=[pid for pid, _ in images],
            image_sources=[src for _, src in images],
            products=products,
            whitening=whitening,
            product_images=product_images,
            shape_space=shape_space,
            shapes=shapes,
        )


def write_version_files(
    folder: Path,
    manifest: Manifest,
    vectors,
    image_rows: list[tuple[str, str]],
    products: dict[str, Product],
    whitening: Whitening | None,
    shapes: tuple[ShapeSpace, np.ndarray] | None = None,
) -> None:
    """Write one index version's files into `folder` (the hidden build folder); `shapes`: the shape space and
    the images' silhouettes in it, with a manifest saying `shapes`."""
    annoy = AnnoyIndex(manifest.dims, "angular")
    annoy.set_seed(42)
    for i, vec in enumerate(vectors):
        annoy.add_item(i, vec.tolist())
    annoy.build(manifest.n_trees, n_jobs=-1)
    annoy.save(str(folder / "vectors.ann"))
    annoy.unload()
    (folder / "images.json").write_text(json.dumps([list(r) for r in image_rows]), encoding="utf-8")
    (folder / "products.json").write_text(
        json.dumps({pid: p.to_dict() for pid, p in products.items()}, ensure_ascii=False), encoding="utf-8"
    )
    if whitening is not None:
        whitening.save(folder / "whitening.npz")
    if shapes is not None:
        shapes[0].save(folder / "shapes.npz", shapes[1])
    (folder / "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=2), encoding="utf-8")


def _build_is_abandoned(folder: Path) -> bool:
    """A build folder whose builder process is gone (killed, crashed), or older than a day."""
    try:
        pid = int((folder / BUILDER_PID_FILE).read_text(encoding="ascii"))
    except (OSError, ValueError):
        pid = None
    if pid is not None and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    try:
        return time.time() - folder.stat().st_mtime > 24 * 3600
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
