"""The gateway's OpenAPI description (/openapi.json), made to say what the handlers really take and answer.

The generation routes read their bodies themselves (size limit, media type, strict validation: see
app.py), so FastAPI sees no body parameter and would publish none; and it would list a 422 that the
gateway never sends (bad input is 400 with OpenAI's error body). This adds each route's request
model as its body and OpenAI's error body as the answer of every failure; it changes no behaviour.
"""

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.native import GenerateRequest
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse

_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/generate": GenerateRequest,
}
_REF = "#/components/schemas/{model}"
_FASTAPI_422 = ("HTTPValidationError", "ValidationError")  # FastAPI's own 422 body, which nothing here sends


def describe_bodies(app: FastAPI) -> None:
    """Make `app.openapi()` (and so /openapi.json) carry the request bodies and the error body."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _with_bodies(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _with_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    models = [*_BODIES.values(), ErrorResponse]
    refs, definitions = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in _FASTAPI_422:
        components.pop(name, None)
    components.update(definitions["$defs"])
    error = {
        "description": "An OpenAI error body",
        "content": {"application/json": {"schema": refs[(ErrorResponse, "validation")]}},
    }
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["4XX"] = error
            responses["5XX"] = error
            model = _BODIES.get(path)
            if model is not None and "requestBody" not in operation:
                body = {"schema": refs[(model, "validation")]}
                operation["requestBody"] = {"required": True, "content": {"application/json": body}}
    return schema
