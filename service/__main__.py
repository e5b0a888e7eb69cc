"""`python -m service`: serve the gateway with uvicorn, configured by GLIPV2_* variables."""

from __future__ import annotations

import logging

import uvicorn

from service.admission import guarded_h11
from service.app import create_app
from service.middleware import RequestIdFilter
from service.settings import Settings


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger("service")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    """The gateway under uvicorn: its h11 protocol with the header deadline (uvicorn has
    none), graceful shutdown draining in-flight requests for up to 30 s."""
    return uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=False, timeout_graceful_shutdown=30, http=guarded_h11(settings.header_timeout_s))


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level)
    server = uvicorn.Server(uvicorn_config(settings))
    server.run()
    if not server.started:  # as uvicorn.run: a failed startup is exit code 3
        raise SystemExit(3)


def main() -> None:
    serve(Settings())


if __name__ == "__main__":
    main()
