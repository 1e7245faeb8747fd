"""Product localisation: the mask head's plumbing and the clean-up that puts the product on white."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine.augment import EVAL_PARAMS, photo_like_with_mask
from engine.localize import (
    MASK_PREFIX,
    MASK_STRIDE,
    CleanupParams,
    MaskHead,
    block_outputs,
    clean_image,
    mask_target,
    product_weights,
    split_state,
    unpad,
)
from engine.weights import random_features, vgg16_features


def red_shoe(size: int = 200) -> Image.Image:
    """A red shoe-like shape on a white catalogue background."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.polygon([(30, 120), (60, 70), (120, 80), (170, 120), (170, 140), (30, 140)], fill=(200, 20, 20))
    return img


def red_share(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img.convert("RGB")).astype(int)
    return (arr[..., 0] > 140) & (arr[..., 1] < 90) & (arr[..., 2] < 90)


def test_photo_like_with_mask_is_the_photo_like_image_and_marks_the_product() -> None:
    from engine.augment import photo_like

    shoe = red_shoe()
    for seed in range(4):
        photo, mask = photo_like_with_mask(shoe, random.Random(seed))
        assert photo.tobytes() == photo_like(shoe, random.Random(seed)).tobytes()  # eval queries unchanged
        m = np.asarray(mask) > 127
        red = red_share(photo)
        assert red.sum() > 100
        # Nearly every clearly red pixel is inside the mask; the mask is not the whole picture.
        assert (red & m).sum() >= 0.9 * red.sum()
        assert m.mean() < 0.95


def test_block_outputs_are_the_five_conv_blocks() -> None:
    features = vgg16_features(batch_norm=True)
    blocks = block_outputs(features, torch.zeros(1, 3, 64, 64))
    assert [b.shape[1] for b in blocks] == [64, 128, 256, 512, 512]
    assert [b.shape[-1] for b in blocks] == [64, 32, 16, 8, 4]
    # The engine runs the stack without its last max-pool: the last block is still there.
    assert block_outputs(features[:-1], torch.zeros(1, 3, 64, 64))[-1].shape == blocks[-1].shape


def test_mask_head_gives_one_logit_per_4x4_cell() -> None:
    features = random_features("vgg16_bn")
    head = MaskHead(image_size=64)
    logits = head(*block_outputs(features, torch.zeros(2, 3, 64, 64))[2:5])
    assert logits.shape == (2, 1, 64 // MASK_STRIDE, 64 // MASK_STRIDE)


def test_mask_target_is_fitted_and_padded_like_preprocess() -> None:
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (0, 0, 100, 100))  # left half of a landscape image
    target = mask_target(mask, 64)
    assert target.shape == (16, 16)
    # preprocess pads a 2:1 image top and bottom: the first and last rows of cells are padding.
    assert target[0].max() == 0 and target[-1].max() == 0
    assert target[8, 2] == pytest.approx(1.0) and target[8, 13] == pytest.approx(0.0)


def test_unpad_keeps_the_image_part_of_the_square() -> None:
    prob = np.zeros((40, 40), np.float32)
    prob[10:30] = 1  # a 2:1 image fills rows 10..29 of its padded square
    region = unpad(prob, 200, 100)
    assert region.shape == (20, 40) and region.min() == 1


