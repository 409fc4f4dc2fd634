"""Checks in front of every route: the API key, the Host and Origin a request names, its size."""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_infer.server import protocol

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine."""
    host = host.strip().lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name in a ``Host:`` header (port dropped, brackets of IPv6 kept off)."""
    value = value.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class BodyTooLarge(HTTPException):
    """The request body passed the size limit while it was being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return (
        f"the request body is larger than the server's limit of {limit} bytes "
        "(edge-infer serve --max-body-mb raises it)"
    )


class RequestGuard:
    """ASGI middleware: refuses requests before any route reads them.

    - With an API key, every path but ``public_paths`` needs ``Authorization: Bearer KEY``.
    - Without one, only requests addressed to a loopback name (``Host:``) and, from browsers,
      only pages of a loopback origin (``Origin:``) are served: a web page elsewhere cannot
      reach the daemon by pointing its own domain name at 127.0.0.1 (DNS rebinding).
    - A body larger than ``max_body_bytes`` gets a 413: at once when ``Content-Length`` says
      so (nothing of it is read), else as soon as the bytes read pass the limit.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        public_paths: Sequence[str] = ("/health",),
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.public_paths = tuple(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(scope["path"], headers)
        if refusal is not None:
            await _send_error(send, *refusal)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit():
            if int(declared) > self.max_body_bytes:
                await _send_error(
                    send, 413, too_large_message(self.max_body_bytes), "request_too_large"
                )
                return
        limit, seen = self.max_body_bytes, 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)

    def refusal(self, path: str, headers: Headers) -> tuple[int, str, str, str] | None:
        """(status, message, error code, error type) when the request must be refused."""
        if self.api_key:
            if path in self.public_paths:
                return None
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                return (
                    401,
                    "missing or wrong API key (send 'Authorization: Bearer <key>')",
                    "invalid_api_key",
                    "authentication_error",
                )
            return None
        host = headers.get("host")
        if host is not None and not is_loopback(host_name(host)):
            return (
                403,
                f"Host {host!r} is not this machine: without an API key the server answers only "
                "requests addressed to localhost, 127.0.0.1 or [::1] (set an API key to serve "
                "other names)",
                "host_not_allowed",
                "permission_error",
            )
        origin = headers.get("origin")
        if origin is not None and not _loopback_origin(origin):
            return (
                403,
                f"Origin {origin!r} is not a page of this machine: without an API key the "
                "server answers browsers only for pages from localhost, 127.0.0.1 or [::1]",
                "origin_not_allowed",
                "permission_error",
            )
        return None


def _loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin.strip())
        name = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and name is not None and is_loopback(name)


async def _send_error(
    send: Send, status: int, message: str, code: str, kind: str = "invalid_request_error"
) -> None:
    body = json.dumps(protocol.error_json(message, kind, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
