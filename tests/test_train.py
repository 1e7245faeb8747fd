"""`vsearch train` on a tiny generated catalog: loss, checkpoint, resume, model card, weights and split."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.features import preprocess
from engine.localize import CleanupParams, MaskHead, mask_target
from engine.settings import EngineSettings, learned_whitening_file
from engine.train import (
    CARD,
    CHECKPOINT,
    DEFAULT_CATEGORY_STRETCH,
    DEFAULT_CATEGORY_WEIGHT,
    SPLIT,
    WEIGHTS,
    Embedder,
    TrainConfig,
    build_features,
    index_image_size,
    lr_factor,
    make_views,
    nt_xent,
    train,
    train_step,
)
from engine.weights import load_weights
from indexer.build import build_index
from indexer.demo import make_demo_catalog

SIZE = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine that is faster than two, and restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_catalog(tmp_path_factory.mktemp("train-catalog"), products=8, image_size=96)


@pytest.fixture(scope="module")
def run(catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, object]:
    torch.manual_seed(0)
    config = TrainConfig(
        catalog=catalog, out=tmp_path_factory.mktemp("train-run"), weights="random", epochs=2, image_size=SIZE,
        batch_size=4, eval_fraction=0.25, workers=0, val_limit=None, progress=False,
    )
    return config, train(config)


def test_nt_xent_prefers_matching_views() -> None:
    a = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    matched = nt_xent(a, a, 0.1)
    shuffled = nt_xent(a, a[torch.tensor([1, 2, 3, 4, 5, 0])], 0.1)
    assert matched < shuffled
    assert matched < 0.5


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    assert lr_factor(0.0) < lr_factor(0.05)
    assert lr_factor(0.05) == pytest.approx(1.0)
    assert lr_factor(0.5) < 1.0
    assert lr_factor(1.0) == pytest.approx(0.0, abs=1e-9)


def test_views_are_seeded_and_differ_from_each_other(catalog: Path) -> None:
    img = Image.open(catalog.parent / "images" / "demo-002-1.jpg").convert("RGB")
    a1, p1 = make_views(img, img, random.Random("x"))
    a2, p2 = make_views(img, img, random.Random("x"))
    assert a1.image.tobytes() == a2.image.tobytes() and p1.image.tobytes() == p2.image.tobytes()
    assert p1.mask.tobytes() == p2.mask.tobytes()
    assert p1.image.size == img.size and a1.image.tobytes() != p1.image.tobytes()
    for view in (a1, p1):
        assert view.mask.mode == "L" and view.mask.size == view.image.size
        covered = np.asarray(view.mask).mean() / 255
        assert 0.02 < covered < 0.98  # the product: neither nothing nor the whole picture


def test_loss_falls_on_a_fixed_batch(catalog: Path) -> None:
    torch.manual_seed(0)
    features, arch, _ = build_features("random", "auto", seed=0)
    assert arch == "vgg16_bn"
    model = Embedder(features, MaskHead(image_size=SIZE)).to(memory_format=torch.channels_last).train()
    files = sorted((catalog.parent / "images").glob("*-1.jpg"))[:4]
    pairs = [make_views(Image.open(f).convert("RGB"), Image.open(f).convert("RGB"), random.Random(i))
             for i, f in enumerate(files)]
    a = torch.from_numpy(np.stack([preprocess(x.image, SIZE) for x, _ in pairs]))
    b = torch.from_numpy(np.stack([preprocess(y.image, SIZE) for _, y in pairs]))
    masks = torch.from_numpy(np.stack([mask_target(v.mask, SIZE) for v in [x for x, _ in pairs] + [y for _, y in pairs]]))
    assert masks.shape == (8, SIZE // 4, SIZE // 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, mask_losses, _ = zip(*[train_step(model, optimizer, a, b, masks, 0.1) for _ in range(8)], strict=True)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    assert np.mean(mask_losses[-3:]) < 0.9 * np.mean(mask_losses[:3]), mask_losses


def test_run_writes_checkpoint_weights_card_and_split(run) -> None:
    config, result = run
    out = Path(config.out)
    for name in (CHECKPOINT, WEIGHTS, CARD, SPLIT):
        assert (out / name).is_file(), name
    card = json.loads((out / CARD).read_text())
    assert card["epochs_done"] == 2 and card["status"] == "done"
    assert card["arch"] == "vgg16_bn" and card["image_size"] == SIZE
    assert card["start_weights"] == "random:vgg16_bn:seed0"
    assert len(card["catalog_sha256"]) == 64
    assert card["split"]["eval_products"] == 2 and card["split"]["train_products"] == 6
    assert set(card["validation"]["before"]) >= {"photo_r5", "clean_r5"}
    assert card["validation"]["before"]["clean_r5"] is not None
    assert [h["epoch"] for h in card["history"]] == [1, 2]
    assert all(h["loss"] > 0 and h["mask_loss"] > 0 for h in card["history"])
    assert card["mask_head"]["image_size"] == SIZE
    assert card["wall_seconds"] > 0 and card["device"]
    # On by default: the demo catalog's styles are its categories.
    assert card["loss"]["category"]["weight"] == DEFAULT_CATEGORY_WEIGHT
    assert all(h["category_loss"] > 0 for h in card["history"])


def test_split_is_product_disjoint_and_validation_uses_eval_products_only(run) -> None:
    config, _ = run
    out = Path(config.out)
    split = json.loads((out / SPLIT).read_text())
    assert split["eval"] and split["train"]
    assert not set(split["eval"]) & set(split["train"])
    assert len(set(split["eval"]) | set(split["train"])) == 8
    val_rows = (out / "val_catalog.csv").read_text().splitlines()[1:]
    val_ids = {row.split(",")[0] for row in val_rows}
    assert val_ids == set(split["val"]) and set(split["val"]) <= set(split["eval"])
    # The test products never chose anything: held out and not validated on.
    assert set(split["test"]) == set(split["eval"]) - set(split["val"])


def test_resume_continues_from_the_checkpoint(run) -> None:
    config, first = run
    again = train(TrainConfig(**{**config.__dict__, "epochs": 3, "resume": True}))
    assert again.state.epochs_done == 3
    assert [h["epoch"] for h in again.state.history] == [1, 2, 3]
    assert again.state.before == first.state.before  # the starting figures are carried, not re-measured
    assert again.state.seconds > first.state.seconds


def test_a_second_run_in_the_same_folder_needs_resume(run) -> None:
    config, _ = run
    from engine.errors import VsearchError

    with pytest.raises(VsearchError, match="--resume"):
        train(config)


def test_weights_load_and_an_index_built_with_them_answers(run, catalog: Path, tmp_path: Path) -> None:
    config, result = run
    loaded = load_weights(str(result.weights))
    assert loaded.arch == "vgg16_bn" and loaded.weights_id.startswith("file:weights.pth:")
    assert loaded.mask_head is not None and int(loaded.mask_head.image_size) == SIZE
    # The model card beside the weights gives their index settings as defaults; the environment wins.
    from_card = EngineSettings.from_env({"VSEARCH_WEIGHTS": str(result.weights)})
    assert (from_card.pooling, from_card.whitening, from_card.index_dims) == ("gem", True, 0)
    assert from_card.image_size == index_image_size(SIZE) == 64
    assert from_card.feature_block == 4  # `--feature-block` default: the index pools conv block 4
    overridden = EngineSettings.from_env({"VSEARCH_WEIGHTS": str(result.weights), "VSEARCH_POOLING": "avg",
                                          "VSEARCH_IMAGE_SIZE": "48"})
    assert (overridden.pooling, overridden.image_size) == ("avg", 48)
    settings = EngineSettings(data_dir=tmp_path / "data", weights=str(result.weights), precision="fp32",
                              image_size=SIZE)
    report = build_index(catalog, settings)
    assert report.products == 8

    from engine.search import Searcher

    searcher = Searcher(settings)
    # VSEARCH_LOCALIZE=auto: the weights have a mask head, so masked pooling (the default way) is on.
    assert searcher.extractor.localization == "mask" and searcher.manifest.framing == "masked"
    query = (catalog.parent / "images" / "demo-003-1.jpg").read_bytes()
    assert len(searcher.search(query, 3).matches) == 3  # two epochs at 40 px: the mask head is not trained yet

    # Localisation off: the index pooled over products no longer fits; rebuilt, the product is found.
    from engine.errors import ReindexRequired

    plain = dataclasses.replace(settings, localize="off")
    with pytest.raises(ReindexRequired, match="framing"):
        Searcher(plain).search(query, 3)
    build_index(catalog, plain)
    found = Searcher(plain).search(query, 3)
    assert found.matches[0].product.id == "demo-003"

    # Cropping (VSEARCH_LOCALIZE=crop) is another framing: its index answers, the default engine asks to reindex.
    cropping = dataclasses.replace(settings, localize="crop")
    build_index(catalog, cropping)
    searcher = Searcher(cropping)
    assert searcher.manifest.framing == "product" and len(searcher.search(query, 3).matches) == 3
    with pytest.raises(ReindexRequired, match="framing"):
        Searcher(settings).search(query, 3)


def test_a_learned_whitening_is_fitted_beside_the_weights_and_the_index_uses_it(
    run, catalog: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, result = run
    path = learned_whitening_file(str(result.weights))
    assert path.is_file()
    entry = json.loads((Path(config.out) / CARD).read_text())["learned_whitening"]
    # All 6 training products (fewer than --whitening-products), two photo-like views each.
    assert (entry["file"], entry["products"], entry["pairs"]) == (path.name, 6, 12)
    assert entry["category_stretch"] == 0.0  # 1-2 training products per category: too few to stretch
    assert (entry["image_size"], entry["feature_block"], entry["framing"]) == (index_image_size(SIZE), 4, "masked")
    assert entry["weights_id"] == load_weights(str(result.weights)).weights_id
    for method in ("learned", "pca"):
        assert entry["validation"][method]["clean_r5"] is not None

    env = {"VSEARCH_WEIGHTS": str(result.weights), "VSEARCH_DATA_DIR": str(tmp_path / "data"),
           "VSEARCH_PRECISION": "fp32"}
    settings = EngineSettings.from_env(env)  # the card's settings, which the whitening was fitted with
    build_index(catalog, settings)
    from engine.search import Searcher

    searcher = Searcher(settings)
    assert searcher.manifest.whitening_method == "learned"
    query = (catalog.parent / "images" / "demo-003-1.jpg").read_bytes()
    assert len(searcher.search(query, 3).matches) == 3
    build_index(catalog, dataclasses.replace(settings, whitening_method="pca"))
    assert Searcher(settings).manifest.whitening_method == "pca"
    # Vectors of another size do not fit it: PCA instead, with a warning; asked for explicitly, an error.
    other_size = dataclasses.replace(settings, image_size=SIZE)
    with caplog.at_level("WARNING", logger="engine.learned_whitening"):
        build_index(catalog, other_size)
    assert Searcher(other_size).manifest.whitening_method == "pca"
    assert f"image size {index_image_size(SIZE)} (now {SIZE})" in caplog.text
    from engine.errors import SettingsError

    with pytest.raises(SettingsError, match="VSEARCH_WHITENING"):
        build_index(catalog, dataclasses.replace(other_size, whitening_method="learned"))


def test_cli_entry_point_parses_options_and_trains(catalog: Path, tmp_path: Path, capsys) -> None:
    import argparse

    from engine.train import add_train_arguments, run_train

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args([str(catalog), "--out", str(tmp_path / "run"), "--epochs", "1", "--image-size", "32",
                              "--batch-size", "4", "--workers", "0", "--eval-fraction", "0.25", "--seed", "3",
                              "--category-stretch", "0.5"])
    assert args.category_stretch == 0.5
    # The run keeps the thread count it was started with, through the learned whitening (whose extractor would
    # otherwise take all cores but one), and its card says so.
    torch.set_num_threads(2)
    try:
        assert run_train(args) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    card = json.loads((tmp_path / "run" / CARD).read_text())
    assert card["epochs_done"] == 1 and card["image_size"] == 32 and card["split"]["seed"] == 3
    assert card["device"].endswith(", 2 threads"), card["device"]
    assert "VSEARCH_WEIGHTS=" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args([str(catalog), "--arch", "resnet"])


def test_proxy_loss_trains_resumes_and_refuses_another_loss_or_block(catalog: Path, tmp_path: Path) -> None:
    from engine.errors import VsearchError

    config = TrainConfig(catalog=catalog, out=tmp_path / "proxy", weights="random", epochs=1, image_size=SIZE,
                         batch_size=4, eval_fraction=0.25, workers=0, val_limit=None, progress=False, loss="proxy")
    first = train(config)
    assert first.state.loss == "proxy" and first.state.history[0]["loss"] > 0
    card = json.loads(first.card.read_text())
    assert card["loss"]["name"].startswith("proxy")
    again = train(TrainConfig(**{**config.__dict__, "epochs": 2, "resume": True}))
    assert again.state.epochs_done == 2
    with pytest.raises(VsearchError, match="--loss proxy"):
        train(TrainConfig(**{**config.__dict__, "epochs": 3, "resume": True, "loss": "nt-xent"}))
    with pytest.raises(VsearchError, match="--loss-block 5"):
        train(TrainConfig(**{**config.__dict__, "epochs": 3, "resume": True, "loss_block": 4}))
    assert card["loss"]["pooling"] == "gem p=3 of conv block 5" and card["index_settings"]["VSEARCH_FEATURE_BLOCK"] == 4


def test_category_term_is_off_without_two_categories_and_skips_products_without_one() -> None:
    from engine.train import CategoryTerm

    assert CategoryTerm.of_catalog(["boots", "boots", ""], 0.5, 8, 0) is None
    assert CategoryTerm.of_catalog(["boots", "sandals"], 0.0, 8, 0) is None
    term = CategoryTerm.of_catalog(["sandals", "", "boots", "sandals"], 0.5, 4, 0)
    assert term is not None and term.names == ["boots", "sandals"]
    assert term.of_product.tolist() == [1, -1, 0, 1]
    term.proxies.data = torch.eye(2, 4)
    z = torch.eye(2, 4)[[1, 0, 0, 1]]  # product 1 (no category) points anywhere: it does not count
    right = term.loss(z, torch.tensor([0, 1, 2, 3]))
    term.proxies.data = torch.eye(2, 4)[[1, 0]]
    wrong = term.loss(z, torch.tensor([0, 1, 2, 3]))
    assert right < 0.01 < wrong
    assert term.loss(z[:1], torch.tensor([1])) == 0  # a batch with no category at all adds nothing


def test_category_term_trains_is_reported_and_resume_keeps_it(
    catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine import learned_whitening
    from engine.errors import VsearchError

    # The 6 training products have 1-2 per style: let 2 count for the learned whitening's category directions.
    monkeypatch.setattr(learned_whitening, "MIN_CATEGORY_PRODUCTS", 2)
    config = TrainConfig(catalog=catalog, out=tmp_path / "cat", weights="random", epochs=1, image_size=SIZE,
                         batch_size=4, eval_fraction=0.25, workers=0, val_limit=None, progress=False,
                         category_weight=0.5)
    first = train(config)
    card = json.loads(first.card.read_text())
    # The demo catalog's styles are its categories.
    assert card["loss"]["category"]["field"] == "category" and len(card["loss"]["category"]["classes"]) >= 2
    assert first.state.categories == card["loss"]["category"]["classes"]
    assert card["history"][0]["category_loss"] > 0
    stretch = card["learned_whitening"]
    assert stretch["category_stretch"] == DEFAULT_CATEGORY_STRETCH and stretch["category_products"] >= 4
    assert set(stretch["categories"].split(",")) <= set(card["loss"]["category"]["classes"])
    assert len(stretch["categories"].split(",")) >= 2
    again = train(TrainConfig(**{**config.__dict__, "epochs": 2, "resume": True}))
    assert again.state.epochs_done == 2 and again.state.history[1]["category_loss"] > 0
    with pytest.raises(VsearchError, match="category term"):
        train(TrainConfig(**{**config.__dict__, "epochs": 3, "resume": True, "category_weight": 0.0}))


def test_category_sample_draws_up_to_n_products_of_each_category() -> None:
    from engine.train import category_sample

    products = [f"p{n:02d}" for n in range(30)]
    category_of = {p: ("shoes" if n < 20 else "boots" if n < 25 else None) for n, p in enumerate(products)}
    sample = category_sample(products, category_of, 10, seed=0)
    assert [c for _, c in sample].count("shoes") == 10 and [c for _, c in sample].count("boots") == 5
    assert all(category_of[p] == c for p, c in sample) and len({p for p, _ in sample}) == 15
    assert category_sample(products, category_of, 10, seed=0) == sample
    assert category_sample(products, category_of, 10, seed=1) != sample
    assert category_sample(products, {}, 10, seed=0) == []


def test_index_image_size_follows_the_training_size_up_to_the_engines_default() -> None:
    assert index_image_size(112) == 160  # the README's run; measured alike from 128 to 224 px
    assert index_image_size(224) == index_image_size(448) == 224
    assert index_image_size(16) == 32


def test_proxy_softmax_prefers_the_own_proxy() -> None:
    from engine.train import proxy_softmax

    proxies = torch.eye(4)
    z = torch.eye(4)[[0, 1, 2]]
    right = proxy_softmax(z, torch.tensor([0, 1, 2]), proxies, 0.05)
    wrong = proxy_softmax(z, torch.tensor([1, 2, 3]), proxies, 0.05)
    assert right < 0.01 < wrong


@pytest.mark.parametrize("loss_block", [4, 5])
def test_the_loss_trains_the_gem_of_its_conv_block(loss_block: int) -> None:
    """`--loss-block 4`: the trained vector is conv block 4's GeM; block 5 learns only through the mask head."""
    from engine.localize import up_to_block
    from engine.weights import vgg16_features

    torch.manual_seed(0)
    model = Embedder(vgg16_features(batch_norm=True), MaskHead(image_size=64), loss_block=loss_block)
    x = torch.rand(2, 3, 64, 64)
    z, _, z_index = model(x)
    assert z.shape == (2, 512) and torch.allclose(z.norm(dim=1), torch.ones(2))
    assert torch.equal(z, z_index)  # without an index block, the index's vector is the trained one
    z.sum().backward()
    block4 = up_to_block(model.features, 4)
    block5_convs = [m for m in model.features[len(block4):] if isinstance(m, torch.nn.Conv2d)]
    assert block4[-3].weight.grad is not None  # conv4_3 (before its batch norm and ReLU)
    assert all((m.weight.grad is not None) == (loss_block == 5) for m in block5_convs)


