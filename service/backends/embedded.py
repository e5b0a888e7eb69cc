"""Embedded backend: the repository's ONNX files run by ONNX Runtime in this process."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from glipv2.runtime.graphs import model_file
from glipv2.runtime.manifest import Manifest
from glipv2.runtime.onnx import OrtEngine, installed_ort_distributions
from service.backends.base import EngineBackend

log = logging.getLogger("service")


class EmbeddedBackend(EngineBackend):
    """ONNX Runtime in this process (CUDA provider when present, else CPU)."""

    name = "embedded"

    def __init__(self, repository: Path, cache_size: int = 1024, threads: int = 0, spinning: bool = False,
                 cache_bytes: int = 64 * 1024 * 1024, device: str = "auto") -> None:
        """device: "auto", "cpu" or "cuda"; with "cuda" the backend refuses to start
        (glipv2.runtime.onnx.DeviceError) unless ONNX Runtime really runs the models on CUDA."""
        repository = Path(repository)
        manifest = Manifest.load(repository)
        for model in manifest.models:
            path = model_file(repository, model, "onnx")
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; run `make export` to write the ONNX files")
        engine = OrtEngine(repository, threads, spinning, device)
        super().__init__(repository, engine, cache_size, manifest, cache_bytes)
        self.device = engine.device
        self.providers = engine.providers
        dists = installed_ort_distributions()
        log.info("embedded backend: ONNX Runtime %s runs the models on %s (providers: %s)", ort.__version__,
                 self.device, ", ".join(self.providers))
        if len(dists) > 1:
            log.warning("both %s are installed: they overwrite the same onnxruntime module; keep one "
                        "(the `cpu` or the `gpu` extra)", " and ".join(dists))

    def ping(self) -> None:
        ids = np.array([[self.tokenizer.cls_id, self.tokenizer.sep_id]], dtype=np.int64)
        self.engine.encode_text(ids, np.ones_like(ids))
