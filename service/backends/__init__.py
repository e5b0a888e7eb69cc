"""Inference backends behind one interface (service.backends.base.Backend)."""

from __future__ import annotations

from glipv2.runtime.manifest import Manifest
from service.backends.base import Backend, BatchItem
from service.settings import Settings

__all__ = ["Backend", "BatchItem", "Manifest", "create_backend"]


def create_backend(settings: Settings) -> Backend:
    """The backend named by settings.backend (blocking: loads the models)."""
    if settings.backend == "embedded":
        from service.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(settings.repository, cache_size=settings.prompt_cache_size,
                              cache_bytes=settings.prompt_cache_mb * 1024 * 1024, threads=settings.threads,
                              spinning=settings.ort_spinning, device=settings.device)
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        return TritonBackend(settings.repository, settings.triton_url, cache_size=settings.prompt_cache_size,
                             timeout_s=settings.request_timeout_s, http_url=settings.triton_http_url,
                             cache_bytes=settings.prompt_cache_mb * 1024 * 1024)
    raise ValueError(f"unknown backend {settings.backend!r}")
