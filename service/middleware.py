"""Pure ASGI middleware: request ids (header + logs + access log), the API key check
(before any body is read) and the body size limit."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import secrets
import time
import uuid

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

access_log = logging.getLogger("service.access")


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record (format with %(request_id)s)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RequestIdMiddleware:
    """Takes the caller's X-Request-ID (if sane) or makes one; returns it as a header,
    exposes it to logs through request_id_var, and writes one access log line."""

    def __init__(self, app, metrics=None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status, seconds * 1000)
            if self.metrics is not None:
                # the route template, not the raw path, so labels stay few
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.observe_request(scope["method"], route, status, seconds)
            request_id_var.reset(token)


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A complete JSON response, from middleware (before the app sees the request)."""
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class ApiKeyCheck:
    """With an API key set, which requests may pass: those with the right X-API-Key header
    and those for the settings' open endpoints (exact paths and path prefixes)."""

    def __init__(self, api_key: str | None, open_exact: tuple[str, ...] = (),
                 open_prefixes: tuple[str, ...] = ()) -> None:
        self.key = api_key.encode() if api_key else None
        self.open_exact = frozenset(open_exact)
        self.open_prefixes = tuple(open_prefixes)

    def allows(self, scope: dict) -> bool:
        if self.key is None:
            return True
        path = scope.get("path", "")
        if path in self.open_exact or path.startswith(self.open_prefixes):
            return True
        given = dict(scope.get("headers") or []).get(b"x-api-key", b"")
        return secrets.compare_digest(given, self.key)


class ApiKeyMiddleware:
    """With an API key set, 401 for every request the ApiKeyCheck refuses; checked on the
    headers, so an unauthenticated caller never gets a body read, buffered or parsed. (The
    routes' require_api_key dependency checks again and puts the scheme in the OpenAPI
    schema.)"""

    def __init__(self, app, check: ApiKeyCheck) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.check.allows(scope):
            await self.app(scope, receive, send)
            return
        await send_json(send, 401, {"detail": "missing or wrong X-API-Key header"},
                        [(b"www-authenticate", b"APIKey")])


class BodyLimitMiddleware:
    """413 for bodies over max_bytes, from Content-Length when given, else while reading;
    408 when the whole body has not arrived within timeout_s of the headers (a client
    sending one byte a second would otherwise hold its connection and memory forever)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.timeout_s = float(timeout_s)

    async def _reject(self, send) -> None:
        await send_json(send, 413, {"detail": f"request body is larger than {self.max_bytes} bytes",
                                    "limit": self.max_bytes}, [(b"connection", b"close")])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_bytes:
                    await self._reject(send)
                    return
            except ValueError:
                pass
        # Read the body here (bounded in size and time) and replay it: chunked uploads are
        # counted too.
        chunks, total = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                await send_json(send, 408, {"detail": f"request body took longer than {self.timeout_s:g} s",
                                            "limit": self.timeout_s}, [(b"connection", b"close")])
                return
            if message["type"] != "http.request":  # disconnect
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list, receive):
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
