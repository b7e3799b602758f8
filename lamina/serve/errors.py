"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the status codes that the
``openai`` client maps to its exception classes (400 ``BadRequestError``, 401 ``AuthenticationError``, 404
``NotFoundError``, 429 ``RateLimitError``, 500 ``InternalServerError``, ...).

Every way a request can fail ends here: ``APIError`` raised by the routes, FastAPI's validation errors
(which would otherwise answer 422 in FastAPI's own shape), bodies that are not JSON or not UTF-8, unknown
routes and methods, and any unexpected exception (500, logged with its traceback, the server keeps going).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lamina.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered as OpenAI's error object with HTTP ``status``.

    ``param`` names the request field at fault (``"max_tokens"``, ``"messages[2].content"``), ``code`` is
    a machine-readable reason (``"context_length_exceeded"``, ``"model_not_found"``, ...), ``headers``
    extra response headers (``Retry-After`` with a 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The HTTP response carrying this error."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as one server-sent event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request is invalid as sent."""
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(message: str, param: str = "messages") -> APIError:
    """400 with OpenAI's ``context_length_exceeded`` code."""
    return APIError(400, message, param=param, code="context_length_exceeded")


def model_not_found(name: str, served: Sequence[str]) -> APIError:
    """404 for an unknown model name, listing the served ones."""
    return APIError(
        404,
        f"The model {name!r} does not exist on this server; served models: {', '.join(served) or 'none'} "
        "(GET /v1/models lists them)",
        param="model",
        code="model_not_found",
    )


def _loc(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 2, "content")`` -> ``"messages[2].content"``."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 ``APIError`` for FastAPI's validation error (bad JSON, wrong types, values out of range)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error", "")
        return bad_request(
            f"The request body is not valid JSON{f' ({detail})' if detail else ''}; send a JSON object "
            "with Content-Type: application/json",
            code="invalid_json",
        )
    param = _loc(first.get("loc", ()))
    if param is None and kind in ("model_attributes_type", "dict_type"):
        return bad_request("The request body must be a JSON object", code="invalid_json")
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    if kind == "missing":
        text = f"Missing required parameter: {param!r}{more}"
    elif kind == "extra_forbidden":
        text = f"Unrecognized request argument supplied: {param}{more}"
    else:
        text = f"Invalid value for {param!r}: {msg}{more}"
    return bad_request(text, param=param, code=None if kind != "missing" else "missing_required_parameter")


def install_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` with OpenAI's error shape."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        if status == 404:
            err = APIError(404, f"No route {request.method} {request.url.path}; see /docs", code="not_found")
        elif status == 405:
            err = APIError(405, f"Method {request.method} is not allowed on {request.url.path}")
        elif status == 400:  # the body could not be read (e.g. not UTF-8)
            err = bad_request(
                f"The request body could not be parsed ({exc.detail}): send UTF-8 encoded JSON",
                code="invalid_json",
            )
        else:
            err = APIError(status, str(exc.detail))
        return JSONResponse(err.body(), status_code=status, headers=dict(exc.headers or {}))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        err = APIError(500, f"Internal server error ({type(exc).__name__}: {exc}); the server keeps serving")
        return err.response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
