"""Multi-crop queries keeping the best match (issue 6's lever), against the engine's single view, on held-out products.

Run: .venv/bin/python benchmarks/multi_crop.py --split RUN/split.json --weights RUN/weights.pth \
        [--products val|test] [--size 160] [--feature-block 4] [--seeds 0,1]
The engine as deployed with the weights (masked pooling, GeM + whitening fitted on the evaluated catalog,
catalog images framed on their product) embeds every view of a query; a catalog image scores the best cosine
over the views, and products are ranked by their best image. Views of a query photo:
- whole: the photo as it is (the engine's search);
- product: the photo cropped to its product by the mask head (as VSEARCH_LOCALIZE=crop cuts it);
- centre: its central 70%;  corners: its four corners of the same size.
Each configuration's cost is its number of conv passes per query (the product view needs a mask pass too).
Same-product recall on shoes_multiview (real second photos; each photo of a product with 2+ photos against
all the other photos) is measured the same way, once (it has no seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from masked_run import add_run_arguments, held_out_catalog, masked_engine  # noqa: E402 (same folder)
from PIL import Image  # noqa: E402

from engine.augment import EVAL_PARAMS  # noqa: E402
from engine.evaluate import _entries, _load, _read, _transform  # noqa: E402
from engine.features import FeatureExtractor  # noqa: E402
from engine.metrics import rank_products, recall_at_k  # noqa: E402
from engine.pooling import Whitening  # noqa: E402

CONFIGS = {  # name: (views, conv passes per query)
    "whole (the engine)": (("whole",), 1.0),
    "whole + product": (("whole", "product"), 2.5),
    "whole + centre": (("whole", "centre"), 2.0),
    "whole + centre + corners": (("whole", "centre", "corner0", "corner1", "corner2", "corner3"), 6.0),
}
KEEP = 0.7  # side of the centre and corner views, as a share of the photo's
KINDS = ("photo", "plain")  # cluttered photo-like, photo-like
MULTIVIEW = Path(__file__).resolve().parent.parent.parent / "shared/datasets/shoes_multiview/catalog.csv"


def part(img: Image.Image, left: float, top: float) -> Image.Image:
    """KEEP x KEEP of the photo, its left and top edges at these shares of the room left (0.5: centred)."""
    w, h = img.size
    cw, ch = round(KEEP * w), round(KEEP * h)
    x, y = round((w - cw) * left), round((h - ch) * top)
    return img.crop((x, y, x + cw, y + ch))


def view(name: str, img: Image.Image, extractor: FeatureExtractor) -> Image.Image:
    if name == "whole":
        return img
    if name == "product":
        engine_mode, extractor.localization = extractor.localization, "crop"
        try:
            return extractor.localize([img])[0]
        finally:
            extractor.localization = engine_mode
    if name == "centre":
        return part(img, 0.5, 0.5)
    corner = int(name.removeprefix("corner"))  # 0-3: top left, top right, bottom left, bottom right
    return part(img, corner % 2, corner // 2)


def whitened_index(extractor: FeatureExtractor, images: list[Image.Image]) -> tuple[Whitening, np.ndarray]:
    """The catalog's GeM vectors whitened as the engine's index holds them, and the whitening fitted on them."""
    vectors = extractor.embed(images, "gem")
    whitening = Whitening.fit(vectors)
    return whitening, whitening.apply(vectors)


def best_view_scores(
    extractor: FeatureExtractor, whitening: Whitening, index: np.ndarray, queries: list[Image.Image]
) -> dict[str, np.ndarray]:
    """Per configuration, (queries, index images) cosines: each catalog image's best over the configuration's
    views of a query; every view is embedded once."""
    views = sorted({v for names, _ in CONFIGS.values() for v in names})
    sims = {v: whitening.apply(extractor.embed([view(v, q, extractor) for q in queries], "gem")) @ index.T
            for v in views}
    return {name: np.max(np.stack([sims[v] for v in names]), axis=0) for name, (names, _) in CONFIGS.items()}


def same_product(extractor: FeatureExtractor) -> dict[str, dict[str, float]]:
    """Recall@1/@5 of each real photo's own product among the other photos, per configuration."""
    entries, _ = _entries(_read(MULTIVIEW, None, []), "category")
    images = [_load(e) for e in entries]
    products = [e.product_id for e in entries]
    framed = [extractor.frame_catalog_image(im) for im in images]  # queries too, as `vsearch eval` frames them
    whitening, index = whitened_index(extractor, framed)
    queries = [i for i, p in enumerate(products) if products.count(p) >= 2]
    out = {}
    for name, best in best_view_scores(extractor, whitening, index, [framed[i] for i in queries]).items():
        best[np.arange(len(queries)), queries] = -np.inf  # a photo never finds itself
        ranked = [rank_products(np.argsort(-row).tolist(), products, 5) for row in best]
        truth = [products[i] for i in queries]
        out[name] = {f"same_r{k}": recall_at_k(ranked, truth, k) for k in (1, 5)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, seeds="0,1")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    csv_path, count = held_out_catalog(args)
    entries, _ = _entries(_read(csv_path, None, []), "category")
    extractor = masked_engine(args)
    images = [_load(e) for e in entries]
    products = [e.product_id for e in entries]
    whitening, index = whitened_index(extractor, [extractor.frame_catalog_image(im) for im in images])

    results: dict[str, dict[str, list[float]]] = {name: {} for name in CONFIGS}
    for seed in seeds:
        for kind in KINDS:
            transform = _transform(kind, seed, EVAL_PARAMS)
            queries = [transform(im, e) for im, e in zip(images, entries, strict=True)]
            for name, best in best_view_scores(extractor, whitening, index, queries).items():
                ranked = [rank_products(np.argsort(-row).tolist(), products, 5) for row in best]
                for k in (1, 5):
                    results[name].setdefault(f"{kind}_r{k}", []).append(recall_at_k(ranked, products, k))
            print(f"seed {seed} {kind} done", file=sys.stderr, flush=True)

    same = same_product(extractor) if MULTIVIEW.is_file() else None
    print(f"{count} {args.products} products, masked pooling, GeM + whitening, block {args.feature_block}, "
          f"{args.size} px; mean over seeds {seeds} (each seed in brackets); same product: shoes_multiview\n")
    print("| views kept at their best match | conv passes | cluttered R@1 | cluttered R@5 | photo-like R@1 | "
          "photo-like R@5 | same-product R@1 | same-product R@5 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (_, passes) in CONFIGS.items():
        cells = [f"{statistics.mean(v):.3f} ({' '.join(f'{x:.3f}' for x in v)})"
                 for v in (results[name][f"{kind}_r{k}"] for kind in KINDS for k in (1, 5))]
        cells += [f"{same[name][f'same_r{k}']:.3f}" if same else "-" for k in (1, 5)]
        print(f"| {name} | {passes:g} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"queries": results, "same_product": same}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
