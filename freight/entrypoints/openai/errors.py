"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Clients (the openai SDK included) pick their exception class from the status code
and show error.message, so every failure path of the server, FastAPI's own
validation and routing errors included, answers in this shape.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from freight.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, InvalidUnicodeError

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """Raised anywhere in a handler to answer with an OpenAI-shaped error."""

    RETRY_AFTER_S = 1  # what a 503 (overloaded, draining, engine gone) tells clients to wait

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Union[str, int, None] = None, type: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})
        if status == 503:
            self.headers.setdefault("Retry-After", str(self.RETRY_AFTER_S))

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(message, 400, param=param, code=code)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _loc_param(loc: tuple[Any, ...]) -> Optional[str]:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; a union's member tags are dropped
    (('body', 'prompt', 'list[int]', 0) -> 'prompt[0]')."""
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and (
        not p.isidentifier() or p.lower() in _TYPE_TAGS))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, InvalidUnicodeError):
        return bad_request(str(cause), param=cause.param, code="invalid_unicode")
    if first.get("type") == "json_invalid":
        return bad_request(f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}",
                           code="invalid_json")
    param = _loc_param(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param is None:
        return bad_request("The request body is missing; expected a JSON object.", code="missing_body")
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if param is None:  # the body itself, e.g. a JSON array instead of an object
        return bad_request(f"Invalid request body: {first.get('msg')}; expected a JSON object", code="invalid_body")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return bad_request(f"Invalid value for '{param}': {first.get('msg')}{more}", param=param,
                       code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "Error"
        message = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else phrase
        # e.g. 405's Allow header
        return APIError(message, exc.status_code, code=exc.status_code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request handler")  # the details go to the log, not the client
        return APIError("Internal server error; the server log has the details.", 500).response()
