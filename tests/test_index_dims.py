"""VSEARCH_INDEX_DIMS: the whitening's kept dims, from the setting to the built index and `vsearch eval`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.errors import SettingsError
from engine.evaluate import _methods, _Vectors
from engine.pooling import l2n
from engine.settings import DEFAULT_INDEX_DIMS, EngineSettings


def test_index_dims_setting_defaults_and_validates():
    assert EngineSettings.from_env({}).index_dims == DEFAULT_INDEX_DIMS == 256
    assert EngineSettings.from_env({"VSEARCH_INDEX_DIMS": "128"}).index_dims == 128
    assert EngineSettings.from_env({"VSEARCH_INDEX_DIMS": "0"}).index_dims == 0  # all dims
    for bad in ("-1", "4", "many", "5000"):
        with pytest.raises(SettingsError, match="VSEARCH_INDEX_DIMS"):
            EngineSettings.from_env({"VSEARCH_INDEX_DIMS": bad})


def test_eval_measures_whitening_at_each_requested_dims():
    rng = np.random.default_rng(0)
    pooled = l2n(rng.normal(size=(40, 32)))
    vectors = _Vectors(pooled={"avg": pooled}, raw=None)
    is_train = np.arange(40) < 20
    notes: list[str] = []
    methods = _methods(vectors, is_train, ~is_train, ["avg"], [False, True], False, notes, (None, 8, 32, 8, 100))
    assert [(m.result.method, m.result.dims, m.result.whitening) for m in methods] == [
        ("avg", 32, False), ("avg+white", 32, True), ("avg+white8", 8, True),
    ]
    assert methods[2].index.shape == (20, 8) and methods[2].project(vectors).shape == (40, 8)


def test_build_keeps_all_dims_when_index_dims_is_zero(demo_catalog, engine_settings, extractor):
    from engine.index import IndexStore
    from engine.search import Searcher
    from indexer.build import build_index

    settings = replace(engine_settings, index_dims=0)
    build_index(demo_catalog, settings, extractor=extractor)
    assert IndexStore(settings.index_dir).read_manifest().dims == 512
    result = Searcher(settings, extractor=extractor).similar("demo-001", 3)
    assert len(result.matches) == 3


def test_feature_block_setting_defaults_to_5_and_validates():
    assert EngineSettings.from_env({}).feature_block == 5
    assert EngineSettings.from_env({"VSEARCH_FEATURE_BLOCK": "4"}).feature_block == 4
    for bad in ("3", "6", "conv4"):
        with pytest.raises(SettingsError, match="VSEARCH_FEATURE_BLOCK"):
            EngineSettings.from_env({"VSEARCH_FEATURE_BLOCK": bad})
