"""What a request's output must look like: one JSON schema, regular expression, list of choices,
grammar, or "any JSON object" (vLLM's StructuredOutputsParams, with the same field names)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagoda.backend.errors import InvalidParameter

# Backend names (vLLM's, and llguidance's own) -> "module:class"; imported on first use.
BACKENDS = {
    "xgrammar": "pagoda.backend.structured.xgrammar_backend:XGrammarBackend",
    "guidance": "pagoda.backend.structured.llguidance_backend:LLGuidanceBackend",
    "llguidance": "pagoda.backend.structured.llguidance_backend:LLGuidanceBackend",
}
DEFAULT_BACKEND = "xgrammar"

FIELD = "structured_outputs"


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """Exactly one field set. `json` is a JSON schema (a dict, or its JSON text); `grammar` is
    EBNF in the grammar backend's dialect (xgrammar: GBNF; llguidance: Lark, or GBNF)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        set_fields = [name for name in ("json", "regex", "choice", "grammar")
                      if getattr(self, name) is not None]
        if self.json_object:
            set_fields.append("json_object")
        if len(set_fields) != 1:
            raise InvalidParameter(
                FIELD,
                "structured_outputs must set exactly one of json, regex, choice, grammar and "
                f"json_object, got {set_fields or 'none'}",
            )
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", json.loads(self.json))
            except json.JSONDecodeError as error:
                raise InvalidParameter(FIELD, f"the JSON schema is not JSON: {error}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise InvalidParameter(FIELD, "the JSON schema must be a JSON object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidParameter(FIELD, f"{name} must be a non-empty string")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidParameter(
                    FIELD, "choice must be a non-empty list of non-empty strings"
                )
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """Which field is set: "json", "regex", "choice", "grammar" or "json_object"."""
        if self.json_object:
            return "json_object"
        return next(name for name in ("json", "regex", "choice", "grammar")
                    if getattr(self, name) is not None)

    @property
    def key(self) -> tuple[str, str]:
        """The spec as (kind, canonical text): equal specs compile to the same grammar, so this
        keys the compiled-grammar cache."""
        kind = self.kind
        if kind == "json":
            return kind, json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if kind == "choice":
            return kind, json.dumps(list(self.choice or ()))
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)
