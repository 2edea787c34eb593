"""Package attributes imported on first use (PEP 562), so that importing a light module of a
package does not import the package's heavy ones: `pagoda --help` reads the engine's flags from
pagoda.backend.config without paying the seconds that torch and transformers take to import."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, sources: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: attribute `name` is `sources[name]`'s attribute of
    that name, imported when first read."""

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(sources[name]), name)

    return __getattr__
