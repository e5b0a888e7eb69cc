"""Triton python-backend model `caption`: the whole caption decode loop inside Triton.

Through the gateway's per-step path every decoding step was one gRPC round trip that
carried the decoder's key/value caches both ways (the cross-attention caches alone are
about 0.65 MB per image and step): captions ran at 11 images/s against 126 embedded. This
model takes images and returns finished captions; the loop, glipv2/captioning.py's
beam_search (copied next to this file by `make export` as glipv2_captioning.py, unchanged:
the Triton image has no glipv2 package), calls caption_start and caption_step without
leaving the server, in one of two ways (config parameter `graphs`):
- "triton" (GPU flavours): business logic scripting (BLS), an in-process request to the
  Triton models caption_start / caption_step (TensorRT), outputs asked for in CPU memory;
- "onnxruntime" (cpu flavour): the two graphs' ONNX files (in their own model folders) run
  by ONNX Runtime in this process. There the graphs are python-backend models themselves,
  so a BLS call is two process hops per step; measured on the 2-core CPU that was slower
  than the per-step gRPC path it replaces (9.6 against 12.6 images/s, embedded 62).

Batching. Triton's dynamic batcher hands execute() several requests; every image of every
request with the same beam size decodes in one lockstep batch (rows that finish leave it).
The step graph's batch limit is max_batch_size x MAX_BEAM, so a full batch of images at the
largest beam still fits one step request. A request with a bad beam size or length limit
gets an error response of its own; a failing graph call fails the requests of that batch.

Inputs per image: images uint8 [3, H, W] (letterboxed), beam_size int32 [1], max_len int32
[1] (tokens before the end token, at most the model's), and optionally found uint8 [C]: 1
for each of the model's C checked phrases the detector found on the image (the gateway
grounds them first); a request with it decodes with glipv2.captioning.CheckedRules, one per
image, so checked and unchecked requests share a batch. Outputs per image: tokens int64 [T]
(decoder shortlist indices, -1 after the caption's end: T is the longest of the request),
num_tokens int32 [1], logprob fp64 [1] (summed, end token included).

Config parameters (rendered from glipv2.runtime.graphs, the names' single source): graphs,
start_model / start_inputs / start_outputs, step_model / step_inputs / step_outputs
(comma-separated tensor names in call order), end_index (the end token's shortlist index),
max_len, pieces / words (the decode rules), checked_phrases (JSON list, found's order),
intra_op_thread_count (onnxruntime; 0 = its default). Dependencies: numpy,
pb_tensors.py, glipv2_captioning.py, and onnxruntime for graphs "onnxruntime".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the files rendered next to this one
from glipv2_captioning import MAX_BEAM, MentionRules, PhraseCheck, beam_search  # noqa: E402
from glipv2_phrases import ends_on_phrase, repeated_mention  # noqa: E402
from pb_tensors import as_numpy, error_response, to_tensor  # noqa: E402


class RequestError(ValueError):
    """A request this model cannot run; becomes that request's error response."""


class GraphError(RuntimeError):
    """caption_start or caption_step answered with an error."""


class BlsGraph:
    """One graph called in-process through Triton (BLS): numpy arrays in call order in, out."""

    def __init__(self, model: str, inputs: str, outputs: str) -> None:
        self.model = model
        self.inputs = [n for n in inputs.split(",") if n]
        self.outputs = [n for n in outputs.split(",") if n]
        # Ask for the outputs in CPU memory: the loop is numpy, and on a GPU flavour the
        # graphs' outputs would otherwise stay in GPU memory where as_numpy cannot read them.
        memory = getattr(pb_utils, "PreferredMemory", None)
        self.kwargs = {"preferred_memory": memory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)} if memory else {}

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        request = pb_utils.InferenceRequest(
            model_name=self.model, inputs=[to_tensor(n, a) for n, a in zip(self.inputs, arrays)],
            requested_output_names=self.outputs, **self.kwargs)
        response = request.exec()
        if response.has_error():
            raise GraphError(f"{self.model}: {response.error().message()}")
        return tuple(as_numpy(pb_utils.get_output_tensor_by_name(response, n)) for n in self.outputs)


class OrtGraph:
    """One graph's ONNX file run by ONNX Runtime in this process, same call convention."""

    def __init__(self, path: Path, inputs: str, outputs: str, threads: int) -> None:
        import onnxruntime as ort  # only this way of running the graphs needs it

        if not path.is_file():
            raise pb_utils.TritonModelException(f"no {path}; run `make export` to write the ONNX files")
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
        # no spin-waiting after each run: this process shares the cores with the other models'
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [n for n in inputs.split(",") if n]
        self.outputs = [n for n in outputs.split(",") if n]

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(self.outputs, dict(zip(self.inputs, arrays))))


