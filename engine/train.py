"""`vsearch train`: fine-tune the VGG16 conv stack on a catalog's own images, each product its own class."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import random
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from engine.augment import TRAIN_PARAMS, clean_crop, foreground_mask, photo_like_with_mask
from engine.errors import CatalogError, ImageRejected, VsearchError, WeightsError
from engine.evaluate import PLACEHOLDER_URL, product_label, run_eval, sample_products, split_products
from engine.features import DEFAULT_LOCALIZATION, FeatureExtractor, cpu_has_native_bf16, preprocess
from engine.images import load_image_file
from engine.learned_whitening import fit_learned_whitening, save_learned_whitening
from engine.localize import (
    MASK_PREFIX,
    MASK_STRIDE,
    CleanupParams,
    MaskHead,
    blocks_and_logits,
    catalog_crop,
    clean_images,
    mask_target,
    masked_maps,
    predict_masks,
    up_to_block,
)
from engine.pooling import gem_pool
from engine.settings import learned_whitening_file
from engine.weights import file_sha256, load_weights, random_features, vgg16_features
from indexer.catalog import Catalog, parse_column_map, read_catalog

log = logging.getLogger(__name__)

ARCHS = ("vgg16", "vgg16_bn")
LOSSES = ("nt-xent", "proxy")
PROXY_TEMPERATURE = 0.05  # normalised softmax over product proxies (Zhai & Wu); proxies learn 10x faster
CATEGORY_TEMPERATURE = 0.1  # the category term: normalised softmax over one proxy per catalog category
# Chosen on validation products among 0, 0.5, 2, 4 and 8 (README: Training, runs 2, 5, 6, 8, 7): 8 gains a little
# more category precision but costs cluttered recall; 2 gains most of it and keeps the recall.
DEFAULT_CATEGORY_WEIGHT = 2.0
# The learned whitening's category directions are scaled by 1 + this: the largest stretch that kept cluttered and
# same-product recall on run 6's validation products (README: Training, "The catalog's categories, stretched").
DEFAULT_CATEGORY_STRETCH = 1.0
CHECKPOINT = "checkpoint.pth"
WEIGHTS = "weights.pth"
CARD = "weights.json"
SPLIT = "split.json"
VAL_CATALOG = "val_catalog.csv"
CARD_FORMAT = 1
CLEAN_ANCHOR_SHARE = 0.5  # anchors: half the catalog image as the index sees it, half a mild clean crop
CLUTTER_SHARE = 0.8  # positives: phone-photo-like, most of them pasted on a cluttered background
GREY_SHARE = 0.2  # positives in greyscale (SimCLR's recipe): shape must count, not colour alone
MASK_LOSS_WEIGHT = 1.0  # the mask head's BCE beside the contrastive loss
# How to index with the trained weights: the pooling that was trained, with whitening over all 512 dims,
# which `benchmarks/train_eval.py` measured best with localised queries on the held-out products of the
# README's run; the conv block (`--feature-block`, 4 by default) and the size join them in the model card.
# `EngineSettings.from_env` takes these as defaults from the model card.
INDEX_SETTINGS = {"VSEARCH_POOLING": "gem", "VSEARCH_WHITENING": True, "VSEARCH_INDEX_DIMS": 0}
WARMUP = 0.05  # share of the schedule with a linearly rising learning rate
EXIT_INTERRUPTED = 130
VAL_METRICS = ("photo_r1", "photo_r5", "clean_r1", "clean_r5", "category_p5")  # what validation reports


def index_image_size(train_size: int) -> int:
    """The index and query resolution for weights trained at `train_size`: 10/7 of it in steps of 16, at most
    the engine's 224 (112 -> 160). For the README's 112 px run, 128 to 224 px scored alike on the validation
    products (`benchmarks/train_eval.py --products val --size N`); 160 costs half of 224's model time."""
    return max(32, min(224, 16 * round(train_size * 10 / 7 / 16)))


