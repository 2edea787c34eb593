"""The request fields that constrain the output -> one StructuredOutputsParams.

OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` extra and its
older `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`, and a forced tool call
(`tool_choice` named or required, see tools/plan.py) each give a spec; at most one may be set.
The schema of a json_schema response format is always enforced (as vLLM does): `strict` is
accepted, and properties beyond the schema's are allowed only where it says so.
"""

from __future__ import annotations

from typing import Any

from pagoda.adapters.openai.errors import invalid_param
from pagoda.adapters.openai.protocol import ResponseFormat, SamplingRequest
from pagoda.backend.errors import InvalidParameter
from pagoda.backend.structured import StructuredOutputsParams

# vLLM's older extras -> the StructuredOutputsParams field each one sets.
_GUIDED_FIELDS = {
    "guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_outputs_of(
    request: SamplingRequest, forced_tool_call: StructuredOutputsParams | None = None
) -> tuple[StructuredOutputsParams | None, str]:
    """The request's spec, and the request field it came from (for the param of an error the
    engine raises compiling it). A 400 naming the field for a malformed or second spec."""
    specs: list[tuple[str, dict[str, Any]]] = []
    if request.response_format is not None:
        fields = _response_format_fields(request.response_format)
        if fields is not None:
            specs.append(("response_format", fields))
    if request.structured_outputs is not None:
        fields = request.structured_outputs.model_dump(exclude_none=True)
        if "json_schema" in fields:
            fields["json"] = fields.pop("json_schema")
        specs.append(("structured_outputs", fields))
    for name, field in _GUIDED_FIELDS.items():
        if getattr(request, name) is not None:
            specs.append((name, {field: getattr(request, name)}))
    if forced_tool_call is not None:
        if specs:
            raise invalid_param(
                f"{specs[0][0]} cannot be combined with a forced tool call (tool_choice)",
                "tool_choice",
            )
        return forced_tool_call, "tool_choice"
    if not specs:
        return None, "structured_outputs"
    if len(specs) > 1:
        names = ", ".join(name for name, _ in specs)
        raise invalid_param(f"only one of {names} may constrain the output", specs[1][0])
    name, fields = specs[0]
    try:
        return StructuredOutputsParams(**fields), name
    except InvalidParameter as error:
        raise invalid_param(f"{name}: {error}", name) from None


def _response_format_fields(response_format: ResponseFormat) -> dict[str, Any] | None:
    """StructuredOutputsParams fields for a response_format; None for plain text."""
    if response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"json_object": True}
    if response_format.type == "json_schema":
        json_schema = response_format.json_schema
        if json_schema is None:
            raise invalid_param(
                "response_format: type json_schema needs a json_schema object",
                "response_format.json_schema",
            )
        if json_schema.json_schema is None:
            return {"json_object": True}  # a schema-less json_schema: any JSON object
        return {"json": json_schema.json_schema}
    raise invalid_param(
        "response_format type must be 'text', 'json_object' or 'json_schema', got "
        f"{response_format.type!r}",
        "response_format",
    )
