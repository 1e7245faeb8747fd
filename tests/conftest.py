"""Shared fixtures: seeded random weights, a small feature extractor, a generated demo catalog."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("VSEARCH_WEIGHTS", "random")

TEST_IMAGE_SIZE = 128  # small inputs keep the suite fast; the pipeline is the same at 224
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def extractor():
    from engine.features import FeatureExtractor

    return FeatureExtractor("random", "auto", image_size=TEST_IMAGE_SIZE)


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory) -> Path:
    from indexer.demo import make_demo_catalog

    return make_demo_catalog(tmp_path_factory.mktemp("demo"), products=16, image_size=256)


@pytest.fixture
def engine_settings(tmp_path):
    from engine.settings import EngineSettings

    return EngineSettings(data_dir=tmp_path / "data", weights="random", image_size=TEST_IMAGE_SIZE)


@pytest.fixture(autouse=True)
def _no_outside_network(monkeypatch):
    """Tests may only reach loopback addresses: anything else fails loudly."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        is_ip = isinstance(host, str) and self.family in (socket.AF_INET, socket.AF_INET6)
        if is_ip and not (host.startswith("127.") or host in ("::1", "localhost")):
            raise RuntimeError(f"test tried to reach {host}: only loopback is allowed")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not (path / "catalog.csv").is_file():
        pytest.skip(f"shared dataset {path} is absent; this test needs ../shared/datasets/{name}")
    return path
