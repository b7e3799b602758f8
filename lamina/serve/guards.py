"""ASGI middleware that runs before any route: API keys, the request-size limit, request counting.

They answer with OpenAI's error shape themselves, before FastAPI reads the body, so an unauthenticated
or oversized request costs no parsing, let alone model time.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lamina.serve.errors import APIError, bad_request
from lamina.serve.metrics import Metrics


def route_path(scope: Scope) -> str:
    """The request's path inside the app: with a ``root_path`` (uvicorn's, behind a proxy that strips a
    prefix) ASGI servers put the prefix in ``path`` too, so it is taken off here as Starlette's router does."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyAuth:
    """Every ``/v1/*`` request needs ``Authorization: Bearer KEY`` (or ``x-api-key: KEY``) with a known key.

    ``/health``, ``/metrics`` and the OpenAPI pages stay open (load balancers and Prometheus read them).
    """

    def __init__(self, app: ASGIApp, api_keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not route_path(scope).startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        key = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if not key:
            err = APIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
                "(the openai client's api_key)",
                type="invalid_request_error",
                code="missing_api_key",
            )
        elif not any(hmac.compare_digest(key, k) for k in self.keys):
            err = APIError(
                401, "Incorrect API key provided", type="invalid_request_error", code="invalid_api_key"
            )
        else:
            return await self.app(scope, receive, send)
        await err.response()(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (400) before the app reads them.

    The body is read here (at most ``max_bytes``) and replayed to the app; later ``receive`` calls go to
    the server, so the app still sees the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: str) -> APIError:
        return bad_request(
            f"The request body is {size} bytes; the server accepts at most {self.max_bytes} "
            "(lamina serve --max-request-bytes)",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(length.decode("latin-1")[:20]).response()(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._too_large(f"more than {self.max_bytes}").response()(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class CountRequests:
    """Count answered requests in ``lamina_requests_total{route, status}`` (unknown paths as "other")."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, set(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        route = path if path in self.routes else "other"
        counted = False

        async def counting_send(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.metrics.inc("requests_total", route=route, status=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)
