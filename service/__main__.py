"""`python -m service`: serve the gateway with uvicorn, configured by GLIPV2_* variables."""

from __future__ import annotations

import logging

import uvicorn

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


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
