"""Triton python-backend model of the cpu flavour: runs <model>/1/model.onnx with ONNX Runtime.

One file serves both models (text_encoder, detector): everything model-specific comes from
the model config Triton passes in. `make export` copies it to <model>/1/model.py.

Batching. With dynamic batching Triton hands execute() several requests, each with its own
batch axis. The token inputs are declared `allow_ragged_batch`, so requests whose prompts
have different token lengths arrive together: execute() pads every token axis (the one dim
declared -1 in the config) with zeros to the longest length of this execution (a zero
attention mask marks the padding, which the graphs ignore), concatenates along the batch,
runs ONNX Runtime once, and splits the outputs back per request, slicing each output's
token axis back to that request's length (plus any growth: the caption step's cache
output is one step longer than its input; its config is not ragged, so Triton only batches
caches of equal length). A malformed request gets an error response of its own; the
others in the execution are still served.

Dependencies: numpy, onnxruntime, the standard library (json) and pb_tensors.py (the
tensor conversions, copied next to this file).
Config parameters: onnx_file (default model.onnx), intra_op_thread_count (0 = ORT default).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pb_tensors.py, rendered next to this file
from pb_tensors import NUMPY_TYPES, as_numpy, error_response, to_tensor  # noqa: E402


class RequestError(ValueError):
    """A request this model cannot run; becomes that request's error response."""


class _Tensor:
    """One input or output of the config: name, numpy dtype, dims without the batch axis,
    and the token axis (index in the batched array) or None."""

    def __init__(self, spec: dict) -> None:
        self.name = spec["name"]
        dtype = spec.get("data_type", "TYPE_FP32")
        if dtype not in NUMPY_TYPES:
            raise ValueError(f"tensor {self.name!r}: unsupported data_type {dtype}")
        self.dtype = np.dtype(NUMPY_TYPES[dtype])
        self.dims = [int(d) for d in spec.get("dims", [])]  # JSON may carry int64 as strings
        dynamic = [i for i, d in enumerate(self.dims) if d == -1]
        if len(dynamic) > 1:
            raise ValueError(f"tensor {self.name!r}: at most one -1 (token) dim is supported, got {self.dims}")
        self.token_axis = dynamic[0] + 1 if dynamic else None