class CaptionGraphs:
    """glipv2.captioning's CaptionEngine over the two graphs."""

    def __init__(self, start: BlsGraph, step: BlsGraph) -> None:
        self.start_graph, self.step_graph = start, step

    def start(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.start_graph(images)

    def step(self, tokens, past_k, past_v, cross_k, cross_v) -> tuple[np.ndarray, ...]:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        return self.step_graph(tokens, past_k, past_v, cross_k, cross_v)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config.get("name", args.get("model_name", "caption"))
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        try:
            kind = params.get("graphs", "triton")
            if kind == "triton":
                graphs = [BlsGraph(params[f"{g}_model"], params[f"{g}_inputs"], params[f"{g}_outputs"])
                          for g in ("start", "step")]
            elif kind == "onnxruntime":
                # <repository>/<graph model>/1/model.onnx, beside this model's folder
                root = Path(args["model_repository"]).parent
                threads = int(params.get("intra_op_thread_count") or 0)
                graphs = [OrtGraph(root / params[f"{g}_model"] / "1" / "model.onnx", params[f"{g}_inputs"],
                                   params[f"{g}_outputs"], threads) for g in ("start", "step")]
            else:
                raise ValueError(f"graphs must be 'triton' or 'onnxruntime', got {kind!r}")
            self.engine = CaptionGraphs(*graphs)
            self.end_index = int(params["end_index"])
            self.max_len = int(params["max_len"])
            # the same decode rules as the embedded backend (glipv2.understanding.CaptionPipeline)
            self.rules = MentionRules(params["pieces"].split(" "), repeated_mention, ends_on_phrase,
                                      params.get("words", "").split())
            self.check = PhraseCheck(json.loads(params.get("checked_phrases") or "[]"))
        except (KeyError, ValueError) as exc:
            raise pb_utils.TritonModelException(f"{self.name}: bad or missing config parameter: {exc}") from None
        # tensor names in call order, as the config lists them (rendered from glipv2.runtime.graphs)
        self.input_names = [t["name"] for t in config.get("input", [])]
        # found, which the config marks optional: a request without it decodes unchecked
        self.optional_inputs = {t["name"] for t in config.get("input", []) if t.get("optional")}
        self.output_names = [t["name"] for t in config.get("output", [])]
        if len(self.input_names) != 4 or len(self.output_names) != 3:
            raise pb_utils.TritonModelException(f"{self.name}: expected 4 inputs and 3 outputs in the config")

    def _read(self, request) -> tuple[np.ndarray, list[int], list[int], list]:
        """(images, beam size per image, token limit per image, decode rules per image) of
        one request."""
        arrays = []
        for name in self.input_names:  # images, beam_size, max_len, found (optional, last)
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                if name in self.optional_inputs:
                    arrays.append(None)
                    continue
                raise RequestError(f"{self.name}: missing input {name!r}")
            arrays.append(as_numpy(tensor))
        images, beam_size, max_len, found = arrays
        if images.ndim != 4 or images.dtype != np.uint8 or not images.shape[0]:
            raise RequestError(f"{self.name}: images must be uint8 [batch, 3, H, W], got "
                               f"{images.dtype} {list(images.shape)}")
        b = images.shape[0]
        beams = [int(v) for v in beam_size.reshape(-1)]
        limits = [int(v) for v in max_len.reshape(-1)]
        if len(beams) != b or len(limits) != b:
            raise RequestError(f"{self.name}: beam_size and max_len need one value per image ({b})")
        if not all(1 <= k <= MAX_BEAM for k in beams):
            raise RequestError(f"{self.name}: beam_size must be in 1..{MAX_BEAM}, got {beams}")
        if not all(1 <= n <= self.max_len for n in limits):
            raise RequestError(f"{self.name}: max_len must be in 1..{self.max_len}, got {limits}")
        if found is None:
            return images, beams, limits, [self.rules] * b
        if not len(self.check):
            raise RequestError(f"{self.name}: this model has no checked phrases; leave out {self.input_names[-1]!r}")
        if found.shape != (b, len(self.check)) or not np.isin(found, (0, 1)).all():
            raise RequestError(f"{self.name}: {self.input_names[-1]} must be 0 or 1 for each of the "
                               f"{len(self.check)} checked phrases of each image, got shape {list(found.shape)}")
        return images, beams, limits, self.check.rules_per_image(self.rules, found)

    def execute(self, requests):
        responses = [None] * len(requests)
        rows = []  # (request index, row in request, image, beam, limit, rules) of every valid image
        for i, request in enumerate(requests):
            try:
                images, beams, limits, rules = self._read(request)
            except RequestError as exc:
                responses[i] = error_response(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a bad request must not fail the others
                responses[i] = error_response(f"{self.name}: cannot read request: {exc}")
                continue
            rows += [(i, j, images[j], beams[j], limits[j], rules[j]) for j in range(images.shape[0])]
        results: dict[tuple[int, int], object] = {}
        failed: dict[int, str] = {}
        for beam in sorted({r[3] for r in rows}):  # one lockstep decode per beam size
            group = [r for r in rows if r[3] == beam]
            try:
                hyps = beam_search(self.engine, np.ascontiguousarray(np.stack([r[2] for r in group])),
                                   self.end_index, beam, [r[4] for r in group], rules=[r[5] for r in group])
            except Exception as exc:  # noqa: BLE001 - becomes the error of this group's requests
                for r in group:
                    failed.setdefault(r[0], f"{self.name}: decoding failed: {exc}")
                continue
            results.update({(r[0], r[1]): h for r, h in zip(group, hyps)})
        for i in range(len(requests)):
            if responses[i] is not None:
                continue
            if i in failed:
                responses[i] = error_response(failed[i])
                continue
            hyps = [results[(i, j)] for j in range(sum(1 for r in rows if r[0] == i))]
            width = max(1, max(len(h.tokens) for h in hyps))
            tokens = np.full((len(hyps), width), -1, dtype=np.int64)
            for j, h in enumerate(hyps):
                tokens[j, :len(h.tokens)] = h.tokens
            lengths = np.asarray([[len(h.tokens)] for h in hyps], dtype=np.int32)
            logprobs = np.asarray([[h.logprob] for h in hyps], dtype=np.float64)
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                to_tensor(n, a) for n, a in zip(self.output_names, (tokens, lengths, logprobs))])
        return responses

    def finalize(self) -> None:
        self.engine = None