def test_clean_image_cuts_the_product_out_of_clutter() -> None:
    """A product pasted into clutter: with its mask, the crop holds all of it, on white, and little else."""
    shoe = red_shoe()
    photo, mask = photo_like_with_mask(shoe, EVAL_PARAMS.rng(0, "clutter"), clutter=True)
    side = max(photo.size)
    # The mask as the head would give it: over the padded square canvas, at a coarse resolution.
    square = Image.new("L", (side, side), 0)
    square.paste(mask, ((side - photo.width) // 2, (side - photo.height) // 2))
    prob = np.asarray(square.resize((side // 8, side // 8), Image.Resampling.BOX), dtype=np.float32) / 255
    cleaned = clean_image(photo, prob)
    assert cleaned is not None
    red_in, red_all = red_share(cleaned).sum(), red_share(photo).sum()
    assert red_in >= 0.9 * red_all  # the product is in the crop
    assert cleaned.width * cleaned.height < 0.8 * photo.width * photo.height  # clutter was cropped off
    arr = np.asarray(cleaned).astype(int)
    corners = np.concatenate([arr[:3, :3].reshape(-1, 3), arr[-3:, -3:].reshape(-1, 3)])
    assert (corners > 240).all()  # around the product: the catalog's white


def test_clean_image_keeps_the_photo_when_the_mask_is_not_trusted() -> None:
    photo = red_shoe()
    assert clean_image(photo, np.zeros((28, 28), np.float32)) is None  # nothing found
    assert clean_image(photo, np.ones((28, 28), np.float32)) is None  # everything: nothing to remove
    tiny = np.zeros((28, 28), np.float32)
    tiny[14, 14] = 1
    assert clean_image(photo, tiny, CleanupParams(min_area=0.03)) is None


def test_split_state_separates_the_head() -> None:
    head = MaskHead(image_size=96)
    state = {"0.weight": torch.zeros(1)} | {MASK_PREFIX + k: v for k, v in head.state_dict().items()}
    conv, head_state = split_state(state)
    assert list(conv) == ["0.weight"]
    assert head_state is not None and int(head_state["image_size"]) == 96
    assert split_state({"0.weight": torch.zeros(1)})[1] is None


def test_localize_on_needs_a_mask_head() -> None:
    from engine.errors import WeightsError
    from engine.features import FeatureExtractor

    for mode in ("on", "crop", "mask"):
        with pytest.raises(WeightsError, match=f"VSEARCH_LOCALIZE={mode}.*mask head"):
            FeatureExtractor("random", "fp32", image_size=64, localize=mode)


def test_folding_batch_norm_keeps_the_outputs() -> None:
    from engine.features import fold_batch_norm

    features = random_features("vgg16_bn")[:-1]
    for module in features.modules():  # non-trivial statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.running_mean, -0.2, 0.2)
            torch.nn.init.uniform_(module.running_var, 0.5, 2.0)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.1, 0.1)
    features.eval()
    folded = fold_batch_norm(features)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = features(x), folded(x)
        ref_blocks, out_blocks = block_outputs(features, x), block_outputs(folded, x)
    assert torch.allclose(ref, out, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
    assert [b.shape for b in ref_blocks] == [b.shape for b in out_blocks]


def test_localize_setting_is_validated() -> None:
    from engine.errors import SettingsError
    from engine.settings import EngineSettings

    assert EngineSettings.from_env({}).localize == "auto"
    assert EngineSettings.from_env({"VSEARCH_LOCALIZE": "Off"}).localize == "off"
    assert EngineSettings.from_env({"VSEARCH_LOCALIZE": "mask"}).localize == "mask"
    with pytest.raises(SettingsError, match="VSEARCH_LOCALIZE"):
        EngineSettings.from_env({"VSEARCH_LOCALIZE": "maybe"})


def test_eval_split_file_measures_the_held_out_test_products_only(tmp_path, demo_catalog, monkeypatch, capsys) -> None:
    """`vsearch eval --split-file RUN/split.json`: train products fit the whitening, test products are measured
    (not the validation products, which chose the best epoch)."""
    import csv
    import json

    from vsearch_cli.main import main as cli_main

    with open(demo_catalog, newline="", encoding="utf-8") as fh:
        ids = list(dict.fromkeys(row["id"] for row in csv.DictReader(fh)))
    split = {"train": ids[:-5], "eval": ids[-5:], "val": ids[-5:-3], "test": ids[-3:]}
    (tmp_path / "split.json").write_text(json.dumps(split), encoding="utf-8")
    monkeypatch.setenv("VSEARCH_WEIGHTS", "random")
    monkeypatch.setenv("VSEARCH_IMAGE_SIZE", "64")
    out = tmp_path / "report.json"
    assert cli_main(["eval", str(demo_catalog), "--split-file", str(tmp_path / "split.json"), "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["split"] == {"train_products": len(ids) - 5, "eval_products": 3}
    assert report["products"] == 3 and report["localized"] is False
    assert "cluttered R@5" in capsys.readouterr().out
    # the engine's category vote (VSEARCH_CATEGORY_BOOST, default 0.5) is measured beside each cosine method
    assert {"avg+cat0.5", "avg+white+cat0.5"} <= {m["method"] for m in report["methods"]}

    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    assert cli_main(["eval", str(demo_catalog), "--split-file", str(tmp_path / "bad.json")]) != 0


def test_an_unreadable_model_card_is_a_settings_error(tmp_path) -> None:
    from engine.errors import SettingsError
    from engine.settings import EngineSettings

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not read here")
    assert EngineSettings.from_env({"VSEARCH_WEIGHTS": str(weights)}).pooling == "avg"  # no card: defaults
    (tmp_path / "weights.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(SettingsError, match="model card"):
        EngineSettings.from_env({"VSEARCH_WEIGHTS": str(weights)})


def test_a_briefly_trained_mask_head_finds_the_product_in_clutter() -> None:
    """The head learns from paste masks alone (40 steps on a frozen random conv stack, 64 px); on photos it
    never saw, the cleaned crop holds the product and drops much of the clutter."""
    import torch.nn.functional as F

    from engine.augment import TRAIN_PARAMS
    from engine.features import preprocess
    from engine.localize import predict_masks

    torch.manual_seed(0)
    size = 64
    features = random_features("vgg16_bn").eval()
    head = MaskHead(image_size=size)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    shoe = red_shoe()
    losses = []
    for step in range(40):
        views = [photo_like_with_mask(shoe, random.Random(f"train:{step}:{i}"), params=TRAIN_PARAMS) for i in range(8)]
        x = torch.from_numpy(np.stack([preprocess(view, size) for view, _ in views]))
        y = torch.from_numpy(np.stack([mask_target(mask, size) for _, mask in views]))
        with torch.no_grad():
            blocks = block_outputs(features, x)
        loss = F.binary_cross_entropy_with_logits(head(*blocks[2:5])[:, 0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    head.eval()
    kept_area = []
    for seed in range(4):
        photo, _ = photo_like_with_mask(shoe, EVAL_PARAMS.rng(seed, "held-out"))
        with torch.no_grad():
            prob = predict_masks(features, head, torch.from_numpy(preprocess(photo, size)[None]))[0]
        cleaned = clean_image(photo, prob)
        assert cleaned is not None
        assert red_share(cleaned).sum() >= 0.9 * red_share(photo).sum()  # the product is in the crop
        kept_area.append(cleaned.width * cleaned.height / (photo.width * photo.height))
    assert np.mean(kept_area) < 0.75  # and much of the clutter is not


def test_product_weights_keep_the_product_and_distrust_a_mask_of_almost_nothing_or_everything() -> None:
    prob = torch.zeros(3, 1, 16, 16)
    prob[0, 0, 4:12, 0:8] = 0.9  # a product: the cells it covers on a 4x4 map of the same image
    prob[0, 0, 4:8, 8:12] = 0.5  # and one cell it is unsure of
    prob[1, 0, 0, 0] = 0.9  # 0.4% of the photo: not trusted
    prob[2] = 0.99  # everything: not trusted
    weights = product_weights(prob, (4, 4))
    assert weights.shape == (3, 1, 4, 4)
    expected = [[0, 0, 0, 0], [0.81, 0.81, 0.25, 0], [0.81, 0.81, 0, 0], [0, 0, 0, 0]]
    assert torch.allclose(weights[0, 0], torch.tensor(expected))  # the probability squared
    assert bool((weights[1:] == 1).all())


class LeftHalfHead(torch.nn.Module):
    """A stand-in mask head: the left half of every image is the product."""

    image_size = torch.tensor(64)

    def forward(self, block3: torch.Tensor, block4: torch.Tensor, block5: torch.Tensor) -> torch.Tensor:
        logits = torch.full_like(block3[:, :1], -10.0)
        logits[..., : block3.shape[-1] // 2] = 10.0
        return logits


def test_mask_localization_pools_only_the_products_cells_in_the_same_pass(tmp_path) -> None:
    """VSEARCH_LOCALIZE=mask: no crop and no second pass; the conv map's cells outside the product are weighed
    down to ~0 before pooling, for catalog images (framed on their product, as with crop) and queries alike."""
    from engine.features import FeatureExtractor

    state = dict(random_features("vgg16_bn").state_dict())
    state.update({MASK_PREFIX + k: v for k, v in MaskHead(image_size=64).state_dict().items()})
    torch.save(state, tmp_path / "trained.pth")
    masked = FeatureExtractor(str(tmp_path / "trained.pth"), "fp32", image_size=64, localize="mask", feature_block=4)
    plain = FeatureExtractor(str(tmp_path / "trained.pth"), "fp32", image_size=64, localize="off", feature_block=4)
    assert masked.localizes and masked.framing == "masked" and masked.query_draft_size == 64
    photo = red_shoe()
    assert masked.localize([photo]) == [photo]  # nothing is cut out
    assert masked.frame_catalog_image(photo).size != photo.size  # catalog images are framed on their product
    masked.mask_head = LeftHalfHead()
    kept, full = masked.conv_maps([photo]), plain.conv_maps([photo])
    assert kept.shape == full.shape == (1, 512, 8, 8)
    assert torch.allclose(kept[..., :4], full[..., :4], rtol=1e-3)  # the product's cells, weighed ~1
    assert float(kept[..., 4:].abs().max()) < 1e-6 * float(full.abs().max())  # the rest, ~0
    vector = masked.embed_queries([photo], "gem")[0]
    assert abs(float(vector @ vector) - 1) < 1e-5
