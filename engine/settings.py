"""Engine settings read from the environment (and a `.env` file), validated once at start."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.errors import SettingsError
from engine.pooling import POOLINGS

PRECISIONS = ("auto", "fp32", "bf16")
# How the product is found with the mask head of `vsearch train` weights: "mask" (pooling over the product's
# cells of the embedding pass), "crop" (the query's product on white, cropped to, then embedded), "off"; "on"
# is "crop", "auto" the default method (engine.features.DEFAULT_LOCALIZATION) when the weights carry a head.
LOCALIZE_MODES = ("auto", "on", "crop", "mask", "off")
# Defaults chosen by `vsearch eval` (README, "Quality"): not guesses.
DEFAULT_POOLING = "avg"
DEFAULT_WHITENING = True
# VSEARCH_WHITENING: a yes/no value, or which whitening: "pca" (fitted on the catalog) or "learned" (the one
# `vsearch train` ships beside its weights). Yes ("auto") takes the learned one where the weights have it.
WHITENING_METHODS = ("auto", "pca", "learned")
# Principal directions the whitening keeps in the index (0: all of the pooled vector's 512). 256 halves the
# Annoy index and its distance cost, within noise in `vsearch eval` (README, Quality and Performance).
DEFAULT_INDEX_DIMS = 256
MIN_INDEX_DIMS = 8
# Re-ranking by the category vote of the top products (engine.ranking.category_vote_rerank); 0 turns it off.
# 0.5: the largest of 0.1, 0.25, 0.5, 1 and inf that kept clean, photo-like and cluttered recall on run 12's
# validation products (README, Quality: "Re-ranking by the category vote").
DEFAULT_CATEGORY_BOOST = 0.5
# Who votes: the top products by (1 - this) x similarity + this x silhouette similarity (engine.shape), where the
# engine draws silhouettes (masked pooling); 0: by similarity alone. 0.7: the rule on run 12's validation
# products (README, Quality: "The silhouette in the category vote").
DEFAULT_SHAPE_WEIGHT = 0.7


@dataclass(frozen=True)
class EngineSettings:
    data_dir: Path = Path("vsearch-data")
    weights: str = "imagenet"  # "imagenet", "random" or a path to a .pth state dict
    precision: str = "auto"
    top_k: int = 5
    catalog: str | None = None
    pooling: str = DEFAULT_POOLING
    whitening: bool = DEFAULT_WHITENING
    whitening_method: str = "auto"  # one of WHITENING_METHODS (used when `whitening` is on)
    index_dims: int = DEFAULT_INDEX_DIMS  # dims the whitening keeps (0 = all); without whitening, all are kept
    image_size: int = 224
    threads: int = 0  # 0 = auto: all cores but one (see FeatureExtractor)
    localize: str = "auto"
    feature_block: int = 5  # the conv block whose output is pooled (4 for weights trained by `vsearch train`)
    category_boost: float = DEFAULT_CATEGORY_BOOST  # search results: the photo's likely category first (0: off)
    shape_weight: float = DEFAULT_SHAPE_WEIGHT  # the silhouette's share in choosing the category vote's voters

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineSettings:
        env = os.environ if environ is None else environ
        weights = env.get("VSEARCH_WEIGHTS", "imagenet").strip() or "imagenet"
        if weights not in ("imagenet", "random") and not Path(weights).is_file():
            raise SettingsError(
                "VSEARCH_WEIGHTS",
                f"{weights!r} is neither 'imagenet', 'random' nor an existing .pth file",
            )
        precision = env.get("VSEARCH_PRECISION", "auto").strip().lower() or "auto"
        if precision not in PRECISIONS:
            raise SettingsError("VSEARCH_PRECISION", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
        card = card_index_settings(weights)
        default_pooling = card.get("VSEARCH_POOLING", DEFAULT_POOLING)
        pooling = env.get("VSEARCH_POOLING", default_pooling).strip().lower() or default_pooling
        index_dims = parse_int({**card, **env}, "VSEARCH_INDEX_DIMS", DEFAULT_INDEX_DIMS, low=0, high=4096)
        if 0 < index_dims < MIN_INDEX_DIMS:
            raise SettingsError("VSEARCH_INDEX_DIMS", f"{index_dims} is below {MIN_INDEX_DIMS} (0 keeps all dims)")
        if pooling not in POOLINGS:
            raise SettingsError("VSEARCH_POOLING", f"{pooling!r} is not one of {', '.join(POOLINGS)}")
        whitening, whitening_method = parse_whitening({**card, **env})
        if whitening_method == "learned" and not learned_whitening_file(weights).is_file():
            raise SettingsError(
                "VSEARCH_WHITENING",
                f"'learned', but the weights {weights} have no learned whitening ({learned_whitening_file(weights)}); "
                "use weights written by `vsearch train`, or set it to pca",
            )
        localize = env.get("VSEARCH_LOCALIZE", "auto").strip().lower() or "auto"
        if localize not in LOCALIZE_MODES:
            raise SettingsError("VSEARCH_LOCALIZE", f"{localize!r} is not one of {', '.join(LOCALIZE_MODES)}")
        return cls(
            data_dir=Path(env.get("VSEARCH_DATA_DIR", "").strip() or "vsearch-data"),
            weights=weights,
            precision=precision,
            top_k=parse_int(env, "VSEARCH_TOP_K", 5, low=1, high=50),
            catalog=env.get("VSEARCH_CATALOG", "").strip() or None,
            pooling=pooling,
            whitening=whitening,
            whitening_method=whitening_method,
            index_dims=index_dims,
            image_size=parse_int({**card, **env}, "VSEARCH_IMAGE_SIZE", 224, low=32, high=1024),
            threads=parse_int(env, "VSEARCH_THREADS", 0, low=0, high=1024),
            localize=localize,
            feature_block=parse_int({**card, **env}, "VSEARCH_FEATURE_BLOCK", 5, low=4, high=5),
            category_boost=parse_boost(env, "VSEARCH_CATEGORY_BOOST", DEFAULT_CATEGORY_BOOST),
            shape_weight=parse_float(env, "VSEARCH_SHAPE_WEIGHT", DEFAULT_SHAPE_WEIGHT, 0.0, 1.0,
                                     "0: the vote by similarity alone, 1: by silhouette alone"),
        )


CARD_SETTINGS = (
    "VSEARCH_POOLING", "VSEARCH_WHITENING", "VSEARCH_INDEX_DIMS", "VSEARCH_IMAGE_SIZE", "VSEARCH_FEATURE_BLOCK"
)


def card_index_settings(weights: str) -> dict[str, str]:
    """The index settings a `vsearch train` model card (weights.json beside weights.pth) recommends, e.g.
    {"VSEARCH_POOLING": "gem", "VSEARCH_WHITENING": "true"}: the defaults for those weights, which the
    environment still overrides. Empty for "imagenet", "random" and files without a card."""
    if weights in ("imagenet", "random"):
        return {}
    card_path = Path(weights).with_suffix(".json")
    if not card_path.is_file():
        return {}
    try:
        recommended = json.loads(card_path.read_text(encoding="utf-8")).get("index_settings") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise SettingsError("VSEARCH_WEIGHTS", f"the model card {card_path} cannot be read ({exc})") from None
    if not isinstance(recommended, dict):
        raise SettingsError("VSEARCH_WEIGHTS", f"the model card {card_path} has no valid index_settings")
    return {k: str(v).lower() for k, v in recommended.items() if k in CARD_SETTINGS}


def parse_int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, f"{raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise SettingsError(name, f"{value} is outside {low}..{high}")
    return value


def parse_float(env: Mapping[str, str], name: str, default: float, low: float, high: float, hint: str) -> float:
    """A number within low..high (inf allowed where high is inf); `hint` says what the values mean."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(name, f"{raw!r} is not a number ({hint})") from None
    if not low <= value <= high:  # also refuses nan
        raise SettingsError(name, f"{raw!r} is outside {low:g}..{high:g} ({hint})")
    return value


def parse_boost(env: Mapping[str, str], name: str, default: float) -> float:
    """A boost of 0 or more; "inf" ranks by category first."""
    return parse_float(env, name, default, 0.0, math.inf, "0 turns it off, inf ranks by category first")


def parse_whitening(env: Mapping[str, str]) -> tuple[bool, str]:
    """VSEARCH_WHITENING -> (on, method): yes/no values as before, or "pca" / "learned" (on, that method)."""
    raw = env.get("VSEARCH_WHITENING", "").strip().lower()
    if raw in WHITENING_METHODS:
        return True, raw
    try:
        return parse_bool(env, "VSEARCH_WHITENING", DEFAULT_WHITENING), "auto"
    except SettingsError:
        raise SettingsError("VSEARCH_WHITENING", f"{raw!r} is not true, false, pca or learned") from None


def learned_whitening_file(weights: str) -> Path:
    """Where `vsearch train` puts the learned whitening of a weights file (engine.learned_whitening)."""
    return Path(weights).with_suffix(".whitening.npz")


def parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(name, f"{raw!r} is not a yes/no value (use true or false)")


def load_dotenv_file(path: Path = Path(".env")) -> None:
    """Read `.env` in the working directory; variables already set in the environment win."""
    if path.is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)