def test_the_category_term_trains_the_vector_the_index_holds() -> None:
    """The loss trains block 5, the index pools block 4: the category term's vector is block 4's GeM, as
    `FeatureExtractor` pools it, and its gradient stops at block 4."""
    from engine.localize import up_to_block
    from engine.pooling import gem_pool
    from engine.weights import vgg16_features

    torch.manual_seed(0)
    model = Embedder(vgg16_features(batch_norm=True), MaskHead(image_size=64), loss_block=5, index_block=4).eval()
    x = torch.rand(2, 3, 64, 64)
    z, _, z_index = model(x)
    block4 = up_to_block(model.features, 4)
    expected = torch.nn.functional.normalize(gem_pool(block4(x)), dim=1)
    assert torch.allclose(z_index, expected, atol=1e-5) and not torch.allclose(z, z_index)
    z_index.sum().backward()
    block5_convs = [m for m in model.features[len(block4):] if isinstance(m, torch.nn.Conv2d)]
    assert block4[-3].weight.grad is not None and all(m.weight.grad is None for m in block5_convs)


def test_validation_computes_the_vectors_the_engine_deploys(run, catalog: Path) -> None:
    """The per-epoch check sees each image as `Searcher` would with the card's settings: the default way of
    finding the product (masked pooling), conv block 4, the same maps."""
    from engine.features import DEFAULT_LOCALIZATION, FeatureExtractor
    from engine.train import validation_extractor

    _, result = run
    loaded = load_weights(str(result.weights))
    validating = validation_extractor(Embedder(loaded.features, loaded.mask_head).eval(), SIZE,
                                      torch.device("cpu"), "fp32", feature_block=4)
    deployed = FeatureExtractor(str(result.weights), "fp32", image_size=SIZE, threads=1, feature_block=4)
    assert validating.localization == deployed.localization == DEFAULT_LOCALIZATION == "mask"
    images = [Image.open(p).convert("RGB") for p in sorted((catalog.parent / "images").glob("*.jpg"))[:4]]
    framed = [deployed.frame_catalog_image(im) for im in images]
    assert [im.size for im in framed] == [validating.frame_catalog_image(im).size for im in images]
    # A head two epochs old is not trusted anywhere by the default clean-up: trust it, judged at its median.
    cleanup = CleanupParams(threshold=float(np.median(deployed.mask_probabilities(framed))), min_area=0.0,
                            max_area=1.0)
    deployed.cleanup = validating.cleanup = cleanup
    want = deployed.conv_maps(deployed.localize(framed))
    got = validating.conv_maps(validating.localize(framed))
    assert got.shape == want.shape == (4, 512, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    validating.localization = None
    unmasked = validating.conv_maps(framed)
    assert not torch.allclose(got, unmasked, rtol=1e-2)  # the cells were weighed by the mask
