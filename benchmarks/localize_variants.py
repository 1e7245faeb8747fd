"""Ways of using the mask head at query time, compared on held-out products (how CleanupParams was chosen).

Run: .venv/bin/python benchmarks/localize_variants.py --split RUN/split.json --weights RUN/weights.pth \
        [--products val|test] [--head-minutes 7] [--size 224] [--feature-block 5]
Weights without a mask head (e.g. a run of an earlier version) get one trained here for --head-minutes on
the frozen conv stack, with the training products of the split and `vsearch train`'s views and loss.
Each variant is measured with the eval code (cluttered photo-like and clean queries, GeM, cosine):
- none: the photo as it is;
- whiten: product pixels kept in place, the rest painted white (no crop);
- crop M: product on white, cropped to it with margin M; "+framed" when the index images are cropped to
  their product (found on the plain background) with the same margin, as `vsearch index` does;
- framed only: index framed, queries untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from engine.augment import EVAL_PARAMS  # noqa: E402
from engine.evaluate import _entries, _extract, _product_rankings, _read, _transform  # noqa: E402
from engine.localize import (  # noqa: E402
    CleanupParams,
    MaskHead,
    block_outputs,
    catalog_crop,
    clean_image,
    predict_masks,
    unpad,
)
from engine.metrics import recall_at_k  # noqa: E402
from engine.pooling import Whitening  # noqa: E402
from engine.train import (  # noqa: E402
    Embedder,
    ImageCache,
    ModelExtractor,
    PairDataset,
    loader,
    local_images,
    read_train_catalog,
    write_val_catalog,
)
from engine.weights import load_weights  # noqa: E402

VARIANTS = [  # (name, query mode, cleanup, index framed)
    ("none", "none", CleanupParams(), False),
    ("whiten", "whiten", CleanupParams(), False),
    ("crop 0.04", "crop", CleanupParams(margin=0.04), False),
    ("crop 0.04 +framed", "crop", CleanupParams(margin=0.04), True),
    ("crop 0.10 +framed", "crop", CleanupParams(margin=0.10), True),
    ("crop 0.10 +framed, threshold 0.3", "crop", CleanupParams(margin=0.10, threshold=0.3), True),
    ("framed only", "none", CleanupParams(margin=0.10), True),
]


def train_head(model: Embedder, split: dict, minutes: float) -> None:
    """The mask head alone on the frozen conv stack: `vsearch train`'s views, its mask loss."""
    catalog = read_train_catalog(Path(split["catalog"]), None)
    train_ids = set(split["train"])
    images = [i for i in local_images(catalog) if i.product_id in train_ids]
    size = int(model.mask_head.image_size)
    cache = ImageCache(images, round(size * 1.5), 1 << 30, progress=False)
    by_product: dict[str, list[int]] = {}
    for n, item in enumerate(images):
        by_product.setdefault(item.product_id, []).append(n)
    dataset = PairDataset(cache, list(by_product.values()), size, 0)
    model.features.eval()
    optimizer = torch.optim.AdamW(model.mask_head.parameters(), lr=3e-3, weight_decay=1e-4)
    start, epoch, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < minutes * 60:
        epoch += 1
        for a, b, mask_a, mask_b in loader(dataset, 32, 1, 0, epoch):
            x = torch.cat([a, b]).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                blocks = block_outputs(model.features, x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model.mask_head(*blocks[2:5])
            loss = F.binary_cross_entropy_with_logits(logits.float()[:, 0], torch.cat([mask_a, mask_b]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if time.perf_counter() - start > minutes * 60:
                break
    print(f"head trained {minutes} min, {len(losses)} steps, last loss {np.mean(losses[-20:]):.3f}", flush=True)


class VariantExtractor(ModelExtractor):
    def __init__(self, model: Embedder, size: int, mode: str, params: CleanupParams, feature_block: int) -> None:
        super().__init__(model, size, torch.device("cpu"), "bf16", feature_block)
        self.mode, self.params = mode, params

    def localize(self, images):
        if self.mode == "none":
            return list(images)
        head = self.model.mask_head
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            probs = predict_masks(self.model.features, head, self._batch(images, int(head.image_size)))
        out = []
        for image, prob in zip(images, probs, strict=True):
            cleaned = clean_image(image, prob, self.params)
            if cleaned is None or self.mode == "crop":
                out.append(cleaned or image)
                continue
            region = unpad(prob, image.width, image.height)
            alpha = Image.fromarray((np.clip(region, 0, 1) * 255).astype(np.uint8)).resize(image.size)
            hard = alpha.point(lambda v: 255 if v >= round(self.params.threshold * 255) else 0)
            out.append(Image.composite(image.convert("RGB"), Image.new("RGB", image.size, "white"), hard))
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True)
    parser.add_argument("--weights", required=True, help="a .pth written by vsearch train (or any VGG16-BN .pth)")
    parser.add_argument("--products", choices=("val", "test", "eval"), default="val")
    parser.add_argument("--head-minutes", type=float, default=7.0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--feature-block", type=int, choices=(4, 5), default=5, help="conv block to pool")
    parser.add_argument("--whitening", action="store_true",
                        help="whiten (fitted on each variant's index vectors, as vsearch index does)")
    args = parser.parse_args()
    split = json.loads(Path(args.split).read_text(encoding="utf-8"))
    loaded = load_weights(args.weights)
    model = Embedder(loaded.features, loaded.mask_head or MaskHead(image_size=112)).eval()
    if loaded.mask_head is None:
        train_head(model, split, args.head_minutes)
    model.eval()
    catalog = read_train_catalog(Path(split["catalog"]), None)
    ids = split.get(args.products) or split["eval"]
    csv_path = write_val_catalog(catalog, ids, Path(args.split).with_name(f"{args.products}_variants.csv"))
    entries, _ = _entries(_read(csv_path, None, []), "category")
    products = [e.product_id for e in entries]
    method = "GeM + whitening" if args.whitening else "GeM"
    print(f"| variant ({method}, {len(products)} {args.products} products) | cluttered R@1 | cluttered R@5 | "
          "clean R@1 | clean R@5 |")
    print("|---|---|---|---|---|")
    for name, mode, params, framed in VARIANTS:
        extractor = VariantExtractor(model, args.size, mode, params, args.feature_block)
        frame = (lambda img, e, m=params.margin: catalog_crop(img, m)) if framed else (lambda img, e: img)
        _, base, _ = _extract(entries, extractor, frame, ("gem",), False, 16, "", False)
        index = base.pooled["gem"]
        whitening = Whitening.fit(index) if args.whitening else None
        if whitening is not None:
            index = whitening.apply(index)
        cells = []
        for kind in ("photo", "clean"):
            _, q, _ = _extract(entries, extractor, _transform(kind, 0, EVAL_PARAMS), ("gem",), False, 16, "", False,
                               localize=True)
            queries = q.pooled["gem"] if whitening is None else whitening.apply(q.pooled["gem"])
            ranked = _product_rankings(queries, index, "cosine", 40, products, None, None)
            cells += [recall_at_k(ranked, products, 1), recall_at_k(ranked, products, 5)]
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
