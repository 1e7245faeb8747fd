"""Resolve `VSEARCH_WEIGHTS` to a VGG16 conv stack: ImageNet from the torch hub cache, a file, or seeded random."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import WeightsError
from engine.localize import MaskHead, load_head, split_state

log = logging.getLogger(__name__)

IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
IMAGENET_FILE = "vgg16-397923af.pth"
RANDOM_SEED = 0
# torchvision's configuration "D": channels per 3x3 conv, "M" a 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@dataclass(frozen=True)
class LoadedWeights:
    features: nn.Sequential  # the conv part only; the classifier is never kept
    weights_id: str  # recorded in the index manifest, e.g. "imagenet:397923af"
    arch: str  # "vgg16" or "vgg16_bn"
    mask_head: MaskHead | None = None  # the product localiser, in weights written by `vsearch train`


def hub_checkpoint_path() -> Path:
    """Where torchvision keeps the ImageNet file: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def vgg16_features(batch_norm: bool = False) -> nn.Sequential:
    """torchvision's VGG16 (or VGG16-BN) `features`, layer for layer with the same state-dict keys.

    Built here rather than through torchvision, so that the classifier (~120M parameters, ~500 MB)
    is never allocated and torchvision is never imported by a serving process.
    """
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(channels, int(item), kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]
        channels = int(item)
    return nn.Sequential(*layers)


def random_features(arch: str = "vgg16", seed: int = RANDOM_SEED) -> nn.Sequential:
    """Seeded random init as torchvision's VGG does it (Kaiming normal, fan-out), identical on every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = vgg16_features(batch_norm=arch == "vgg16_bn")
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    return features


def _features_for(arch: str) -> nn.Sequential:
    return vgg16_features(batch_norm=arch == "vgg16_bn")


def _features_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a full VGG16 state dict ("features.N.*") or a features-only one ("N.*")."""
    if any(k.startswith("features.") for k in state):
        return {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    return dict(state)


def _arch_of(features_state: dict[str, torch.Tensor]) -> str:
    return "vgg16_bn" if any(k.endswith("running_mean") for k in features_state) else "vgg16"


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsError(
            f"Cannot read weights file {path}: {exc}.",
            "Point VSEARCH_WEIGHTS at a VGG16 state dict (.pth), or use 'imagenet' or 'random'.",
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path} holds no state dict.", "Save it with torch.save(model.state_dict(), path).")
    return state


def _build(features_state: dict[str, torch.Tensor], source: str) -> tuple[nn.Sequential, str]:
    arch = _arch_of(features_state)
    features = _features_for(arch)
    try:
        features.load_state_dict(features_state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"The weights in {source} do not fit torchvision's {arch} conv layers: {str(exc)[:300]}",
            "Use a VGG16 (or VGG16-BN) state dict, full or features-only.",
        ) from exc
    return features, arch


def ensure_imagenet_file(progress: bool = True) -> Path:
    path = hub_checkpoint_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading ImageNet VGG16 weights to %s", path)
    try:
        torch.hub.download_url_to_file(IMAGENET_URL, str(path), hash_prefix="397923af", progress=progress)
    except Exception as exc:
        raise WeightsError(
            f"The ImageNet VGG16 weights are not in the cache and could not be downloaded ({exc}).",
            f"Place {IMAGENET_FILE} (from {IMAGENET_URL}) at {path} (set TORCH_HOME to move the cache), "
            "or set VSEARCH_WEIGHTS to a local .pth file, or VSEARCH_WEIGHTS=random for an offline demo.",
        ) from exc
    return path


def load_weights(spec: str, progress: bool = True) -> LoadedWeights:
    """`spec` is "imagenet", "random" or a path to a .pth state dict (full VGG16, features only, or VGG16-BN)."""
    if spec == "random":
        log.warning("VSEARCH_WEIGHTS=random: seeded random VGG16 weights; search results are not meaningful")
        return LoadedWeights(features=random_features("vgg16"), weights_id=f"random:seed{RANDOM_SEED}", arch="vgg16")
    if spec == "imagenet":
        path = ensure_imagenet_file(progress)
        features, arch = _build(_features_state(_load_state_file(path)), str(path))
        return LoadedWeights(features=features, weights_id="imagenet:397923af", arch=arch)
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise WeightsError(
            f"Weights file {path} does not exist.", "Set VSEARCH_WEIGHTS to 'imagenet', 'random' or a .pth file."
        )
    conv_state, head_state = split_state(_load_state_file(path))
    features, arch = _build(_features_state(conv_state), str(path))
    try:
        head = load_head(head_state) if head_state else None
    except RuntimeError as exc:
        raise WeightsError(
            f"The mask head in {path} does not fit this version's: {str(exc)[:300]}",
            "Retrain with `vsearch train` of this version, or strip the mask_head.* keys from the file.",
        ) from exc
    return LoadedWeights(features=features, weights_id=f"file:{path.name}:{file_sha256(path)[:12]}", arch=arch,
                         mask_head=head)
