"""The `vsearch` command line: index, query, info, eval, bench, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engine.errors import (
    CatalogError,
    ImageRejected,
    IndexNotReady,
    ReindexRequired,
    SettingsError,
    VsearchError,
)
from engine.settings import EngineSettings, load_dotenv_file

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_INDEX = 3
EXIT_BAD_IMAGE = 4

# First match wins: every VsearchError is covered by the last row.
EXIT_CODES: tuple[tuple[type[VsearchError], int], ...] = (
    (SettingsError, EXIT_USAGE),
    (CatalogError, EXIT_USAGE),
    (IndexNotReady, EXIT_NO_INDEX),
    (ReindexRequired, EXIT_NO_INDEX),
    (ImageRejected, EXIT_BAD_IMAGE),
    (VsearchError, EXIT_FAILED),  # WeightsError, BuildFailed, ...
)

EPILOG = """\
exit codes:
  0  success
  1  the work failed (e.g. no catalog image could be indexed, weights missing)
  2  bad usage, setting or unreadable catalog
  3  no index yet, or the index must be rebuilt for the current weights/pooling
  4  the query image could not be used

settings come from the environment or a .env file: VSEARCH_DATA_DIR, VSEARCH_WEIGHTS (imagenet | random |
path.pth), VSEARCH_PRECISION (auto | fp32 | bf16), VSEARCH_POOLING, VSEARCH_WHITENING, VSEARCH_TOP_K, ...
(see README.md)."""


def _settings() -> EngineSettings:
    return EngineSettings.from_env()


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.build import build_index
    from indexer.catalog import format_error_summary, parse_column_map

    settings = _settings()
    bar = None

    def progress(p) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress_bar(p.total, "indexing")
        bar.n = p.done
        bar.refresh()

    try:
        report = build_index(
            args.catalog,
            settings,
            progress=progress,
            column_map=parse_column_map(args.map or []),
            url_template=args.url_template,
            use_cache=not args.no_cache,
        )
    finally:
        if bar is not None:
            bar.close()
    print(report.summary())
    if report.errors:
        print(format_error_summary(report.errors))
        print(f"all bad rows: {report.index_dir / 'errors.csv'}")
    return EXIT_OK


def _print_matches(result, as_json: bool) -> None:
    if as_json:
        rows = [
            {
                "id": m.product.id,
                "title": m.product.title,
                "url": m.product.url,
                "image": m.image,
                "price": m.product.price,
                "score": round(m.score, 4),
            }
            for m in result.matches
        ]
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    print(f"index {result.index_version}, {result.took_ms:.0f} ms")
    for rank, m in enumerate(result.matches, 1):
        price = f"  {m.product.price} {m.product.currency or ''}".rstrip() if m.product.price else ""
        print(f"{rank:>2}. {m.score:.3f}  {m.product.title}{price}\n    {m.product.url}")


def cmd_query(args: argparse.Namespace) -> int:
    from engine.search import Searcher

    settings = _settings()
    path = Path(args.image)
    if not path.is_file():
        print(f"error: {path} does not exist. Give the path of a photo.", file=sys.stderr)
        return EXIT_USAGE
    searcher = Searcher(settings)
    result = searcher.search(path.read_bytes(), args.top_k or settings.top_k)
    _print_matches(result, args.json)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from engine.index import IndexStore

    settings = _settings()
    store = IndexStore(settings.index_dir)
    manifest = store.read_manifest()
    print(json.dumps({**manifest.to_dict(), "versions": store.versions()}, indent=2))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from engine.evaluate import run_eval
    from engine.features import FeatureExtractor
    from engine.learned_whitening import matching_learned_whitening
    from indexer.catalog import parse_column_map

    settings = _settings()
    split = read_split_file(Path(args.split_file)) if args.split_file else args.eval_split
    extractor = FeatureExtractor.from_settings(settings)
    learned, _ = matching_learned_whitening(settings.weights, extractor, "gem")
    report = run_eval(
        args.catalog,
        extractor=extractor,
        column_map=parse_column_map(args.map or []) or None,
        limit=args.limit,
        seed=args.seed,
        category_field=args.category_field,
        split=split,
        localize=extractor.localizes,
        white_dims=(None, settings.index_dims or None),  # full dims and the index's (VSEARCH_INDEX_DIMS)
        learned_whitening=learned.projection if learned else None,  # rows "gem+lwhite"
        category_boosts=(settings.category_boost,) if settings.category_boost else (),  # rows "+catB", as searched
        shape_weights=(settings.shape_weight,) if settings.shape_weight else (),  # rows "+catB+shapeW" (masked pooling)
    )
    markdown = report.to_markdown()
    print(markdown)
    if args.json:
        Path(args.json).write_text(report.to_json(), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(markdown, encoding="utf-8")
    return EXIT_OK


def read_split_file(path: Path) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids) of a split.json written by `vsearch train`: its `test` products where it
    has them (the validation products chose the best epoch), else all of `eval`."""
    from engine.errors import CatalogError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        held_out = data.get("test") or data["eval"]
        train = data["train"]
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CatalogError(
            f"cannot read the split file {path}: {exc}", "Pass the split.json written by `vsearch train --out RUN`."
        ) from exc
    if not isinstance(train, list) or not isinstance(held_out, list):
        raise CatalogError(f"{path} is not a vsearch train split", "Its train and eval entries must be lists of ids.")
    return [str(p) for p in train], [str(p) for p in held_out]


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import run_bench

    return run_bench(args)


