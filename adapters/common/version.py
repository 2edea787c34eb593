"""The installed Pagoda's version, as servers report it (/version, /server_info)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def pagoda_version() -> str:
    try:
        return version("pagoda")
    except PackageNotFoundError:
        return "unknown"
