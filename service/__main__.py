"""`python -m service`: serve the gateway with uvicorn, configured by GLIPV2_* variables."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import sys

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
    none) and the admission door (503s in the protocol layer, service.admission), graceful
    shutdown draining in-flight requests for up to 30 s."""
    app = create_app(settings)
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=False, timeout_graceful_shutdown=30,
                          http=guarded_h11(settings.header_timeout_s, door=app.state.admission))


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level)
    if settings.workers > 1:
        raise SystemExit(serve_workers(settings))
    server = uvicorn.Server(uvicorn_config(settings))
    server.run()
    if not server.started:  # as uvicorn.run: a failed startup is exit code 3
        raise SystemExit(3)


def _worker(settings: Settings, sock: socket.socket) -> None:
    configure_logging(settings.log_level)
    server = uvicorn.Server(uvicorn_config(settings))
    server.run(sockets=[sock])
    sys.exit(0 if server.started else 3)


def serve_workers(settings: Settings) -> int:
    """GLIPV2_WORKERS gateway processes accepting on one listening socket (bound here,
    inherited by fork before any model or thread exists). Only for the triton backend: the
    models and the dynamic batcher live in Triton, so more gateways add decoding and HTTP
    capacity without splitting batches. Embedded workers would each load the ONNX Runtime
    sessions onto the same cores and split the micro-batches, so they are refused."""
    log = logging.getLogger("service")
    if settings.backend != "triton":
        print(f"GLIPV2_WORKERS={settings.workers} needs GLIPV2_BACKEND=triton: with the embedded backend each "
              "worker would load its own copy of the models onto the same cores and split the batches; run one "
              "embedded worker (GLIPV2_THREADS for ONNX Runtime) or serve through Triton", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(settings, sock), name=f"gateway-{i}") for i in range(settings.workers)]
    for p in procs:
        p.start()
    log.info("%d gateway workers on %s:%d (pids %s)", len(procs), settings.host, settings.port,
             ", ".join(str(p.pid) for p in procs))

    def stop(signum, _frame) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each drains its requests (uvicorn's graceful shutdown)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.join()
    sock.close()
    # uvicorn re-raises the SIGTERM/SIGINT it shut down on, so a drained worker ends "by" it
    clean = (0, -signal.SIGTERM, -signal.SIGINT)
    return next((p.exitcode for p in procs if p.exitcode not in clean), 0)


def main() -> None:
    serve(Settings())


if __name__ == "__main__":
    main()
