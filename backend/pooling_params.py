"""An embedding request's parameters, importable without torch (the CLI's flags read them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pagoda.backend.errors import InvalidParameter


class PoolingType(str, enum.Enum):
    LAST = "last"
    MEAN = "mean"


POOLING_TYPES = tuple(kind.value for kind in PoolingType)


@dataclass(frozen=True, slots=True)
class PoolingParams:
    """An embedding request's parameters (vLLM's PoolingParams)."""

    pooling_type: str | None = None  # "last" or "mean"; None: the engine's configured pooling
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            choices = ", ".join(POOLING_TYPES)
            raise InvalidParameter(
                "pooling_type",
                f"pooling_type must be one of {choices}, got {self.pooling_type!r}",
            )