@dataclass(frozen=True)
class TrainConfig:
    """Everything `vsearch train` needs; `minutes` bounds the whole run (decoding and validation included)."""

    catalog: Path
    out: Path
    weights: str = "imagenet"  # the starting point: VSEARCH_WEIGHTS ("imagenet", "random" or a .pth path)
    epochs: int = 20
    minutes: float | None = None
    image_size: int = 112
    batch_size: int = 32
    arch: str = "auto"  # "auto": vgg16_bn from random init (plain VGG16 does not train from scratch), else the start's
    eval_fraction: float = 0.2
    seed: int = 0
    column_map: Mapping[str, str] | None = None
    workers: int = 1
    resume: bool = False
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    loss: str = "nt-xent"  # or "proxy": one learned proxy per product, normalised softmax
    category_field: str = "category"  # catalog field of the category term ("" : none)
    category_weight: float = DEFAULT_CATEGORY_WEIGHT  # weight of the category term (0: off); on only with 2+ categories
    val_limit: int | None = 200  # eval products used by the per-epoch validation (None: all)
    val_image_size: int | None = None  # None: the index size the model card recommends (index_image_size)
    feature_block: int = 4  # the conv block the index pools (model card: VSEARCH_FEATURE_BLOCK)
    loss_block: int = 5  # the conv block whose GeM the loss trains
    cache_mb: int = 1024
    whitening_products: int = 300  # training products whose pairs fit the learned whitening (0: none)
    # The learned whitening stretches the directions that tell `category_field`'s categories apart (0: not),
    # found on up to `whitening_products` training products of each category.
    category_stretch: float = DEFAULT_CATEGORY_STRETCH
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.minutes is None or self.minutes > 0, f"--minutes must be positive, got {self.minutes}"),
            (32 <= self.image_size <= 1024, f"--image-size must lie in 32..1024, got {self.image_size}"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 (contrastive loss), got {self.batch_size}"),
            (self.arch in ARCHS + ("auto",), f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (0 < self.eval_fraction < 1, f"--eval-fraction must lie strictly between 0 and 1, got {self.eval_fraction}"),
            (self.workers >= 0, f"--workers must be 0 or more, got {self.workers}"),
            (self.val_limit is None or self.val_limit >= 2, f"--val-limit must be at least 2, got {self.val_limit}"),
            (self.cache_mb >= 0, f"--cache-mb must be 0 or more, got {self.cache_mb}"),
            (self.whitening_products == 0 or self.whitening_products >= 2,
             f"--whitening-products must be 0 or at least 2, got {self.whitening_products}"),
            (self.lr > 0 and self.temperature > 0, "--lr and --temperature must be positive"),
            (self.category_weight >= 0, f"--category-weight must be 0 or more, got {self.category_weight}"),
            (self.category_stretch >= 0, f"--category-stretch must be 0 or more, got {self.category_stretch}"),
            (self.feature_block in (4, 5), f"--feature-block must be 4 or 5, got {self.feature_block}"),
            (self.loss_block in (4, 5), f"--loss-block must be 4 or 5, got {self.loss_block}"),
        ]
        for ok, message in checks:
            if not ok:
                raise VsearchError(message, "Run `vsearch train --help` for the accepted values.")


# ---------------------------------------------------------------- model and loss


class Embedder(nn.Module):
    """From one pass: the trained vector (GeM p=3 of conv block `loss_block`'s output, L2-normalised), the mask
    head's logits, and the vector the index holds (the same GeM of conv block `index_block`), which the
    category term trains."""

    def __init__(self, features: nn.Sequential, mask_head: MaskHead, loss_block: int = 5,
                 index_block: int | None = None) -> None:
        super().__init__()
        self.features = features  # kept whole so its state dict is torchvision's `features` layout
        self.mask_head = mask_head
        self.loss_block = loss_block
        self.index_block = index_block or loss_block

    @property
    def embedding_dims(self) -> int:
        return next(m.out_channels for m in reversed(self.features) if isinstance(m, nn.Conv2d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blocks, logits = blocks_and_logits(self.features, self.mask_head, x)
        pooled = {b: F.normalize(gem_pool(blocks[b - 1].float()), dim=1) for b in {self.loss_block, self.index_block}}
        return pooled[self.loss_block], logits, pooled[self.index_block]


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over two views: row i of `a` and row i of `b` are positives, every other row a negative."""
    n = a.shape[0]
    z = torch.cat([a, b]).float()
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def proxy_softmax(
    z: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, temperature: float, ignore_index: int = -100
) -> torch.Tensor:
    """Normalised softmax: each embedding is classified among the proxies (cosine); labels equal to
    `ignore_index` add nothing."""
    logits = F.normalize(z.float(), dim=1) @ F.normalize(proxies.float(), dim=1).T / temperature
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


@dataclass
class CategoryTerm:
    """The catalog's own categories as a second, weaker signal: each view is classified among one learned
    proxy per category (normalised softmax), so that products of a category end up near each other while
    NT-Xent keeps them apart. `of_product[i]`: the category index of training product i, -1 when it has none."""

    names: list[str]
    of_product: torch.Tensor
    proxies: nn.Parameter
    weight: float

    @classmethod
    def of_catalog(cls, categories: Sequence[str], weight: float, dims: int, seed: int) -> CategoryTerm | None:
        """None when the term is off: weight 0, or fewer than 2 categories among the training products."""
        names = sorted({c for c in categories if c})
        if weight <= 0 or len(names) < 2:
            return None
        index = {name: i for i, name in enumerate(names)}
        generator = torch.Generator().manual_seed(seed + 1)
        return cls(names, torch.tensor([index.get(c, -1) for c in categories]),
                   nn.Parameter(torch.randn(len(names), dims, generator=generator)), weight)

    def loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = self.of_product.to(labels.device)[labels]
        if bool((targets < 0).all()):
            return torch.zeros((), device=z.device)
        return proxy_softmax(z, targets, self.proxies, CATEGORY_TEMPERATURE, ignore_index=-1)


def build_features(weights: str, arch: str, seed: int) -> tuple[nn.Sequential, str, str]:
    """The starting conv stack: (features, arch, start id). Random init is seeded and defaults to VGG16-BN."""
    if weights == "random":
        arch = "vgg16_bn" if arch == "auto" else arch
        return random_features(arch, seed), arch, f"random:{arch}:seed{seed}"
    loaded = load_weights(weights)
    if arch not in ("auto", loaded.arch):
        raise WeightsError(
            f"VSEARCH_WEIGHTS={weights} is a {loaded.arch} conv stack; --arch {arch} cannot start from it.",
            f"Drop --arch (or pass --arch {loaded.arch}), or start from VSEARCH_WEIGHTS=random.",
        )
    return loaded.features, loaded.arch, loaded.weights_id


def pick_device() -> tuple[torch.device, str]:
    """(device, precision): CUDA when present, else the CPU; bf16 autocast where the hardware has it."""
    if torch.cuda.is_available():
        return torch.device("cuda"), "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return torch.device("cpu"), "bf16" if cpu_has_native_bf16() else "fp32"


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(
    model: Embedder,
    optimizer: torch.optim.Optimizer,
    a: torch.Tensor,
    b: torch.Tensor,
    masks: torch.Tensor,
    temperature: float,
    precision: str = "fp32",
    labels: torch.Tensor | None = None,
    proxies: torch.Tensor | None = None,
    category: CategoryTerm | None = None,
) -> tuple[float, float, float]:
    """One optimisation step on a batch of view pairs and their product masks (both views, (2N, S/4, S/4)).

    Returns (metric loss, mask loss, category loss): NT-Xent between the two views, or, with `proxies`, the
    normalised softmax of both views against the product proxies (`labels`: each pair's product index);
    with `category`, its weighted term on the index's vector is added (needs `labels`). Both views share one
    forward (batch norm sees them together).
    """
    device = next(model.parameters()).device
    x = torch.cat([a, b]).to(device).contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        z, logits, z_index = model(x)
    if proxies is None:
        contrastive = nt_xent(z[: len(a)], z[len(a) :], temperature)
    else:
        assert labels is not None
        contrastive = proxy_softmax(z, torch.cat([labels, labels]).to(device), proxies, PROXY_TEMPERATURE)
    mask_loss = F.binary_cross_entropy_with_logits(logits.float()[:, 0], masks.to(device))
    total = contrastive + MASK_LOSS_WEIGHT * mask_loss
    category_loss = torch.zeros(())
    if category is not None:
        assert labels is not None
        category_loss = category.loss(z_index, torch.cat([labels, labels]).to(device))
        total = total + category.weight * category_loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return float(contrastive.detach()), float(mask_loss.detach()), float(category_loss.detach())


def lr_factor(progress: float) -> float:
    """Linear warm-up, then cosine decay to zero; `progress` is the share of the schedule done (0..1)."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < WARMUP:
        return max(progress / WARMUP, 0.02)
    return 0.5 * (1 + math.cos(math.pi * (progress - WARMUP) / (1 - WARMUP)))


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainImage:
    product_id: str
    source: str


class ImageCache:
    """Training images decoded once and shrunk to `side`; beyond `max_bytes` the rest are decoded on demand."""

    def __init__(self, images: Sequence[TrainImage], side: int, max_bytes: int, progress: bool = True) -> None:
        self.images = list(images)
        self.side = side
        self.arrays: list[np.ndarray | None] = []
        self.failed: dict[int, str] = {}
        used = 0
        for i, item in enumerate(tqdm(self.images, desc="decoding", unit="img", disable=not progress)):
            if used >= max_bytes:
                self.arrays.append(None)
                continue
            try:
                arr = np.asarray(self._decode(item.source))
            except (ImageRejected, OSError) as exc:
                self.failed[i] = str(exc)
                self.arrays.append(None)
                continue
            used += arr.nbytes
            self.arrays.append(arr)
        self.bytes = used

    def _decode(self, source: str) -> Image.Image:
        img = load_image_file(source, draft_size=2 * self.side)
        img.thumbnail((self.side, self.side), Image.Resampling.BILINEAR)
        return img

    def get(self, i: int) -> Image.Image:
        arr = self.arrays[i]
        return Image.fromarray(arr) if arr is not None else self._decode(self.images[i].source)


@dataclass(frozen=True)
class View:
    image: Image.Image
    mask: Image.Image  # "L", the product's pixels: the mask head's target


def make_views(anchor_img: Image.Image, positive_img: Image.Image, rng: random.Random) -> tuple[View, View]:
    """A catalog-like anchor and a phone-photo-like positive of the same product (training presets)."""
    anchor_img = anchor_img.convert("RGB")
    if rng.random() < CLEAN_ANCHOR_SHARE:
        anchor = catalog_crop(anchor_img)  # as the index sees it (framed on the product, see engine.localize)
    else:
        anchor = clean_crop(anchor_img, rng, params=TRAIN_PARAMS)
    anchor_mask = Image.fromarray(foreground_mask(anchor).astype(np.uint8) * 255)
    positive, positive_mask = photo_like_with_mask(
        positive_img, rng, clutter=rng.random() < CLUTTER_SHARE, params=TRAIN_PARAMS
    )
    if rng.random() < GREY_SHARE:
        positive = positive.convert("L").convert("RGB")
    views = []
    for image, mask in ((anchor, anchor_mask), (positive, positive_mask)):
        if rng.random() < 0.5:
            image, mask = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(View(image, mask))
    return views[0], views[1]


class PairDataset(Dataset):
    """Item i: two augmented views of training product i, seeded by (seed, epoch, product)."""

    def __init__(self, cache: ImageCache, products: Sequence[Sequence[int]], image_size: int, seed: int) -> None:
        self.cache = cache
        self.products = [list(p) for p in products]  # per product: indices into the cache
        self.image_size = image_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.products)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        rng = random.Random(f"train:{self.seed}:{self.epoch}:{i}")
        images = self.products[i]
        a, b = make_views(self.cache.get(rng.choice(images)), self.cache.get(rng.choice(images)), rng)
        size = self.image_size
        return (torch.from_numpy(preprocess(a.image, size)), torch.from_numpy(preprocess(b.image, size)),
                torch.from_numpy(mask_target(a.mask, size)), torch.from_numpy(mask_target(b.mask, size)), i)


def loader(dataset: PairDataset, batch_size: int, workers: int, seed: int, epoch: int) -> DataLoader:
    """A fresh loader per epoch (workers fork with the epoch set); full batches only, for batch norm."""
    dataset.epoch = epoch
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        generator=generator,
        prefetch_factor=4 if workers else None,
    )


# ---------------------------------------------------------------- catalog, split, validation


def read_train_catalog(path: Path, column_map: Mapping[str, str] | None) -> Catalog:
    """The catalog as `vsearch eval` reads it (the shared shoe sets' product_id column is accepted too)."""
    try:
        return read_catalog(path, column_map=column_map, default_url_template=PLACEHOLDER_URL)
    except CatalogError:
        if column_map is not None:
            raise
        return read_catalog(path, column_map={"id": "product_id"}, default_url_template=PLACEHOLDER_URL)


def local_images(catalog: Catalog) -> list[TrainImage]:
    images = [TrainImage(r.product_id, r.source) for r in catalog.images if not r.source.startswith(("http://", "https://"))]
    if not images:
        raise CatalogError(
            f"catalog {catalog.path} has no local image files to train on",
            "vsearch train reads images from disk; give a catalog whose image column holds file paths.",
        )
    return images


def write_val_catalog(catalog: Catalog, eval_ids: Sequence[str], path: Path) -> Path:
    """A catalog of the validation products only (absolute image paths), read by the eval code as any catalog."""
    wanted = set(eval_ids)
    fields = ["id", "title", "url", "image", "category", "brand"]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for ref in catalog.images:
            if ref.product_id not in wanted or ref.source.startswith(("http://", "https://")):
                continue
            p = catalog.products[ref.product_id]
            writer.writerow(
                {"id": p.id, "title": p.title, "url": p.url, "image": ref.source, "category": p.category or "",
                 "brand": p.brand or ""}
            )
    os.replace(tmp, path)
    return path


class ModelExtractor:
    """The training model seen through the eval code's ConvExtractor protocol."""

    def __init__(self, model: Embedder, image_size: int, device: torch.device, precision: str,
                 feature_block: int, localization: str | None = None) -> None:
        self.model = model
        self.feature_block = feature_block
        self.embedder = up_to_block(model.features, feature_block)
        self.localization = localization  # as FeatureExtractor.localization: "crop", "mask" or None
        self.cleanup = CleanupParams()
        self.image_size = image_size
        self.device = device
        self.precision = precision
        self.weights_id = "training"

    def _batch(self, images: Sequence[Image.Image], size: int) -> torch.Tensor:
        batch = torch.from_numpy(np.stack([preprocess(im, size) for im in images]))
        return batch.to(self.device).contiguous(memory_format=torch.channels_last)

    def conv_maps(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = self._batch(images, self.image_size)
        with torch.inference_mode(), _autocast(self.device, self.precision):
            if self.localization == "mask":
                return masked_maps(self.model.features, self.model.mask_head, batch, self.feature_block,
                                   self.cleanup).cpu()
            return self.embedder(batch).float().cpu()

    def frame_catalog_image(self, image: Image.Image) -> Image.Image:
        return catalog_crop(image, self.cleanup.margin)  # both ways of localising frame the index on its products

    def localize(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """As `FeatureExtractor.localize`: with "crop", the mask pass at the training size, then the clean-up."""
        if self.localization != "crop":
            return list(images)
        head = self.model.mask_head
        with torch.inference_mode(), _autocast(self.device, self.precision):
            probs = predict_masks(self.model.features, head, self._batch(images, int(head.image_size)))
        return clean_images(list(images), probs, self.cleanup)


def validation_extractor(
    model: Embedder, image_size: int, device: torch.device, precision: str, feature_block: int, localize: bool = True,
) -> ModelExtractor:
    """What the per-epoch check embeds with: the engine's default way of finding the product (once the head is
    trained, `localize`) and the card's conv block, so that it measures what `Searcher` will run."""
    return ModelExtractor(model, image_size, device, precision, feature_block,
                          DEFAULT_LOCALIZATION if localize else None)


def validate(
    model: Embedder, val_catalog: Path, image_size: int, feature_block: int, seed: int, device: torch.device,
    precision: str, localize: bool = True,
) -> dict[str, float | None]:
    """The index settings the model card recommends (GeM of conv block `feature_block` with whitening fitted on
    the validation catalog, at `image_size`) on the validation products: clean and cluttered photo-like recall
    (eval presets), queries localised by the mask head as `Searcher.search` does (not before training: the
    head is untrained)."""
    was_training = model.training
    model.eval()
    try:
        report = run_eval(
            val_catalog,
            extractor=validation_extractor(model, image_size, device, precision, feature_block, localize),
            seed=seed,
            poolings=("gem",),
            whitening=(False, True),
            include_seed_baseline=False,
            queries=("photo", "clean"),
            localize=localize,
            progress=False,
        )
    finally:
        model.train(was_training)
    by_name = {m.method: m.metrics for m in report.methods}
    metrics = by_name.get("gem+white") or by_name["gem"]  # whitening needs 2+ validation images
    return {k: metrics.get(k) for k in VAL_METRICS}


def val_score(metrics: Mapping[str, float | None]) -> tuple[float, float]:
    """Best epoch: cluttered photo-like recall@5 first, clean recall@5 breaks ties."""
    return (float(metrics.get("photo_r5") or 0.0), float(metrics.get("clean_r5") or 0.0))


# ---------------------------------------------------------------- files


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json_atomic(data: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def features_state(model: Embedder) -> dict[str, torch.Tensor]:
    """torchvision `features` state dict plus the mask head's (`mask_head.*`), on the CPU, float32:
    what `VSEARCH_WEIGHTS=path` loads."""
    state = dict(model.features.state_dict())
    state.update({MASK_PREFIX + k: v for k, v in model.mask_head.state_dict().items()})
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in state.items()}


@dataclass
class TrainState:
    """What a checkpoint carries besides the model and optimizer, and what the model card reports."""

    start_weights: str
    arch: str
    catalog_sha256: str
    loss: str = "nt-xent"
    loss_block: int = 5  # checkpoints written before these fields existed trained and validated block 5
    feature_block: int = 5
    categories: list[str] = field(default_factory=list)  # the category term's classes (empty: off)
    epochs_done: int = 0
    steps_done: int = 0
    seconds: float = 0.0  # wall time of the run so far, all sessions (decoding and validation included)
    before: dict[str, float | None] = field(default_factory=dict)
    best_epoch: int = 0
    best: dict[str, float | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    learned_whitening: dict[str, Any] | None = None  # what `fit_whitening` wrote, for the model card
    status: str = "running"


@dataclass(frozen=True)
class TrainResult:
    weights: Path
    card: Path
    checkpoint: Path
    state: TrainState
    interrupted: bool


# ---------------------------------------------------------------- the run


def train(config: TrainConfig) -> TrainResult:
    """Train per `config`; a KeyboardInterrupt ends it cleanly (result.interrupted) keeping the last checkpoint."""
    config.validate()
    wall_start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    if config.resume and not ckpt_path.is_file():
        raise VsearchError(f"--resume: no checkpoint at {ckpt_path}.", "Start without --resume, or pass the --out of the run.")
    if not config.resume and ckpt_path.is_file():
        raise VsearchError(
            f"{out} already holds a training run ({CHECKPOINT}).", "Pass --resume to continue it, or choose another --out."
        )

    catalog = read_train_catalog(Path(config.catalog), config.column_map)
    images = local_images(catalog)
    product_ids = list(dict.fromkeys(i.product_id for i in images))
    train_ids, eval_ids = split_products(product_ids, config.eval_fraction, config.seed)
    if len(train_ids) < 2:
        raise CatalogError(f"only {len(train_ids)} training product(s)", "Training needs at least 2 products; lower --eval-fraction.")
    train_set = set(train_ids)
    # The validation products choose the best epoch; the rest of the held-out products (`test`) never
    # influence the run and are the ones to report figures on.
    val_ids = sample_products(eval_ids, config.val_limit, config.seed)
    test_ids = [p for p in eval_ids if p not in set(val_ids)]
    _write_json_atomic(
        {"catalog": str(catalog.path), "catalog_sha256": catalog.sha256, "eval_fraction": config.eval_fraction,
         "seed": config.seed, "train": train_ids, "eval": eval_ids, "val": val_ids, "test": test_ids},
        out / SPLIT,
    )
    val_catalog = write_val_catalog(catalog, val_ids, out / VAL_CATALOG)
    val_size = config.val_image_size or index_image_size(config.image_size)

    device, precision = pick_device()
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False) if config.resume else None
    if checkpoint is not None:
        state = TrainState(**checkpoint["state"])
        for option, was, now in (("--loss", state.loss, config.loss), ("--loss-block", state.loss_block,
                                  config.loss_block), ("--feature-block", state.feature_block, config.feature_block)):
            if was != now:
                raise VsearchError(
                    f"the run in {out} trains with {option} {was}, not {now}",
                    f"Resume with {option} {was}, or start a new run with another --out.",
                )
        if state.catalog_sha256 != catalog.sha256:
            raise CatalogError(
                f"the catalog changed since the checkpoint in {out} was written",
                "Resume with the same catalog file, or start a new run with another --out.",
            )
        model = Embedder(vgg16_features(batch_norm=state.arch == "vgg16_bn"), MaskHead(image_size=config.image_size),
                         config.loss_block, config.feature_block)
        model.load_state_dict(checkpoint["model"])
    else:
        features, arch, start_id = build_features(config.weights, config.arch, config.seed)
        state = TrainState(start_weights=start_id, arch=arch, catalog_sha256=catalog.sha256, loss=config.loss,
                           loss_block=config.loss_block, feature_block=config.feature_block)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = Embedder(features, MaskHead(image_size=config.image_size), config.loss_block, config.feature_block)
    model = model.to(device).to(memory_format=torch.channels_last)
    for param in model.parameters():
        param.requires_grad_(True)

    train_images = [i for i in images if i.product_id in train_set]
    cache = ImageCache(train_images, round(config.image_size * 1.5), config.cache_mb << 20, config.progress)
    by_product: dict[str, list[int]] = {}
    for n, item in enumerate(train_images):
        if n not in cache.failed:
            by_product.setdefault(item.product_id, []).append(n)
    if cache.failed:
        log.warning("%d training image(s) could not be decoded and are left out", len(cache.failed))
    train_products = [p for p in train_ids if p in by_product]
    products = [by_product[p] for p in train_products]
    if len(products) < 2:
        raise CatalogError("fewer than 2 training products have a readable image", "Check the image paths of the catalog.")
    batch_size = min(config.batch_size, len(products))
    dataset = PairDataset(cache, products, config.image_size, config.seed)
    groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "base_lr": config.lr}]
    proxies = None
    if config.loss == "proxy":
        generator = torch.Generator().manual_seed(config.seed)
        proxies = nn.Parameter(torch.randn(len(products), model.embedding_dims, generator=generator).to(device))
        if checkpoint is not None:
            proxies.data.copy_(checkpoint["proxies"])
        groups.append({"params": [proxies], "base_lr": 10 * config.lr, "weight_decay": 0.0})
    category_of = product_categories(catalog, train_products, config.category_field)
    category = CategoryTerm.of_catalog([category_of[p] or "" for p in train_products], config.category_weight,
                                       model.embedding_dims, config.seed)
    if checkpoint is not None and state.categories != (category.names if category else []):
        raise VsearchError(
            f"the run in {out} was started with category term {state.categories or 'off'}, not "
            f"{category.names if category else 'off'}",
            "Resume with the same --category-field and --category-weight, or start a new run with another --out.",
        )
    if category is not None:
        state.categories = category.names
        category.proxies.data = category.proxies.data.to(device)
        if checkpoint is not None:
            category.proxies.data.copy_(checkpoint["category_proxies"])
        groups.append({"params": [category.proxies], "base_lr": 10 * config.lr, "weight_decay": 0.0})
        log.info("category term: %s (field %r, weight %s)", ", ".join(category.names), config.category_field,
                 config.category_weight)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    steps_per_epoch = len(products) // batch_size
    total_steps = steps_per_epoch * config.epochs
    budget = config.minutes * 60 if config.minutes else None
    session_seconds = state.seconds

    def elapsed() -> float:
        return session_seconds + time.perf_counter() - wall_start

    def card() -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "weights": str(out / WEIGHTS),
            "weights_sha256": file_sha256(out / WEIGHTS) if (out / WEIGHTS).is_file() else None,
            "arch": state.arch,
            "start_weights": state.start_weights,
            "status": state.status,
            "catalog": str(catalog.path),
            "catalog_sha256": catalog.sha256,
            "split": {"file": str(out / SPLIT), "eval_fraction": config.eval_fraction, "seed": config.seed,
                      "train_products": len(train_ids), "eval_products": len(eval_ids),
                      "val_products": len(val_ids), "test_products": len(test_ids)},
            "epochs_planned": config.epochs,
            "epochs_done": state.epochs_done,
            "steps_done": state.steps_done,
            "best_epoch": state.best_epoch,
            "image_size": config.image_size,
            "batch_size": batch_size,
            "loss": {"name": "nt-xent (SimCLR, two views per product)" if config.loss == "nt-xent" else
                     "proxy (normalised softmax over one learned proxy per training product, proxies at 10x lr)",
                     "temperature": config.temperature if config.loss == "nt-xent" else PROXY_TEMPERATURE,
                     "pooling": f"gem p=3 of conv block {config.loss_block}",
                     "final_epoch_loss": state.history[-1]["loss"] if state.history else None,
                     "mask": f"binary cross-entropy per {MASK_STRIDE}x{MASK_STRIDE} cell, weight {MASK_LOSS_WEIGHT}",
                     "final_epoch_mask_loss": state.history[-1].get("mask_loss") if state.history else None,
                     "category": ({"field": config.category_field, "classes": category.names,
                                   "weight": category.weight, "temperature": CATEGORY_TEMPERATURE,
                                   "pooling": f"gem p=3 of conv block {config.feature_block}",
                                   "final_epoch_loss": state.history[-1].get("category_loss") if state.history
                                   else None} if category else None)},
            "index_settings": {**INDEX_SETTINGS, "VSEARCH_IMAGE_SIZE": index_image_size(config.image_size),
                               "VSEARCH_FEATURE_BLOCK": config.feature_block},
            "mask_head": {"inputs": "conv blocks 3, 4, 5", "image_size": config.image_size,
                          "used": {"mask": "every image pooled over its cells weighed by the product mask",
                                   "crop": "queries cut to their product before embedding",
                                   "auto": DEFAULT_LOCALIZATION}},
            "optimizer": {"name": "adamw", "lr": config.lr, "weight_decay": config.weight_decay,
                          "schedule": f"warm-up {WARMUP:.0%}, cosine to 0 over epochs or --minutes"},
            "augment": {"preset": TRAIN_PARAMS.name, "clean_anchor_share": CLEAN_ANCHOR_SHARE,
                        "clutter_share": CLUTTER_SHARE, "grey_share": GREY_SHARE},
            "validation": {"catalog": str(val_catalog), "products": len(val_ids), "image_size": val_size,
                           "method": f"gem of conv block {config.feature_block} + whitening, the product "
                                     f"found as VSEARCH_LOCALIZE=auto does ({DEFAULT_LOCALIZATION}) after epoch 0; "
                                     "eval presets and seeds "
                                     "(engine.evaluate); picks the best epoch, so report figures on the split's "
                                     "`test` products",
                           "before": state.before, "after": state.best},
            "learned_whitening": state.learned_whitening,
            "history": state.history,
            "wall_seconds": round(state.seconds, 1),
            "minutes_budget": config.minutes,
            "device": _device_name(device),
            "precision": precision,
            "workers": config.workers,
            "torch": torch.__version__,
        }

    def save_checkpoint() -> None:
        state.seconds = elapsed()
        _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": asdict(state),
                      "proxies": proxies.detach().cpu() if proxies is not None else None,
                      "category_proxies": category.proxies.detach().cpu() if category else None}, ckpt_path)

    # After the last epoch come the learned whitening's pairs (3 images per product, as a validation pass
    # embeds 3 per validation product), its category directions (1 image per product) and one more validation
    # pass: the time budget keeps room for them.
    whitening_products = min(config.whitening_products, len(train_products))
    labelled = category_sample(train_products, category_of, whitening_products, config.seed) if (
        whitening_products and config.category_stretch > 0) else []
    final_passes = ((1 + (whitening_products + len(labelled) / 3) / max(len(val_ids), 1)) if whitening_products
                    else 0.0)
    interrupted = False
    try:
        last_val_seconds = state.history[-1]["val_seconds"] if state.history else 0.0
        if checkpoint is None:
            log.info("validating the starting weights (%s) on %d eval products", state.start_weights, len(val_ids))
            val_start = time.perf_counter()
            state.before = validate(model, val_catalog, val_size, config.feature_block, config.seed, device, precision,
                                    localize=False)
            last_val_seconds = time.perf_counter() - val_start
            state.best = dict(state.before)
            log.info("before training: %s", _fmt_metrics(state.before))
            _save_atomic(features_state(model), out / WEIGHTS)  # epoch 0 stays the best until an epoch beats it
            save_checkpoint()
        model.train()
        for epoch in range(state.epochs_done + 1, config.epochs + 1):
            if budget is not None and elapsed() + last_val_seconds * (1 + final_passes) >= budget:
                log.info("time budget of %.1f min reached", config.minutes)
                break
            epoch_start = time.perf_counter()
            losses: list[float] = []
            mask_losses: list[float] = []
            category_losses: list[float] = []
            out_of_time = False
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="step",
                       disable=not config.progress)
            for a, b, mask_a, mask_b, labels in loader(dataset, batch_size, config.workers, config.seed, epoch):
                progress = state.steps_done / max(total_steps, 1)
                if budget is not None:
                    progress = max(progress, elapsed() / budget)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(progress)
                loss, mask_loss, category_loss = train_step(
                    model, optimizer, a, b, torch.cat([mask_a, mask_b]), config.temperature, precision, labels,
                    proxies, category)
                losses.append(loss)
                mask_losses.append(mask_loss)
                category_losses.append(category_loss)
                state.steps_done += 1
                rate = 2 * batch_size * len(losses) / (time.perf_counter() - epoch_start)
                postfix = {"loss": f"{np.mean(losses[-20:]):.3f}", "mask": f"{np.mean(mask_losses[-20:]):.3f}"}
                if category is not None:
                    postfix["category"] = f"{np.mean(category_losses[-20:]):.3f}"
                postfix["img/s"] = f"{rate:.1f}"
                if budget is not None:
                    postfix["left"] = f"{max(0.0, budget - elapsed()) / 60:.1f}min"
                bar.set_postfix(postfix)
                bar.update(1)
                if budget is not None and elapsed() + last_val_seconds * (1 + final_passes) >= budget:
                    out_of_time = True
                    break
            bar.close()
            train_seconds = time.perf_counter() - epoch_start
            val_start = time.perf_counter()
            metrics = validate(model, val_catalog, val_size, config.feature_block, config.seed, device, precision)
            last_val_seconds = time.perf_counter() - val_start
            state.epochs_done = epoch
            state.history.append({
                "epoch": epoch, "steps": len(losses), "loss": round(float(np.mean(losses)), 4) if losses else None,
                "mask_loss": round(float(np.mean(mask_losses)), 4) if mask_losses else None,
                "category_loss": round(float(np.mean(category_losses)), 4) if category and category_losses else None,
                "images_per_s": round(2 * batch_size * len(losses) / max(train_seconds, 1e-9), 2),
                "train_seconds": round(train_seconds, 1), "val_seconds": round(last_val_seconds, 1),
                "lr": optimizer.param_groups[0]["lr"], "val": metrics, "load": [round(x, 2) for x in os.getloadavg()],
            })
            if val_score(metrics) > val_score(state.best):
                state.best, state.best_epoch = metrics, epoch
                _save_atomic(features_state(model), out / WEIGHTS)
            log.info("epoch %d: loss %.4f, %s (best epoch %d)", epoch, np.mean(losses) if losses else float("nan"),
                     _fmt_metrics(metrics), state.best_epoch)
            save_checkpoint()
            _write_json_atomic(card(), out / CARD)
            if out_of_time:
                log.info("time budget of %.1f min reached", config.minutes)
                break
        if whitening_products:
            state.learned_whitening = fit_whitening(
                out / WEIGHTS, sample_products(train_products, whitening_products, config.seed), labelled,
                {p: train_images[by_product[p][0]].source for p in train_products}, val_catalog, val_size, config)
            log.info("learned whitening on %d training products: validation %s (PCA whitening: %s)",
                     whitening_products, _fmt_metrics(state.learned_whitening["validation"]["learned"]),
                     _fmt_metrics(state.learned_whitening["validation"]["pca"]))
            save_checkpoint()  # its time and card entry carry over to a resumed run
        state.status = "done"
    except KeyboardInterrupt:
        interrupted = True
        state.status = "interrupted"
        log.warning("interrupted: the last checkpoint (%d epochs) stays in %s", state.epochs_done, ckpt_path)
    state.seconds = elapsed()
    _write_json_atomic(card(), out / CARD)
    return TrainResult(out / WEIGHTS, out / CARD, ckpt_path, state, interrupted)


