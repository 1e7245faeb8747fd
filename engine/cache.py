"""Feature cache on disk: vectors keyed by image content hash + weights + pooling + size (SQLite)."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import numpy as np


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureCache:
    """Reindexing an unchanged catalog extracts nothing; a changed one only its new images."""

    def __init__(self, folder: Path, namespace: str) -> None:
        # namespace = weights id + pooling + image size: vectors of other models never mix.
        folder.mkdir(parents=True, exist_ok=True)
        self.namespace = namespace
        self._lock = threading.Lock()
        self._db = sqlite3.connect(folder / "features.sqlite", check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS features (namespace TEXT, key TEXT, vec BLOB, PRIMARY KEY (namespace, key))"
        )
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, vec FROM features WHERE namespace = ? AND key IN ({marks})",
                    [self.namespace, *chunk],
                ).fetchall()
                for key, blob in rows:
                    found[key] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO features (namespace, key, vec) VALUES (?, ?, ?)",
                [(self.namespace, k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()
