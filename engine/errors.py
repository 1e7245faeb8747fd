"""The small exception family of vsearch; every error carries a sentence a person can act on."""

from __future__ import annotations


class VsearchError(Exception):
    """Base class. `str(err)` says what went wrong; `hint` says what to do next."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class ImageRejected(VsearchError):
    """An input could not be used as an image. `reason` is a short machine-readable code."""

    REASONS = (
        "empty",
        "too_large",
        "too_many_pixels",
        "not_an_image",
        "unsupported_format",
        "truncated",
        "corrupt",
    )

    def __init__(self, reason: str, message: str, hint: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown ImageRejected reason {reason!r}")
        super().__init__(message, hint)
        self.reason = reason


class WeightsError(VsearchError):
    """Model weights could not be found, downloaded or read."""


class IndexNotReady(VsearchError):
    """No index has been built yet in the data dir."""


class ReindexRequired(VsearchError):
    """The current index was built with other weights, pooling or resolution than the engine runs."""


class SettingsError(VsearchError):
    """A setting (environment variable or option) is present but wrong."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class CatalogError(VsearchError):
    """The catalog as a whole cannot be read (single bad rows are reported, not raised)."""


class BuildFailed(VsearchError):
    """An index build produced nothing usable (e.g. no catalog image could be indexed)."""
