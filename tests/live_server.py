"""One way for tests to run the real gateway app under uvicorn, in a thread of the test process."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


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
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            try:
                if httpx.get(base + "/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.1)
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()
