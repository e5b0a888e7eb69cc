"""Load shedding and slow-client limits, applied before the expensive work.

- Admission: an inference request (POST) is admitted on its headers, or answered 503 +
  Retry-After at once: at most `max_concurrent` of them in progress (body read,
  decoding, queued or running), and their declared bodies within a byte budget. Before
  this, requests were admitted to the batcher only after their images were decoded, so
  under overload the 503s came after seconds of wasted decoding and good throughput
  collapsed; body memory grew with the number of connections.
  Two places apply it. Under `python -m service` the h11 protocol (guarded_h11) refuses
  a request as soon as its headers are parsed, in the protocol layer: the 503 is a
  two-line ASGI app (with the request id, access log and metrics), never the middleware
  stack, FastAPI or a body read. Each 503 then costs the event loop a fraction of what it
  did, which is what keeps the loop answering (and the GIL free for inference) when
  clients retry at once. AdmissionMiddleware holds the count of requests in progress and
  refuses what still gets past the door (a request admitted between the door's check
  and its own; any other ASGI server).
- guarded_h11: uvicorn's h11 protocol with that door and a deadline on the request
  headers: a client that connects and trickles a header line every few seconds
  (slowloris) is cut off after `header_timeout_s` (uvicorn's keep-alive timer restarts
  on every byte). The body deadline is BodyLimitMiddleware's (service.middleware).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.middleware import send_json

log = logging.getLogger("service")

class Admission:
    """The door's state and rule: at most `max_concurrent` inference requests (`methods`)
    in progress, their declared bodies (Content-Length; a chunked body counts as
    `max_body_bytes`) within `max_body_bytes_in_flight`; beyond, 503 + Retry-After."""

    def __init__(self, *, max_concurrent: int, max_body_bytes_in_flight: int, max_body_bytes: int,
                 retry_after_s: int, methods: tuple[str, ...] = ("POST",)) -> None:
        self.max_concurrent = int(max_concurrent)
        self.max_bytes = int(max_body_bytes_in_flight)
        self.max_body_bytes = int(max_body_bytes)
        self.retry_after = str(int(retry_after_s)).encode()
        self.methods = frozenset(methods)
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.shed = 0  # requests answered 503 on their headers
        self.shed_at_door = 0  # of which by the protocol layer (guarded_h11), without the app
        # Set by create_app: whether a request would get past the API key check (the door
        # leaves the others to the app and its 401), and the app that answers the 503s the
        # protocol layer sheds (request id, access log and metrics around `reject`).
        self.authorized: Callable[[dict], bool] = lambda scope: True
        self.door_app = self.reject

    def declared(self, scope: dict) -> int:
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            return min(int(length), self.max_body_bytes) if length is not None else self.max_body_bytes
        except ValueError:
            return self.max_body_bytes

    def refusal(self, scope: dict) -> tuple[str, int] | None:
        """(why, limit) when the request must be refused now, else None (no side effects)."""
        if scope["type"] != "http" or scope["method"] not in self.methods:
            return None
        if self.in_flight >= self.max_concurrent:
            return f"{self.in_flight} requests in progress", self.max_concurrent
        if self.bytes_in_flight and self.bytes_in_flight + self.declared(scope) > self.max_bytes:
            return f"{self.bytes_in_flight} body bytes in progress", self.max_bytes
        return None

    def at_the_door(self, scope: dict) -> bool:
        """The protocol layer's question, on the parsed headers: refuse this request without
        running the app? (Only requests the API key check would let through.)"""
        why = self.refusal(scope)
        if why is None or not self.authorized(scope):
            return False
        scope["glipv2.refusal"] = why
        self.shed_at_door += 1
        return True

    async def reject(self, scope, receive, send) -> None:
        """The 503. The connection stays open: uvicorn discards the unread body and reads
        the next request. (Closing it made every retry of a closed-loop client pay a new
        TCP connection on both sides, CPU taken from the requests being served.)"""
        why, limit = scope.get("glipv2.refusal") or self.refusal(scope) or ("full", self.max_concurrent)
        self.shed += 1
        await send_json(send, 503, {"detail": f"overloaded: {why}; retry later", "limit": limit},
                        [(b"retry-after", self.retry_after)])

    def stats(self) -> dict:
        return {"in_flight": self.in_flight, "bytes_in_flight": self.bytes_in_flight, "shed": self.shed,
                "shed_at_door": self.shed_at_door, "max_concurrent": self.max_concurrent,
                "max_body_bytes_in_flight": self.max_bytes}


class AdmissionMiddleware:
    """Counts the inference requests in progress (Admission) and answers 503 + Retry-After,
    before any body is read, to those over its limits."""

    def __init__(self, app, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:
        a = self.admission
        if scope["type"] != "http" or scope["method"] not in a.methods:
            await self.app(scope, receive, send)
            return
        # No await between the check and the increments: the event loop makes them atomic.
        if a.refusal(scope) is not None:
            await a.reject(scope, receive, send)
            return
        declared = a.declared(scope)
        a.in_flight += 1
        a.bytes_in_flight += declared
        try:
            await self.app(scope, receive, send)
        finally:
            a.in_flight -= 1
            a.bytes_in_flight -= declared


_BODY_408 = b'{"detail": "request headers took too long"}'
_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(_BODY_408)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY_408)


def guarded_h11(header_timeout_s: float, door: Admission | None = None) -> type[H11Protocol]:
    """uvicorn's H11Protocol whose connections must complete each request's headers within
    header_timeout_s of connecting (or of the previous response, plus the keep-alive
    time); otherwise 408 and close. With `door`, a request it refuses on its headers is
    answered by door.door_app (the 503) instead of the application. Pass as
    uvicorn.Config(http=...)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        # H11Protocol.handle_events reads self.app once per request, right after it has
        # parsed the request's headers into self.scope: the protocol layer's hook.
        @property
        def app(self):
            if door is not None and door.at_the_door(self.scope):
                return door.door_app
            return self._app

        @app.setter
        def app(self, value) -> None:
            self._app = value

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection whose request headers took over %.1f s", header_timeout_s)
                self.transport.write(_TIMEOUT_408)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm(self.timeout_keep_alive + header_timeout_s)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
