"""One way for tests to run the real gateway app under uvicorn, in a thread of the test process."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx


def wait_until_ok(url: str, *, timeout_s: float, alive: Callable[[], bool] = lambda: True,
                  context: Callable[[], str] = lambda: "", interval_s: float = 0.2) -> None:
    """Polls GET url until it answers 200. Fails the test, with context() (a server log),
    as soon as alive() turns false (the server exited) or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert alive(), f"the server exited before {url} answered 200\n{context()}"
        assert time.monotonic() < deadline, f"{url} did not answer 200 in {timeout_s:g} s\n{context()}"
        time.sleep(interval_s)


@contextmanager
def serve_in_thread(app, ready_timeout_s: float = 120.0) -> Iterator[str]:
    """Serves `app` on a free localhost port; yields its base URL ("http://127.0.0.1:PORT") once
    /health/ready answers 200 (model loaded, backend up), and stops the server afterwards."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until_ok(base + "/health/ready", timeout_s=ready_timeout_s, alive=thread.is_alive, interval_s=0.1)
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()
