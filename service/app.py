"""The application factory: `create_app(settings)`; nothing is built at import time."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.admission import Admission, AdmissionMiddleware
from service.backends import Backend, create_backend
from service.batcher import MicroBatcher
from service.errors import BackendUnavailable, install_error_handlers
from service.looplag import LoopLagProbe
from service.metrics import Metrics
from service.middleware import ApiKeyCheck, ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from service.routes import demo, detect, docs, health, metrics, models, understanding
from service.routes.inputs import ImageLoader
from service.settings import Settings

log = logging.getLogger("service")


def _wrap_failures(run_batch):
    def run(items):
        try:
            return run_batch(items)
        except Exception as exc:
            log.exception("inference failed")
            raise BackendUnavailable(f"inference failed: {type(exc).__name__}") from exc

    return run


def _openapi_without_security(app: FastAPI, generate) -> dict:
    """The schema says what the server does: without GLIPV2_API_KEY no route needs the
    X-API-Key header, so the security scheme the routes' dependency declares goes."""
    if app.openapi_schema is None:
        schema = generate()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                if isinstance(op, dict):
                    op.pop("security", None)
                    op.get("responses", {}).pop("401", None)
        schema.get("components", {}).pop("securitySchemes", None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """settings defaults to Settings() (the GLIPV2_* environment); backend, if given,
    replaces the one settings.backend names (tests, embedding in other apps)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        be = backend or await asyncio.to_thread(create_backend, settings)
        runs = {"detect": be.run_batch, "vqa": be.run_vqa_batch, "caption": be.run_caption_batch}
        # Never batch more than the repository was rendered for: Triton refuses larger
        # batches (and caption steps carry every beam within the repository's step limit).
        max_batch = min(settings.max_batch_size, be.manifest.max_batch_size)
        if max_batch < settings.max_batch_size:
            log.warning("GLIPV2_MAX_BATCH_SIZE=%d is over the repository's max_batch_size; batching %d",
                        settings.max_batch_size, max_batch)
        # One batcher per task: a batch is always one engine call of one kind.
        batchers = {
            task: MicroBatcher(
                _wrap_failures(runs[task]),
                max_batch_size=max_batch,
                max_wait_ms=settings.max_wait_ms,
                queue_size=settings.queue_size,
                timeout_s=settings.request_timeout_s,
                retry_after_s=settings.retry_after_s,
            )
            for task in be.tasks
        }
        for b in batchers.values():
            await b.start()
        probe = LoopLagProbe()
        probe.start()
        app.state.metrics.loop_lag = probe
        app.state.loader = ImageLoader(settings, be.image_hw, be.manifest.image.pad_value, be.manifest.image.max_side)
        app.state.backend, app.state.batcher, app.state.batchers = be, batchers["detect"], batchers
        log.info("serving %s (%s backend on %s, tasks: %s) from %s", be.manifest.preset, be.name,
                 getattr(be, "device", "cpu"), ", ".join(be.tasks), settings.repository)
        # Everything loaded so far lives as long as the server: out of the garbage collector's
        # sight (gc.freeze), so that a full collection scans only what requests allocate.
        # Measured under overload (open loop at 4x, 2 cores): full collections of the whole
        # heap took 80-385 ms, a stall of the event loop in which every 503 waited (503 p99
        # 382 ms in one run of three).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await probe.stop()
            app.state.backend, app.state.batcher, app.state.batchers = None, None, {}
            for b in batchers.values():
                await b.stop()  # drains queued requests before the backend goes
            app.state.loader.close()
            app.state.loader = None
            be.close()

    app = FastAPI(
        title="glipv2-serve",
        version="0.1.0",
        description="Open-vocabulary detection, phrase grounding, visual question answering and captioning "
                    "with GLIPv2. Boxes are xyxy in original-image pixels.",
        lifespan=lifespan,
        docs_url=None,  # served by routes/docs.py from local files (the defaults load a CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.backend = None
    app.state.batcher = None
    app.state.batchers = {}
    app.state.loader = None
    app.state.metrics = Metrics()
    install_error_handlers(app)
    if settings.api_key is None:
        app.openapi = functools.partial(_openapi_without_security, app, app.openapi)
    app.include_router(detect.router)
    app.include_router(understanding.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(demo.router)
    app.include_router(docs.router)
    # Outermost first: request id (every response carries it, the access log sees every
    # status) -> API key (on the headers) -> admission (503 on the headers under overload)
    # -> body limits (size and time) -> the app. add_middleware puts each one outside the
    # ones added before it.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    admission = Admission(max_concurrent=settings.max_concurrent_requests,
                          max_body_bytes_in_flight=settings.max_body_mb_in_flight * 1024 * 1024,
                          max_body_bytes=settings.max_body_bytes, retry_after_s=settings.retry_after_s)
    app.add_middleware(AdmissionMiddleware, admission=admission)
    exact, prefixes = settings.open_paths()
    api_key = ApiKeyCheck(settings.api_key and settings.api_key.get_secret_value(), exact, prefixes)
    app.add_middleware(ApiKeyMiddleware, check=api_key)
    app.add_middleware(RequestIdMiddleware, metrics=app.state.metrics)
    # The door in the protocol layer (service.admission.guarded_h11, `python -m service`)
    # sheds on the same Admission; its 503s get the same request id, log line and metrics.
    admission.authorized = api_key.allows
    admission.door_app = RequestIdMiddleware(admission.reject, metrics=app.state.metrics)
    app.state.admission = admission
    return app