TRAIN_HELP = (
    "Fine-tune the VGG16 conv stack on the catalog's images (each product is its own class, augmented "
    "phone-photo-like copies are the positives) and train a mask head that finds the product in a photo. "
    "Writes weights.pth and a model card; use them with VSEARCH_WEIGHTS=path."
)


def cmd_train(args: argparse.Namespace) -> int:
    from engine.train import run_train

    return run_train(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from bot.serve import main as serve_main

    return serve_main()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsearch",
        description="Visual search for online shops: index a catalog, find similar products for a photo.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="build a new index version from a catalog and switch to it")
    p.add_argument("catalog", help="catalog file: CSV with a header row, or JSON Lines")
    p.add_argument("--map", action="append", metavar="FIELD=COLUMN", help="read FIELD from another column, e.g. id=product_id")
    p.add_argument("--url-template", help="product URL for rows without one, e.g. https://shop.example/p/{id}")
    p.add_argument("--no-cache", action="store_true", help="extract every image again, ignoring the feature cache")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("query", help="find the products most similar to a photo")
    p.add_argument("image", help="a photo: JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC")
    p.add_argument("--top-k", type=int, default=None, help="how many products (default VSEARCH_TOP_K, 5)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {id, title, url, image, price, score}")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("info", help="print the current index manifest")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="measure search quality on a labelled catalog (README: Quality)")
    p.add_argument("catalog")
    p.add_argument("--map", action="append", metavar="FIELD=COLUMN", help="e.g. id=product_id for the shared shoe sets")
    p.add_argument("--limit", type=int, default=None, help="use a seeded sample of N products")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--category-field", default="category", help="field for category precision@5")
    p.add_argument(
        "--eval-split",
        type=float,
        metavar="FRACTION",
        help="product-disjoint split: fit whitening on the other products, measure on this share only",
    )
    p.add_argument(
        "--split-file",
        metavar="SPLIT_JSON",
        help="the split.json of a `vsearch train` run: measure on its held-out test products only "
        "(whitening fitted on its training products)",
    )
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--markdown", help="also write the markdown table to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="measure throughput, latency, Annoy recall and memory (README: Performance)")
    from engine.bench import add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "train", help="fine-tune VGG16 on the catalog's own images (README: Training)", description=TRAIN_HELP
    )
    from engine.train import add_train_arguments

    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="run the chat channels, HTTP API and web page")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    load_dotenv_file()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except VsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES if isinstance(exc, kind))
    except OSError as exc:  # e.g. a full disk under VSEARCH_DATA_DIR
        print(f"error: could not read or write a file: {exc}. Free disk space or fix the path, then run it again.",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
