"""What the masked-pooling benchmarks share: the options naming a `vsearch train` run, its held-out products as
a catalog, and the engine as deployed with its weights (masked pooling)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.features import FeatureExtractor  # noqa: E402
from engine.train import read_train_catalog, write_val_catalog  # noqa: E402


def add_run_arguments(parser: argparse.ArgumentParser, seeds: str) -> None:
    parser.add_argument("--split", required=True, help="split.json written by vsearch train")
    parser.add_argument("--weights", required=True, help="weights written by vsearch train (with a mask head)")
    parser.add_argument("--products", choices=("val", "test"), default="val")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--feature-block", type=int, choices=(4, 5), default=4)
    parser.add_argument("--seeds", default=seeds, help="seeds of the query augmentations, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)


def held_out_catalog(args: argparse.Namespace) -> tuple[Path, int]:
    """The split's --products written as a catalog beside split.json, and how many products it holds."""
    split = json.loads(Path(args.split).read_text(encoding="utf-8"))
    catalog = read_train_catalog(Path(split["catalog"]), None)
    ids = split.get(args.products) or split["eval"]
    return write_val_catalog(catalog, ids, Path(args.split).with_name(f"{args.products}_catalog.csv")), len(ids)


def masked_engine(args: argparse.Namespace) -> FeatureExtractor:
    return FeatureExtractor(args.weights, "auto", image_size=args.size, threads=args.threads, localize="mask",
                            feature_block=args.feature_block)