def pad_to(array: np.ndarray, axis: int | None, length: int) -> np.ndarray:
    """Zero-pad `axis` of `array` up to `length` (no copy when already that long)."""
    if axis is None or array.shape[axis] == length:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, length - array.shape[axis])
    return np.pad(array, widths, mode="constant", constant_values=0)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.config = json.loads(args["model_config"])
        self.name = self.config.get("name", args.get("model_name", "model"))
        self.max_batch_size = int(self.config.get("max_batch_size", 0))
        if self.max_batch_size < 1:
            raise pb_utils.TritonModelException(f"{self.name}: this model needs max_batch_size >= 1")
        params = {k: v.get("string_value", "") for k, v in (self.config.get("parameters") or {}).items()}
        self.inputs = [_Tensor(spec) for spec in self.config.get("input", [])]
        self.outputs = [_Tensor(spec) for spec in self.config.get("output", [])]

        onnx_file = params.get("onnx_file") or "model.onnx"
        candidates = []
        if args.get("model_repository"):
            candidates.append(Path(args["model_repository"]) / str(args.get("model_version", "1")) / onnx_file)
        candidates.append(Path(__file__).resolve().parent / onnx_file)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise pb_utils.TritonModelException(
                f"{self.name}: no {onnx_file} found (looked in {[str(p) for p in candidates]}); "
                "run `make export` to write the ONNX files")

        opts = ort.SessionOptions()
        threads = int(params.get("intra_op_thread_count") or 0)
        if threads > 0:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [t.name for t in self.inputs if t.name not in graph_inputs] + \
                  [t.name for t in self.outputs if t.name not in graph_outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{self.name}: config names {missing} are not tensors of {path}")
        self.path = path

    # ------------------------------------------------------------------ requests

    def _read(self, request) -> tuple[dict[str, np.ndarray], int, int | None]:
        """Validated input arrays of one request, its batch size and token length."""
        arrays: dict[str, np.ndarray] = {}
        batch = tokens = None
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise RequestError(f"{self.name}: missing input {spec.name!r}")
            array = as_numpy(tensor)
            if array.dtype != spec.dtype:
                raise RequestError(f"{self.name}: input {spec.name!r} is {array.dtype}, expected {spec.dtype}")
            if array.ndim != len(spec.dims) + 1:
                raise RequestError(f"{self.name}: input {spec.name!r} has shape {list(array.shape)}, "
                                   f"expected [batch] + {spec.dims}")
            for axis, want in enumerate(spec.dims, start=1):
                if want != -1 and array.shape[axis] != want:
                    raise RequestError(f"{self.name}: input {spec.name!r} has shape {list(array.shape)}, "
                                       f"expected [batch] + {spec.dims}")
            if batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise RequestError(f"{self.name}: inputs disagree on the batch size ({batch} vs "
                                   f"{array.shape[0]} for {spec.name!r})")
            if spec.token_axis is not None:
                t = array.shape[spec.token_axis]
                if tokens is None:
                    tokens = t
                elif t != tokens:
                    raise RequestError(f"{self.name}: inputs disagree on the token length ({tokens} vs "
                                       f"{t} for {spec.name!r})")
            arrays[spec.name] = array
        if not batch:
            raise RequestError(f"{self.name}: empty batch")
        if batch > self.max_batch_size:
            raise RequestError(f"{self.name}: batch {batch} exceeds max_batch_size {self.max_batch_size}")
        if tokens == 0:
            raise RequestError(f"{self.name}: empty token axis")
        return arrays, batch, tokens

    def _run(self, items: list[tuple[dict[str, np.ndarray], int, int | None]]) -> list[list[np.ndarray]]:
        """One ONNX Runtime call over several requests' inputs -> each request's outputs."""
        lengths = [t for _, _, t in items if t is not None]
        longest = max(lengths) if lengths else None
        feeds = {}
        for spec in self.inputs:
            parts = [pad_to(arrays[spec.name], spec.token_axis, longest) for arrays, _, _ in items]
            feeds[spec.name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        results = self.session.run([o.name for o in self.outputs], feeds)
        per_request = []
        start = 0
        for _, batch, tokens in items:
            outs = []
            for spec, result in zip(self.outputs, results):
                part = result[start:start + batch]
                if spec.token_axis is not None and tokens is not None:
                    # The output's axis may be longer than the inputs' (a decoder cache grows by
                    # one step): keep this request's length plus that growth.
                    keep = tokens + result.shape[spec.token_axis] - longest
                    if keep != part.shape[spec.token_axis]:
                        part = part.take(np.arange(keep), axis=spec.token_axis)
                outs.append(np.ascontiguousarray(part, dtype=spec.dtype))
            per_request.append(outs)
            start += batch
        return per_request

    def _respond(self, outputs: list[np.ndarray]):
        return pb_utils.InferenceResponse(
            output_tensors=[to_tensor(spec.name, array) for spec, array in zip(self.outputs, outputs)])

    def execute(self, requests):
        responses = [None] * len(requests)
        good: list[int] = []
        items = []
        for i, request in enumerate(requests):
            try:
                items.append(self._read(request))
                good.append(i)
            except RequestError as e:
                responses[i] = error_response(str(e))
            except Exception as e:  # noqa: BLE001 - a bad request must not fail the others
                responses[i] = error_response(f"{self.name}: cannot read request: {e}")
        if items:
            try:
                for i, outs in zip(good, self._run(items)):
                    responses[i] = self._respond(outs)
            except Exception as batch_error:  # noqa: BLE001
                if len(items) == 1:
                    responses[good[0]] = error_response(f"{self.name}: inference failed: {batch_error}")
                else:  # find the culprit: run each request alone
                    for i, item in zip(good, items):
                        try:
                            responses[i] = self._respond(self._run([item])[0])
                        except Exception as e:  # noqa: BLE001
                            responses[i] = error_response(f"{self.name}: inference failed: {e}")
        return responses

    def finalize(self) -> None:
        self.session = None
