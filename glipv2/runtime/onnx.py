"""Run the exported graphs with ONNX Runtime (CPU, or CUDA when available): the engine of
the embedded backend, of the export parity check and of the benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from glipv2.runtime.graphs import CAPTION_START, CAPTION_STEP, DETECTOR, TEXT_ENCODER, VQA, inputs_of, model_file


DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Distributions that all install the same `onnxruntime` module: with two of them installed
# the last one installed wins, file by file (pip does not stop it).
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


class DeviceError(RuntimeError):
    """The device asked for is not what ONNX Runtime runs the model on (e.g. CUDA asked,
    CUDA libraries missing, so ONNX Runtime fell back to the CPU)."""


def installed_ort_distributions() -> list[str]:
    """Which of the ONNX Runtime distributions are installed (pip metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            version(name)
        except PackageNotFoundError:
            continue
        found.append(name)
    return found


def _install_hint(distributions: list[str]) -> str:
    if len(distributions) > 1:
        return (f"{' and '.join(distributions)} are both installed and overwrite the same module; "
                "keep one: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu "
                "(the project's `gpu` extra; `cpu` is the other one, never both)")
    return "install onnxruntime-gpu (the project's `gpu` extra instead of `cpu`) and the CUDA 12 libraries"


def requested_providers(device: str, available: list[str]) -> list[str]:
    """The providers to ask ONNX Runtime for: CPU only for "cpu"; CUDA first for "auto"
    (when the build has it) and "cuda" (DeviceError when the build lacks it)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if device == "cuda" and CUDA not in available:
        raise DeviceError(f"device 'cuda' asked for, but this ONNX Runtime ({ort.__version__}) has no CUDA "
                          f"provider (it has {', '.join(available)}): {_install_hint(installed_ort_distributions())}")
    if device == "cpu":
        return [CPU]
    return [p for p in (CUDA, CPU) if p in available]


def session_device(sess: ort.InferenceSession) -> str:
    """What a session runs on: "cuda" when the CUDA provider is among the session's own
    providers (not merely available: ONNX Runtime drops it, with only a warning, when the
    CUDA libraries do not load), else "cpu"."""
    return "cuda" if CUDA in sess.get_providers() else "cpu"


def session(path: Path, threads: int = 0, spinning: bool = True, device: str = "auto") -> ort.InferenceSession:
    """spinning=False stops ORT's worker threads from spin-waiting after each run (its
    default): with two sessions on few cores, one session's spinning threads steal the
    other's cores (measured on 2 cores by the gateway: an uncached request 19.4 ms with
    spinning, 10.7 ms without).

    device: "auto" (CUDA when it works, else CPU), "cpu", or "cuda" (DeviceError unless the
    session really runs on CUDA)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = requested_providers(device, ort.get_available_providers())
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if device == "cuda" and session_device(sess) != "cuda":
        raise DeviceError(f"{path}: device 'cuda' asked for, but ONNX Runtime runs it on "
                          f"{', '.join(sess.get_providers())} (the CUDA provider did not load; its warning above "
                          f"says which library is missing): {_install_hint(installed_ort_distributions())}")
    return sess


class _Graph:
    """One ONNX session called positionally in glipv2.runtime.graphs' input order."""

    def __init__(self, name: str, sess: ort.InferenceSession) -> None:
        self.name, self.session, self.inputs = name, sess, inputs_of(name)

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.inputs, arrays, strict=True)))

    def __getattr__(self, name: str):  # the session's own API (get_providers, get_inputs, ...)
        return getattr(self.session, name)


class OrtEngine:
    """The engine of glipv2.runtime.batch.BatchRunner over the repository's ONNX files."""

    def __init__(self, onnx_dir: Path, threads: int = 0, spinning: bool = True, device: str = "auto") -> None:
        """onnx_dir: an export folder (<model>.onnx) or a Triton repository (<model>/1/model.onnx).
        The VQA and caption graphs are loaded when present (None otherwise). device: see session()."""
        def load(name: str) -> _Graph:
            return _Graph(name, session(model_file(onnx_dir, name, "onnx"), threads, spinning, device))

        def optional(name: str) -> _Graph | None:
            return load(name) if model_file(onnx_dir, name, "onnx").is_file() else None

        self.text, self.detector = load(TEXT_ENCODER), load(DETECTOR)
        self.vqa_graph = optional(VQA)
        start, step = optional(CAPTION_START), optional(CAPTION_STEP)
        self.captioner = OrtCaptionEngine(start, step) if start and step else None

    def sessions(self) -> list[ort.InferenceSession]:
        graphs = (self.text, self.detector, self.vqa_graph,
                  *((self.captioner.start_graph, self.captioner.step_graph) if self.captioner else ()))
        return [g.session for g in graphs if g is not None]

    @property
    def device(self) -> str:
        """"cuda" only when every session runs on CUDA (what the sessions report)."""
        return "cuda" if all(session_device(s) == "cuda" for s in self.sessions()) else "cpu"

    @property
    def providers(self) -> list[str]:
        return list(self.text.session.get_providers())

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.text(input_ids, attention_mask)[0]

    def detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        return tuple(self.detector(images, features, attention_mask))

    def vqa(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.vqa_graph is None:
            raise RuntimeError("no vqa graph in this export (the model has no VQA head)")
        return self.vqa_graph(images, features, attention_mask)[0]

    def answer(self, images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Question ids -> answer logits (text encoder, then the vqa graph)."""
        return self.vqa(images, self.encode_text(input_ids, attention_mask), attention_mask)


class OrtCaptionEngine:
    """caption_start.onnx / caption_step.onnx: the CaptionEngine of glipv2.captioning."""

    def __init__(self, start: _Graph, step: _Graph) -> None:
        self.start_graph, self.step_graph = start, step

    def start(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.start_graph(images))

    def step(self, tokens, past_k, past_v, cross_k, cross_v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.step_graph(np.asarray(tokens, dtype=np.int64).reshape(-1, 1), past_k, past_v,
                                     cross_k, cross_v))
