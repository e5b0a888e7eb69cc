"""Triton backend: the same prompts, cache, padding and postprocessing as the embedded
backend, with the two engine calls sent to a Triton server by tritonclient: over gRPC,
with HTTP as the fallback.

The gateway's micro-batcher still forms the batches (one padded detector request per
batch, the same shapes for every flavour: TensorRT plans need dense batches); Triton's
own dynamic batcher can merge batches of several gateway processes on top of that.
The manifest and tokenizer are read from the local copy of the repository Triton serves.

Captions: a repository whose manifest names a caption decoder model (`caption`, rendered by
export/repository.py) decodes a whole batch in ONE request: the beam search runs inside
Triton, which calls caption_start / caption_step in-process, so the decoder's key/value
caches never cross gRPC (they did at every step: 11 images/s against 126 embedded). An
older repository without it is still served step by step.

Protocols: `url` is Triton's gRPC endpoint (host:8001), `http_url` its optional HTTP
endpoint (host:8000). The first ping (or the first inference) picks the first protocol
that answers, gRPC before HTTP, and later pings pick again when the chosen one stops
answering. One small adapter per protocol turns numpy arrays into a request and the
response back into arrays; everything else is shared.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from glipv2.captioning import Hypothesis
from glipv2.runtime.graphs import (CAPTION, CAPTION_START, CAPTION_STEP, DETECTOR, TEXT_ENCODER, VQA, inputs_of,
                                   outputs_of)
from glipv2.runtime.manifest import Manifest
from service.backends.base import EngineBackend

PING_TIMEOUT_S = 5.0
# gRPC retries a lost connection with exponential backoff, up to 120 s between attempts by
# default: after a Triton restart the gateway stayed down 12.8 s (35 s outage) and 24.6 s
# (94 s outage). Capping the backoff at 0.5 s makes it reconnect within about that of
# Triton listening again; a reconnect attempt to a local port costs next to nothing.
RECONNECT_BACKOFF_MS = 500


class _Protocol:
    """One tritonclient module (grpc or http) behind the three calls the backend needs."""

    name = "?"

    def __init__(self, url: str, timeout_s: float, models: list[str]) -> None:
        self.url = url
        self.timeout_s = float(timeout_s)
        self.models = models

    def _client(self):
        raise NotImplementedError

    def _module(self):
        raise NotImplementedError

    def _call_kw(self, timeout_s: float) -> dict:
        return {}

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        mod = self._module()
        reqs = []
        for k, v in inputs.items():
            v = np.ascontiguousarray(v)
            inp = mod.InferInput(k, list(v.shape), np_to_triton_dtype(v.dtype))
            inp.set_data_from_numpy(v)
            reqs.append(inp)
        result = self._client().infer(model, reqs, outputs=[mod.InferRequestedOutput(o) for o in outputs],
                                      **self._call_kw(self.timeout_s))
        return [result.as_numpy(o) for o in outputs]

    def ready(self) -> None:
        """Raise ConnectionError unless the server and every model are ready."""
        where = f"triton at {self.url} ({self.name})"
        try:
            c, kw = self._client(), self._call_kw(PING_TIMEOUT_S)
            not_ready = None if c.is_server_ready(**kw) else "server"
            not_ready = not_ready or next((m for m in self.models if not c.is_model_ready(m, **kw)), None)
        except InferenceServerException as exc:
            raise ConnectionError(f"{where}: {exc.message()}") from None
        except Exception as exc:  # http: socket errors (ConnectionRefusedError), gevent timeouts
            raise ConnectionError(f"{where}: {type(exc).__name__}: {exc}") from None
        if not_ready == "server":
            raise ConnectionError(f"{where} is not ready")
        if not_ready:
            raise ConnectionError(f"{where}: model {not_ready} is not ready")

    def close(self) -> None:
        pass


class _Grpc(_Protocol):
    name = "grpc"

    def __init__(self, url: str, timeout_s: float, models: list[str]) -> None:
        super().__init__(url, timeout_s, models)
        import tritonclient.grpc as grpcclient

        self._mod = grpcclient
        max_msg = grpcclient.MAX_GRPC_MESSAGE_SIZE
        # tritonclient's own defaults (message sizes, no keepalive pings) plus the backoff cap.
        self._c = grpcclient.InferenceServerClient(url, channel_args=[  # thread-safe; connects lazily
            ("grpc.max_send_message_length", max_msg),
            ("grpc.max_receive_message_length", max_msg),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
        ])

    def _module(self):
        return self._mod

    def _client(self):
        return self._c

    def _call_kw(self, timeout_s: float) -> dict:
        return {"client_timeout": timeout_s}

    def close(self) -> None:
        self._c.close()


class _Http(_Protocol):
    """tritonclient.http (geventhttpclient) is not safe across OS threads: one client per
    thread (the batcher's worker, the readiness probe's thread)."""

    name = "http"

    def __init__(self, url: str, timeout_s: float, models: list[str]) -> None:
        super().__init__(url, timeout_s, models)
        import tritonclient.http as httpclient

        self._mod = httpclient
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()

    def _module(self):
        return self._mod

    def _client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._mod.InferenceServerClient(self.url, connection_timeout=PING_TIMEOUT_S,
                                                network_timeout=self.timeout_s)
            self._local.client = c
            with self._lock:
                self._all.append(c)
        return c

    def close(self) -> None:
        with self._lock:
            clients, self._all = self._all, []
        for c in clients:
            try:
                c.close()
            except Exception:
                pass


class TritonEngine:
    """The graphs run by a Triton server (glipv2.runtime.batch.Engine), tensors named by
    glipv2.runtime.graphs."""

    def __init__(self, url: str, models: list[str], timeout_s: float = 30.0, http_url: str | None = None) -> None:
        """models: the Triton models to call (and to wait for); with the `caption` loop model
        among them, captions are decoded inside Triton, else step by step from here."""
        self.url = url
        self.http_url = http_url or None
        self.timeout_s = float(timeout_s)
        self.protocols: list[_Protocol] = [_Grpc(url, self.timeout_s, models)]
        if self.http_url:
            self.protocols.append(_Http(self.http_url, self.timeout_s, models))
        self._active: _Protocol | None = None
        self._select_lock = threading.Lock()
        if CAPTION in models:
            self.captioner = _TritonCaptionLoop(self)
        else:
            self.captioner = self if CAPTION_START in models and CAPTION_STEP in models else None

    @property
    def protocol(self) -> str | None:
        """'grpc' or 'http' once a ping found one that answers; None before."""
        return self._active.name if self._active is not None else None

    def _select(self) -> _Protocol:
        """The first protocol whose server answers (gRPC, then HTTP); ConnectionError naming
        every failure when none does."""
        with self._select_lock:
            errors = []
            for p in self.protocols:
                try:
                    p.ready()
                except ConnectionError as exc:
                    errors.append(str(exc))
                    continue
                self._active = p
                return p
            self._active = None
            raise ConnectionError("; ".join(errors))

    def _infer(self, model: str, *arrays: np.ndarray) -> list[np.ndarray]:
        """arrays: the model's inputs in order; optional last ones may be left out."""
        p = self._active or self._select()
        names = inputs_of(model)[:len(arrays)]
        return p.infer(model, dict(zip(names, arrays, strict=True)), list(outputs_of(model)))

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._infer(TEXT_ENCODER, input_ids, attention_mask)[0]

    def detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        return tuple(self._infer(DETECTOR, images, features, attention_mask))

    def vqa(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._infer(VQA, images, features, attention_mask)[0]

    # the CaptionEngine protocol of glipv2.captioning
    def start(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self._infer(CAPTION_START, images))

    def step(self, tokens, past_k, past_v, cross_k, cross_v) -> tuple[np.ndarray, ...]:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        return tuple(self._infer(CAPTION_STEP, tokens, past_k, past_v, cross_k, cross_v))

    def ping(self) -> None:
        active = self._active
        if active is not None:
            try:
                active.ready()
                return
            except ConnectionError:
                if len(self.protocols) == 1:
                    self._active = None
                    raise
        self._select()

    def close(self) -> None:
        for p in self.protocols:
            p.close()


class _TritonCaptionLoop:
    """The CaptionLoop of glipv2.captioning: one request to Triton's `caption` model decodes
    a batch of images (glipv2.captioning.beam_search runs there)."""

    def __init__(self, engine: TritonEngine) -> None:
        self.engine = engine

    def decode(self, images: np.ndarray, beam_size: int, max_len, found: np.ndarray | None = None) -> list[Hypothesis]:
        b = images.shape[0]
        beams = np.full((b, 1), beam_size, dtype=np.int32)
        limits = np.asarray(max_len, dtype=np.int32).reshape(b, 1)
        checked = () if found is None else (np.asarray(found, dtype=np.uint8).reshape(b, -1),)
        tokens, lengths, logprobs = self.engine._infer(CAPTION, images, beams, limits, *checked)
        return [Hypothesis([int(t) for t in tokens[i, :int(lengths[i, 0])]], float(logprobs[i, 0])) for i in range(b)]


class TritonBackend(EngineBackend):
    name = "triton"

    def __init__(self, repository: Path, url: str, cache_size: int = 1024, timeout_s: float = 30.0,
                 http_url: str | None = None, cache_bytes: int = 64 * 1024 * 1024, caption_loop: bool = True) -> None:
        """caption_loop False decodes captions step by step over the network even when the
        repository has the caption loop model (the old path, kept for comparisons)."""
        manifest = Manifest.load(repository)
        models = list(manifest.models)
        if caption_loop and manifest.caption and manifest.caption.decoder:
            models.append(manifest.caption.decoder)
        super().__init__(repository, TritonEngine(url, models, timeout_s, http_url), cache_size, manifest,
                         cache_bytes)
        # where Triton runs the models: what the repository's flavour declares (KIND_GPU
        # instances for gpu / gpu-onnx; Triton started with --exit-on-error refuses to come
        # up when it cannot place them)
        self.device = "cpu" if manifest.flavour == "cpu" else "cuda"
        self.url, self.http_url, self.timeout_s = url, self.engine.http_url, self.engine.timeout_s

    @property
    def protocols(self) -> list[_Protocol]:
        return self.engine.protocols

    @property
    def protocol(self) -> str | None:
        return self.engine.protocol

    def ping(self) -> None:
        self.engine.ping()

    def stats(self) -> dict:
        return {**super().stats(), "protocol": self.protocol}

    def close(self) -> None:
        self.engine.close()
