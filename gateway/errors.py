"""Every error the gateway returns, in OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("sfllm.gateway")


class APIError(Exception):
    """An error that becomes an HTTP response (or an SSE error event once a stream has started)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        """The OpenAI error body for this error."""
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        """This error as a JSON response with its status and headers."""
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: a request with invalid values."""
    return APIError(400, message, "invalid_request_error", param, code)


def context_length_exceeded(message: str) -> APIError:
    """400 whose message carries "maximum context length is N tokens", which clients parse."""
    return APIError(400, message, "invalid_request_error", "messages", "context_length_exceeded")


def request_too_large(message: str) -> APIError:
    """413: a request body (or the worker request made from it) over a size limit."""
    return APIError(413, message, "invalid_request_error", None, "too_large")


def unauthorized() -> APIError:
    """401: a missing or wrong API key."""
    return APIError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")


def model_not_found(model: str) -> APIError:
    """404: a model no healthy worker serves."""
    return APIError(404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found")


def malformed_json(detail: str) -> APIError:
    """400 (as OpenAI answers): a body that is not a JSON object."""
    return APIError(400, f"The request body is not valid JSON: {detail}", "invalid_request_error", None, "invalid_json")


def unsupported_media_type(content_type: str) -> APIError:
    """415: a body that says it is something other than JSON."""
    message = f"The request body must be JSON (Content-Type: application/json), not {content_type}."
    return APIError(415, message, "invalid_request_error", None, "unsupported_media_type")


def client_closed() -> APIError:
    """499 (nginx's code, never sent): the client left before the gateway had its whole request."""
    return APIError(499, "The client closed the request.", "invalid_request_error", None, "client_closed")


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    """429 with Retry-After: every worker's queue (or the gateway's in-flight bound) is full."""
    return APIError(429, message, "rate_limit_error", None, "server_overloaded", {"Retry-After": str(retry_after_s)})


def no_healthy_worker(message: str = "No healthy worker is available to serve this request.") -> APIError:
    """503: no worker can take the request right now."""
    return APIError(503, message, "service_unavailable", None, "no_healthy_worker", {"Retry-After": "1"})


def internal_error(message: str) -> APIError:
    """500: a fault of the gateway or worker, never of the request."""
    return APIError(500, message, "internal_error", None, "internal_error")


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """400 naming the first offending field of a pydantic validation error."""
    found = exc.errors()
    # a union reports one error per member; our own checks (value_error) say what is actually wrong
    err = next((e for e in found if e.get("type") == "value_error"), found[0])
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    # pydantic's union errors append the tried member type to the location; the field path is the prefix of names
    param = ".".join(p for p in loc if not _is_type_tag(p)) or None
    message = str(err.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return bad_request(f"{param}: {message}" if param else message, param)


def _is_type_tag(part: str) -> bool:
    return part.startswith(("list[", "dict[", "function-", "constrained-")) or part in {"str", "int", "float", "bool"}


def install_error_handlers(app: FastAPI) -> None:
    """Make every error path of the app answer with OpenAI's error body, never a bare 500 for bad input."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a gateway bug: still answer in OpenAI's shape, and leave a trace
        log.error("unhandled error", exc_info=exc, extra={"fields": {"path": request.url.path}})
        return internal_error(f"the gateway failed: {type(exc).__name__}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, code).response()
