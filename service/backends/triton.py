"""Triton backend: the same prompts, cache, padding and postprocessing as the embedded
backend, with the two engine calls sent to a Triton server over gRPC (tritonclient).

The gateway's micro-batcher still forms the batches (one padded detector request per
batch, the same shapes for every flavour: TensorRT plans need dense batches); Triton's
own dynamic batcher can merge batches of several gateway processes on top of that.
The manifest and tokenizer are read from the local copy of the repository Triton serves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from service.backends.base import EngineBackend

MODELS = ("text_encoder", "detector")


def _input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    inp.set_data_from_numpy(np.ascontiguousarray(array))
    return inp


class TritonBackend(EngineBackend):
    name = "triton"

    def __init__(self, repository: Path, url: str, cache_size: int = 1024, timeout_s: float = 30.0) -> None:
        super().__init__(repository, cache_size)
        self.url = url
        self.timeout_s = float(timeout_s)
        self.client = grpcclient.InferenceServerClient(url)

    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        result = self.client.infer(
            model,
            [_input(k, v) for k, v in inputs.items()],
            outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
            client_timeout=self.timeout_s,
        )
        return [result.as_numpy(o) for o in outputs]

    def _encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._infer("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask},
                           ["token_features"])[0]

    def _detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        return tuple(self._infer("detector", {"images": images, "token_features": features,
                                              "attention_mask": attention_mask},
                                 ["boxes", "logits", "centerness"]))

    def ping(self) -> None:
        try:
            if not self.client.is_server_ready(client_timeout=5.0):
                raise ConnectionError(f"triton at {self.url} is not ready")
            for model in MODELS:
                if not self.client.is_model_ready(model, client_timeout=5.0):
                    raise ConnectionError(f"triton at {self.url}: model {model} is not ready")
        except InferenceServerException as exc:
            raise ConnectionError(f"triton at {self.url}: {exc.message()}") from None

    def close(self) -> None:
        self.client.close()