def product_categories(catalog: Catalog, products: Sequence[str], category_field: str) -> dict[str, str | None]:
    """Each product's value of `category_field` (None where it has none; for every product where the field is "")."""
    return {p: product_label(catalog.products[p], category_field) if category_field else None for p in products}


def category_sample(
    products: Sequence[str], category_of: Mapping[str, str | None], per_category: int, seed: int
) -> list[tuple[str, str]]:
    """(product, category): up to `per_category` of `products` of each category (seeded); none without one."""
    by_category: dict[str, list[str]] = {}
    for product in products:
        if category_of.get(product):
            by_category.setdefault(category_of[product], []).append(product)
    return [(p, category) for category, members in sorted(by_category.items())
            for p in sample_products(members, per_category, seed)]


def fit_whitening(
    weights: Path, products: Sequence[str], labelled: Sequence[tuple[str, str]], source_of: Mapping[str, str],
    val_catalog: Path, image_size: int, config: TrainConfig,
) -> dict[str, Any]:
    """Fit the learned whitening of `weights` (engine.learned_whitening) on pairs of `products` (one catalog
    image each), its category directions on `labelled` (product, category), write it beside them, and validate
    the weights with it and with PCA whitening: the card's entry."""
    # The run's own thread count: the extractor's default (all cores but one) would also slow what follows.
    extractor = FeatureExtractor(str(weights), "auto", image_size=image_size, feature_block=config.feature_block,
                                 threads=torch.get_num_threads())
    learned = fit_learned_whitening(extractor, [source_of[p] for p in products], len(products), config.seed,
                                    config.progress, [(source_of[p], category) for p, category in labelled],
                                    config.category_stretch)
    path = learned_whitening_file(str(weights))
    sha256 = save_learned_whitening(learned, path)
    report = run_eval(val_catalog, extractor=extractor, seed=config.seed, poolings=("gem",), whitening=(True,),
                      include_seed_baseline=False, queries=("photo", "clean"), localize=extractor.localizes,
                      learned_whitening=learned.projection, progress=False)
    by_name = {m.method: m.metrics for m in report.methods}
    return {"file": path.name, "sha256": sha256, **asdict(learned.info),
            "validation": {name: {k: by_name[method].get(k) for k in VAL_METRICS}
                           for name, method in (("learned", "gem+lwhite"), ("pca", "gem+white"))}}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _fmt_metrics(metrics: Mapping[str, float | None]) -> str:
    return ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in metrics.items())


