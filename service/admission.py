"""Load shedding and slow-client limits, applied before the expensive work.

- AdmissionMiddleware: an inference request (POST) is admitted at the door, on its
  headers, or answered 503 + Retry-After at once: at most `max_concurrent` of them in
  progress (body read, decoding, queued or running), and their declared bodies within a
  byte budget. Before this, requests were admitted to the batcher only after their
  images were decoded, so under overload the 503s came after seconds of wasted decoding
  and good throughput collapsed; body memory grew with the number of connections.
- guarded_h11: uvicorn's h11 protocol with a deadline on the request headers: a client
  that connects and trickles a header line every few seconds (slowloris) is cut off
  after `header_timeout_s` (uvicorn's keep-alive timer restarts on every byte).
  The body deadline is BodyLimitMiddleware's (service.middleware).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.middleware import send_json

log = logging.getLogger("service")


class AdmissionMiddleware:
    """503 + Retry-After, before any body is read, when `max_concurrent` inference
    requests are already in progress or their declared bodies (Content-Length; a chunked
    body counts as `max_body_bytes`) would pass `max_body_bytes_in_flight`."""

    def __init__(self, app, *, max_concurrent: int, max_body_bytes_in_flight: int, max_body_bytes: int,
                 retry_after_s: int, methods: tuple[str, ...] = ("POST",)) -> None:
        self.app = app
        self.max_concurrent = int(max_concurrent)
        self.max_bytes = int(max_body_bytes_in_flight)
        self.max_body_bytes = int(max_body_bytes)
        self.retry_after = str(int(retry_after_s)).encode()
        self.methods = frozenset(methods)
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.shed = 0  # requests answered 503 at the door

    async def _reject(self, send, why: str, limit: int) -> None:
        self.shed += 1
        # The connection stays open: uvicorn discards the unread body and reads the next
        # request. (Closing it made every retry of a closed-loop client pay a new TCP
        # connection on both sides, CPU taken from the requests being served.)
        await send_json(send, 503, {"detail": f"overloaded: {why}; retry later", "limit": limit},
                        [(b"retry-after", self.retry_after)])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = min(int(length), self.max_body_bytes) if length is not None else self.max_body_bytes
        except ValueError:
            declared = self.max_body_bytes
        # No await between the checks and the increments: the event loop makes them atomic.
        if self.in_flight >= self.max_concurrent:
            await self._reject(send, f"{self.in_flight} requests in progress", self.max_concurrent)
            return
        if self.bytes_in_flight and self.bytes_in_flight + declared > self.max_bytes:
            await self._reject(send, f"{self.bytes_in_flight} body bytes in progress", self.max_bytes)
            return
        self.in_flight += 1
        self.bytes_in_flight += declared
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.bytes_in_flight -= declared

    def stats(self) -> dict:
        return {"in_flight": self.in_flight, "bytes_in_flight": self.bytes_in_flight, "shed": self.shed,
                "max_concurrent": self.max_concurrent, "max_body_bytes_in_flight": self.max_bytes}


_BODY_408 = b'{"detail": "request headers took too long"}'
_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(_BODY_408)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY_408)


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's H11Protocol whose connections must complete each request's headers within
    header_timeout_s of connecting (or of the previous response, plus the keep-alive
    time); otherwise 408 and close. Pass as uvicorn.Config(http=...)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

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
