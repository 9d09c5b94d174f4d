"""The versions of the packages that shape a separation, recorded beside every cached stem and
trained model so that a number can be traced to the code that made it."""
from __future__ import annotations

import functools
import platform
from importlib import metadata

PACKAGES = ("torch", "numpy", "demucs", "openunmix", "asteroid", "julius")


def package_versions() -> dict:
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict:   # importlib.metadata costs ~10 ms a call: once per process
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
