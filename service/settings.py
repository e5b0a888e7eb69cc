"""Gateway settings: environment variables with the GLIPV2_ prefix (pydantic-settings).

Nothing reads the environment at import time: `Settings()` does, when the caller asks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PLACEHOLDERS = {"changeme", "change-me", "changethis", "secret", "password", "apikey", "api-key", ""}


# The endpoints GLIPV2_OPEN_ENDPOINTS can leave open when an API key is set (a path
# ending in '*' is a prefix).
OPEN_ENDPOINTS: dict[str, tuple[str, ...]] = {
    "live": ("/health/live",),
    "ready": ("/health/ready",),
    "metrics": ("/metrics",),
    "docs": ("/docs", "/docs/oauth2-redirect", "/docs/assets/*", "/redoc", "/openapi.json"),
    "demo": ("/", "/static/*"),
}


class Settings(BaseSettings):
    """Every field can be set as GLIPV2_<FIELD> (e.g. GLIPV2_MAX_BATCH_SIZE=16)."""

    model_config = SettingsConfigDict(env_prefix="GLIPV2_", frozen=True, extra="ignore")

    repository: Path = Field(Path("model_repository"), description="rendered model repository (manifest.json)")
    backend: Literal["embedded", "triton"] = "embedded"
    triton_url: str = Field("localhost:8001", description="Triton's gRPC endpoint (host:port)")
    triton_http_url: str | None = Field(
        None, description="Triton's HTTP endpoint (host:port), used when gRPC does not answer; unset = gRPC only")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="embedded backend: where ONNX Runtime runs the models; 'cuda' refuses to start "
        "unless the sessions really run on CUDA, 'auto' takes CUDA when it works and says which at start-up")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = its default)")
    ort_spinning: bool = Field(False, description="let the detector's ORT threads spin-wait between runs")

    max_batch_size: int = Field(8, ge=1, le=256, description="images per engine call")
    # 0 by default: a batch is whatever queued while the engine ran the previous one. On the
    # 2-core CPU this kept throughput at concurrency 16 (106 vs 106 img/s) and cut latency
    # at concurrency 1 (p50 14.6 vs 20.1 ms) against 5 ms. Raise it where the engine is
    # much faster than request arrival (a GPU) so that batches get a chance to fill.
    max_wait_ms: float = Field(0.0, ge=0.0, le=10_000.0, description="how long a batch waits to fill")
    queue_size: int = Field(64, ge=1, description="images waiting; beyond it requests get 503")
    request_timeout_s: float = Field(
        30.0, gt=0.0, description="per request, from its body to its answer (fetching, decoding, queue, "
        "inference); beyond it 504")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header on 503")

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request body limit (413)")
    # Admission at the door (service.admission), on the headers, before anything is read
    # or decoded: beyond these an inference request is answered 503 + Retry-After at once.
    max_concurrent_requests: int = Field(
        16, ge=1, description="inference requests in progress (reading, decoding, queued, running); beyond: 503")
    max_body_mb_in_flight: int = Field(
        128, ge=1, description="declared body MiB of the inference requests in progress; beyond: 503")
    decode_threads: int = Field(
        2, ge=1, le=64, description="threads decoding images (their own pool: memory in flight is bounded by "
        "decode_threads x max_image_pixels, and readiness never waits behind decoding)")
    header_timeout_s: float = Field(10.0, gt=0.0, description="a request's headers must arrive within this (408)")
    body_timeout_s: float = Field(30.0, gt=0.0, description="a request's body must arrive within this (408)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height limit per image (413)")
    max_images_per_request: int = Field(16, ge=1, le=256)

    api_key: SecretStr | None = Field(None, description="if set, requests need the X-API-Key header")
    open_endpoints: str = Field(
        "live,demo",
        description="with an API key set, what stays open without it (comma-separated): 'live' "
        "(/health/live), 'ready' (/health/ready, which runs the text encoder), 'metrics' (/metrics), "
        "'docs' (/docs, /redoc, /openapi.json), 'demo' (the page at / and its assets; it sends the key the "
        "user types). Everything else needs the key")
    prompt_cache_size: int = Field(1024, ge=0, description="prompts whose text features are kept (LRU)")
    prompt_cache_mb: int = Field(64, ge=0, description="and at most this many MiB of them (one 256-token prompt "
                                 "of the tiny model is 0.4 MB)")

    url_allowlist: str | None = Field(
        None,
        description="comma-separated hosts ('images.example.com', 'host:8080') or URL prefixes "
        "('https://cdn.example.com/public/') that requests may name in 'url'; unset = URLs refused (422)",
    )
    url_timeout_s: float = Field(10.0, gt=0.0, le=300.0, description="connect/read timeout when fetching an image URL")
    url_max_redirects: int = Field(3, ge=0, le=10, description="redirects followed, same scheme/host/port only")
    url_fetch_threads: int = Field(4, ge=1, le=64, description="threads fetching image URLs (their own pool)")
    url_allow_private: bool = Field(
        False, description="let image URLs resolve to loopback, private, link-local or other non-public "
        "addresses (refused by default, whatever the allow-list says: tests and private networks set it)")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"
    workers: int = Field(
        1, ge=1, le=64, description="gateway processes sharing the port (triton backend only: Triton batches "
        "across them; embedded workers would each load the models onto the same cores and split the batches)")

    @field_validator("open_endpoints")
    @classmethod
    def _known_endpoints(cls, v: str) -> str:
        names = [n.strip() for n in v.split(",") if n.strip()]
        unknown = sorted(set(names) - set(OPEN_ENDPOINTS))
        if unknown:
            raise ValueError(f"unknown open_endpoints {unknown}; choose from {sorted(OPEN_ENDPOINTS)}")
        return ",".join(names)

    def open_paths(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(exact paths, path prefixes) that need no API key."""
        names = [n for n in self.open_endpoints.split(",") if n]
        paths = [p for n in names for p in OPEN_ENDPOINTS[n]]
        return tuple(p for p in paths if not p.endswith("*")), tuple(p[:-1] for p in paths if p.endswith("*"))

    @field_validator("api_key")
    @classmethod
    def _no_placeholder_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value().strip().lower() in _PLACEHOLDERS:
            raise ValueError("api_key is a placeholder; set a real secret or leave it unset")
        return v