# ---------------------------------------------------------------- CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalog", help="catalog file (CSV or JSON Lines) whose local images are the training data")
    parser.add_argument("--out", default="vsearch-train", help="run folder: checkpoint, weights.pth, weights.json, split")
    parser.add_argument("--epochs", type=int, default=20, help="epochs in the schedule (default 20)")
    parser.add_argument("--minutes", type=float, default=None, help="time budget of the whole run; stops early")
    parser.add_argument("--image-size", type=int, default=112, help="training resolution in pixels (default 112)")
    parser.add_argument("--batch-size", type=int, default=32, help="products per batch, two views each (default 32)")
    parser.add_argument("--arch", choices=ARCHS, default=None,
                        help="conv stack; default vgg16_bn from random init, else the VSEARCH_WEIGHTS one")
    parser.add_argument("--eval-fraction", type=float, default=0.2, help="share of products held out (default 0.2)")
    parser.add_argument("--val-limit", type=int, default=200, help="held-out products validated each epoch (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--map", action="append", metavar="FIELD=COLUMN", help="e.g. id=product_id for the shared shoe sets")
    parser.add_argument("--workers", type=int, default=1, help="augmentation worker processes (0: in the main one)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss", choices=LOSSES, default="nt-xent",
                        help="nt-xent: the two views of a product against the batch (default); proxy: each view "
                        "against a learned proxy per product (README: Training)")
    parser.add_argument("--category-field", default="category",
                        help="catalog field whose values the category term learns (default category; '' for none)")
    parser.add_argument("--category-weight", type=float, default=DEFAULT_CATEGORY_WEIGHT,
                        help=f"weight of the category term (on the index's vector) beside the product loss (default "
                        f"{DEFAULT_CATEGORY_WEIGHT:g}; 0: off). On only when the training products have 2 or more "
                        "categories (README: Training)")
    parser.add_argument("--feature-block", type=int, choices=(4, 5), default=4,
                        help="conv block whose GeM the index uses (model card VSEARCH_FEATURE_BLOCK; default 4: "
                        "better than 5 on the README run's validation products, README: Training)")
    parser.add_argument("--loss-block", type=int, choices=(4, 5), default=5,
                        help="conv block whose GeM the loss trains (default 5; README: Training)")
    parser.add_argument("--whitening-products", type=int, default=TrainConfig.whitening_products,
                        help="training products whose catalog image and two photo-like views fit the learned "
                        "whitening written beside the weights (default 300; 0: none; README: Training)")
    parser.add_argument("--category-stretch", type=float, default=DEFAULT_CATEGORY_STRETCH,
                        help="the learned whitening scales the directions that tell --category-field's categories "
                        f"apart by 1 + this (default {DEFAULT_CATEGORY_STRETCH:g}; 0: off; found on up to "
                        "--whitening-products training products per category; README: Training)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_train(args: argparse.Namespace) -> int:
    config = TrainConfig(
        catalog=Path(args.catalog),
        out=Path(args.out),
        weights=os.environ.get("VSEARCH_WEIGHTS", "imagenet").strip() or "imagenet",
        epochs=args.epochs,
        minutes=args.minutes,
        image_size=args.image_size,
        batch_size=args.batch_size,
        arch=args.arch or "auto",
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        column_map=parse_column_map(args.map or []) or None,
        workers=args.workers,
        resume=args.resume,
        lr=args.lr,
        loss=args.loss,
        category_field=args.category_field,
        category_weight=args.category_weight,
        val_limit=args.val_limit,
        feature_block=args.feature_block,
        loss_block=args.loss_block,
        whitening_products=args.whitening_products,
        category_stretch=args.category_stretch,
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as cleanly as Ctrl-C
    try:
        result = train(config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    s = result.state
    print(f"{s.status}: {s.epochs_done} epoch(s) in {s.seconds / 60:.1f} min; best epoch {s.best_epoch}")
    print(f"validation before: {_fmt_metrics(s.before)}")
    print(f"validation best:   {_fmt_metrics(s.best)}")
    if s.learned_whitening:
        lw = s.learned_whitening
        stretched = (f", directions of {lw['categories'].replace(',', ', ')} stretched by 1 + {lw['category_stretch']:g}"
                     if lw.get("category_stretch") else "")
        print(f"learned whitening: {lw['file']} ({lw['pairs']} pairs{stretched}); validation "
              f"{_fmt_metrics(lw['validation']['learned'])}")
    print(f"weights: {result.weights}\nmodel card: {result.card}")
    print(f"use them: VSEARCH_WEIGHTS={result.weights} vsearch index CATALOG")
    return EXIT_INTERRUPTED if result.interrupted else 0
