"""The installed version of gflow (a leaf: imports nothing of gflow)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def gflow_version() -> str:
    """The installed distribution's version, or "0+unknown" in a source tree that
    is not installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


#: The distribution name on the package index (the import name is `gflow`;
#: `gflow` on the index is an unrelated tool).
DISTRIBUTION = "gflow-jax"
