"""FeatureExtractor: the VGG16 conv stack run once per batch, on the CPU, in fp32 or bf16."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

import numpy as np
import torch
from PIL import Image

from engine.errors import WeightsError
from engine.localize import (
    CleanupParams,
    MaskHead,
    catalog_crop,
    clean_images,
    fitted_size,
    masked_maps_and_probs,
    predict_masks,
    up_to_block,
)
from engine.pooling import pool
from engine.prepack import PackedConv2d, block_agreement, packed_or_eager
from engine.settings import LOCALIZE_MODES, EngineSettings
from engine.shape import silhouettes
from engine.weights import load_weights

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_IMAGE_SIZE = 224
BF16_MIN_COSINE = 0.999
# VSEARCH_LOCALIZE=auto for weights with a mask head: masked pooling keeps to issue 6's +30% query-time budget,
# cropping (a second pass) does not (README: Training, "Query time").
DEFAULT_LOCALIZATION = "mask"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_threads() -> int:
    """All cores but one: the spare core decodes images and runs the event loop.

    `vsearch bench` on 2 cores: with 2 torch threads, decoding and any other load stall the model
    (indexing at 0.58 of the model's speed, query p50 479 ms); with 1 thread 0.95 and 120 ms.
    """
    return max(1, (os.cpu_count() or 2) - 1)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """Fit the image inside size x size keeping its aspect, pad with white, normalise: (3, size, size).

    Padding instead of squashing keeps a shoe's proportions; catalog photos are shot on white.
    """
    image = image.convert("RGB")
    new_w, new_h = fitted_size(image.width, image.height, size)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    arr = np.asarray(canvas, dtype=np.float32) / 255.0
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def check_image(size: int) -> Image.Image:
    """A fixed synthetic image (gradients and a block) for the bf16 accuracy check."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 255
    rgb[size // 4 : size // 2, size // 3 : 2 * size // 3] = (200, 30, 30)
    return Image.fromarray(rgb.astype(np.uint8))


def check_batch(size: int) -> torch.Tensor:
    """The check image preprocessed at `size` as a batch of one: the input of the load-time accuracy checks."""
    return torch.from_numpy(preprocess(check_image(size), size))[None]


def return_free_heap() -> None:
    """Hand the heap freed while loading (the fp32 weights, the copies made while packing) back to the OS,
    where the C library is glibc: otherwise it stays in the process's resident memory (about 60 MB here)."""
    with suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def fold_batch_norm(features: torch.nn.Sequential) -> torch.nn.Sequential:
    """Inference copy of a conv stack with each eval-mode BatchNorm folded into the conv before it.

    VGG16-BN (what `vsearch train` writes) then costs what plain VGG16 costs; the outputs are the same
    up to float rounding.
    """
    layers: list[torch.nn.Module] = []
    for module in features:
        if isinstance(module, torch.nn.BatchNorm2d) and layers and isinstance(layers[-1], torch.nn.Conv2d):
            conv = layers[-1]
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            fused = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
            with torch.no_grad():
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                bias = conv.bias if conv.bias is not None else torch.zeros_like(module.running_mean)
                fused.bias.copy_((bias - module.running_mean) * scale + module.bias)
            layers[-1] = fused
            continue
        layers.append(module)
    return torch.nn.Sequential(*layers)


class ModelLock:
    """Serialises model calls; a waiting foreground call (a shopper's search) goes before background
    work (an index rebuild in the serving process), so searches wait at most one rebuild batch."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._foreground_waiting = 0

    @contextmanager
    def hold(self, background: bool = False) -> Iterator[None]:
        with self._cond:
            if not background:
                self._foreground_waiting += 1
            try:
                while self._busy or (background and self._foreground_waiting):
                    self._cond.wait()
            finally:
                if not background:
                    self._foreground_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class FeatureExtractor:
    """Loads the conv part of VGG16 once; thread-safe (model calls are serialised by a ModelLock)."""

    def __init__(
        self,
        weights: str = "imagenet",
        precision: str = "auto",
        image_size: int = DEFAULT_IMAGE_SIZE,
        threads: int | None = None,
        localize: str = "auto",
        feature_block: int = 5,
    ) -> None:
        if localize not in LOCALIZE_MODES:
            raise ValueError(f"localize must be one of {', '.join(LOCALIZE_MODES)}, got {localize!r}")
        torch.set_num_threads(threads or default_threads())
        loaded = load_weights(weights)
        if localize not in ("auto", "off") and loaded.mask_head is None:
            raise WeightsError(
                f"VSEARCH_LOCALIZE={localize}, but the weights {loaded.weights_id} have no mask head.",
                "Use weights written by `vsearch train`, or set VSEARCH_LOCALIZE=auto (or off).",
            )
        # "crop", "mask" or None (see engine.settings.LOCALIZE_MODES).
        self.localization: str | None = None
        if localize != "off" and loaded.mask_head is not None:
            self.localization = {"auto": DEFAULT_LOCALIZATION, "on": "crop"}.get(localize, localize)
        self.mask_head: MaskHead | None = loaded.mask_head if self.localization else None
        if self.mask_head is not None:
            self.mask_head = self.mask_head.to(memory_format=torch.channels_last)
            for param in self.mask_head.parameters():
                param.requires_grad_(False)
        self.cleanup = CleanupParams()
        # The last block's final 2x2 max-pool is dropped: pooling works on the finer 14x14 map.
        self.model = fold_batch_norm(loaded.features[:-1].eval()).eval().to(memory_format=torch.channels_last)
        for param in self.model.parameters():
            param.requires_grad_(False)
        # What the index pools: the stack through `feature_block`, sharing its modules (the mask pass runs all).
        self.feature_block = feature_block
        self.embedder = up_to_block(self.model, feature_block)
        self.weights_id = loaded.weights_id
        self.arch = loaded.arch
        self.image_size = image_size
        self._lock = ModelLock()
        self._weights_dtype = torch.float32
        self.precision = self._resolve_precision(precision)
        if self.precision == "bf16":
            # Weights stored in bf16 once: autocast would cast all 14.7M of them again on every call
            # (in inference mode it caches nothing), about 9 ms a call on this CPU; the results are the same.
            self.model = self.model.to(torch.bfloat16)
            self._weights_dtype = torch.bfloat16
            if self.mask_head is not None:
                self.mask_head = self.mask_head.to(torch.bfloat16)
        # Conv weights reordered for oneDNN once instead of on every call (engine.prepack): 1.2-1.5x.
        check, _ = self._inputs(check_batch(image_size), self.precision)
        self.model = packed_or_eager(self.model, image_size, check)
        self.embedder = up_to_block(self.model, feature_block)
        return_free_heap()

    @property
    def weights_dtype(self) -> torch.dtype:
        """torch.bfloat16 once bf16 is chosen, else torch.float32; a mask head set later must match it."""
        return self._weights_dtype

    @property
    def prepacked(self) -> bool:
        """Whether the conv stack runs with weights packed once for oneDNN (else eager PyTorch)."""
        return any(isinstance(m, PackedConv2d) for m in self.model)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> FeatureExtractor:
        return cls(settings.weights, settings.precision, image_size=settings.image_size, threads=settings.threads,
                   localize=settings.localize, feature_block=settings.feature_block)

    @property
    def localizes(self) -> bool:
        """True when the mask head finds the product: "crop" cleans and crops queries before they are embedded
        (and catalog images are cropped to their product to match, see `frame_catalog_image`); "mask" pools
        every image, query or catalog, over its product's cells only."""
        return self.localization is not None

    @property
    def framing(self) -> str:
        """How catalog images are framed for embedding; recorded in the manifest: "product" (cropped to it),
        "masked" (pooled over its cells) or "whole"."""
        return {"crop": "product", "mask": "masked"}.get(self.localization or "", "whole")

    @property
    def query_draft_size(self) -> int:
        """Side to decode query JPEGs at (never below it). A cropped query is cut to its product before
        embedding, so it is decoded at twice the model's size to keep the crop sharp."""
        return self.image_size * (2 if self.localization == "crop" else 1)

    def frame_catalog_image(self, image: Image.Image) -> Image.Image:
        return catalog_crop(image, self.cleanup.margin) if self.localization else image

    def _resolve_precision(self, requested: str) -> str:
        if requested == "fp32":
            return "fp32"
        if requested == "bf16":
            return "bf16"
        if not cpu_has_native_bf16():
            return "fp32"
        batch = check_batch(self.image_size)
        cosine = block_agreement([self._forward(batch, "fp32")[0]], [self._forward(batch, "bf16")[0]])
        if cosine < BF16_MIN_COSINE:
            log.warning("bf16 features drift from fp32 (cosine %.5f); using fp32", cosine)
            return "fp32"
        return "bf16"

    def _inputs(self, batch: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.autocast]:
        """The batch in the weights' dtype and layout, and the autocast to run under: bf16 weights take bf16
        input directly; fp32 weights run under bf16 autocast only for the precision check before the switch."""
        batch = batch.contiguous(memory_format=torch.channels_last)
        if self.weights_dtype == torch.bfloat16:
            return batch.to(torch.bfloat16), torch.autocast("cpu", enabled=False)
        return batch, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    @property
    def gives_shapes(self) -> bool:
        """True with masked pooling: the embedding pass then also gives each image's silhouette (engine.shape)."""
        return self.localization == "mask" and self.mask_head is not None

    def _forward(
        self, batch: torch.Tensor, precision: str, background: bool = False
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """The pooled block's float32 maps, and with masked pooling the head's (N, S/4, S/4) probabilities."""
        batch, autocast = self._inputs(batch, precision)
        with self._lock.hold(background), torch.inference_mode(), autocast:
            if self.gives_shapes:
                assert self.mask_head is not None
                return masked_maps_and_probs(self.model, self.mask_head, batch, self.feature_block, self.cleanup)
            out = self.embedder(batch)
        return out.float(), None

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self.image_size)

    def mask_probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, S/4, S/4) product probabilities over each image's padded square, from a pass at the head's size."""
        if self.mask_head is None:
            raise RuntimeError("these weights have no mask head")
        size = self.cleanup.mask_size or int(self.mask_head.image_size)
        batch, autocast = self._inputs(torch.from_numpy(np.stack([preprocess(im, size) for im in images])),
                                       self.precision)
        with self._lock.hold(), torch.inference_mode(), autocast:
            return predict_masks(self.model, self.mask_head, batch)

    def localize(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """With "crop": each photo's product on white, cropped to it (the photo itself where the mask is not
        trusted). Otherwise the photos as they are ("mask" works inside the embedding pass)."""
        if self.localization != "crop" or self.mask_head is None or not images:
            return list(images)
        return clean_images(list(images), self.mask_probabilities(images), self.cleanup)

    def embed_queries(self, images: Sequence[Image.Image], pooling: str) -> np.ndarray:
        """Shoppers' photos: localised first when the weights carry a mask head; catalog images use `embed`."""
        return self.embed(self.localize(images), pooling)

    def embed_queries_with_shapes(
        self, images: Sequence[Image.Image], pooling: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`embed_queries` and, where `gives_shapes`, each photo's (N, SHAPE_GRID**2) silhouette (else None)."""
        maps, shapes = self.maps_and_shapes(self.localize(images))
        return pool(maps, pooling), shapes

    def maps_and_shapes_from_arrays(
        self, arrays: Sequence[np.ndarray], background: bool = False
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Preprocessed (3, S, S) arrays -> (N, 512, S/16, S/16) float32 maps of conv block 5 (S/8 for block 4),
        and where `gives_shapes` the silhouettes the mask head drew in the same pass (else None).

        `background=True` (index builds) lets waiting searches run first.
        """
        maps, probs = self._forward(torch.from_numpy(np.stack(arrays)), self.precision, background)
        return maps, silhouettes(probs, self.cleanup) if probs is not None else None

    def maps_and_shapes(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, np.ndarray | None]:
        return self.maps_and_shapes_from_arrays([self.preprocess(im) for im in images])

    def conv_maps_from_arrays(self, arrays: Sequence[np.ndarray], background: bool = False) -> torch.Tensor:
        """The maps of `maps_and_shapes_from_arrays` without drawing the silhouettes."""
        return self._forward(torch.from_numpy(np.stack(arrays)), self.precision, background)[0]

    def conv_maps(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.conv_maps_from_arrays([self.preprocess(im) for im in images])

    def embed(self, images: Sequence[Image.Image], pooling: str) -> np.ndarray:
        """(N, 512) float32 L2-normalised vectors."""
        return pool(self.conv_maps(images), pooling)

    def embed_arrays(self, arrays: Sequence[np.ndarray], pooling: str, background: bool = False) -> np.ndarray:
        return pool(self.conv_maps_from_arrays(arrays, background), pooling)

    def embed_arrays_with_shapes(
        self, arrays: Sequence[np.ndarray], pooling: str, background: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        maps, shapes = self.maps_and_shapes_from_arrays(arrays, background)
        return pool(maps, pooling), shapes
