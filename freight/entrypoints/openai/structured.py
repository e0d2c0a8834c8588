"""A request's output constraint, from OpenAI's response_format or vLLM's structured_outputs.

response_format {"type": "json_schema", "json_schema": {"schema": ...}} and
{"type": "json_object"} (chat and completions), vLLM's extra field
`structured_outputs: {json | regex | choice | grammar | json_object | structural_tag, ...}`,
and the older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields
all become one StructuredOutputsParams dict for SamplingParams.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

from freight.entrypoints.openai.errors import APIError, bad_request

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "guided_whitespace_pattern": "whitespace_pattern"}


def response_format_constraint(response_format: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not response_format:
        return None
    if not isinstance(response_format, dict):
        raise bad_request("'response_format' must be an object.", param="response_format", code="invalid_type")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise bad_request("'response_format.json_schema' must be an object with 'name' and 'schema'.",
                              param="response_format.json_schema", code="invalid_value")
        schema = spec.get("schema", {"type": "object"})  # OpenAI: the schema is optional
        if not isinstance(schema, dict):
            raise bad_request("'response_format.json_schema.schema' must be a JSON schema object.",
                              param="response_format.json_schema.schema", code="invalid_value")
        return {"json": schema}
    raise bad_request(f"Invalid value for 'response_format.type': {kind!r}. Supported values are: 'text', "
                      "'json_object' and 'json_schema'.", param="response_format.type", code="invalid_value")


def take_constraint(values: dict[str, Any], response_format: Optional[dict[str, Any]]) -> None:
    """Move the request's constraint fields out of values into values["structured_outputs"] (a dict)."""
    found: dict[str, Any] = {}
    so = values.pop("structured_outputs", None)
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("'structured_outputs' must be an object.", param="structured_outputs",
                              code="invalid_type")
        found["structured_outputs"] = dict(so)
    guided = {}
    for name, field in _GUIDED.items():
        value = values.pop(name, None)
        if value is not None:
            guided[field] = value
    values.pop("guided_decoding_backend", None)  # per-request backends are gone in vLLM v1 too
    if set(guided) - {"whitespace_pattern"}:
        found["guided_*"] = guided
    rf = response_format_constraint(response_format)
    if rf is not None:
        found["response_format"] = rf
    if len(found) > 1:
        raise bad_request(f"Only one output constraint may be given; got {', '.join(found)}.",
                          param=next(iter(found)))
    if found:
        values["structured_outputs"] = next(iter(found.values()))


def constraint_field(request: Any) -> Optional[str]:
    """The request field a constraint came from, to name it in errors (engine errors say structured_outputs)."""
    if getattr(request, "tool_choice", None) not in (None, "none", "auto"):
        return "tool_choice"
    rf = getattr(request, "response_format", None)
    if isinstance(rf, dict) and rf.get("type", "text") != "text":
        return "response_format"
    extras = request.model_extra or {}
    return next((name for name in ("structured_outputs", *_GUIDED) if extras.get(name) is not None), None)


@contextmanager
def constraint_errors_named(request: Any):
    """Re-label 400s about the constraint with the field the client actually sent."""
    try:
        yield
    except APIError as e:
        field = constraint_field(request) if e.param == "structured_outputs" else None
        if field:
            e.param = field
        raise
