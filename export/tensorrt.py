"""TensorRT engines from the exported ONNX graphs: `python -m export.tensorrt`.

For each model in a model repository's manifest.json this builds
`<repository>/<model>/1/model.plan` from `<repository>/<model>/1/model.onnx` with the
TensorRT 10.x Python API (fp16 by default, one optimization profile covering batch
1..max_batch_size and tokens 1..max_tokens, a persistent timing cache), then checks the
engines against ONNX Runtime: the same detections after postprocessing on a few
shapes-world images.

What runs where:
- `profile_shapes`, `compare_detections`, `parity` and the CLI's argument/manifest
  checks are pure Python/numpy and are tested on CPU machines.
- `build_engine`, `TrtModel`/`TrtEngine` and `verify_engine` need the tensorrt package
  (10.x: `BuilderFlag.FP16` is gone in TensorRT 11) and a CUDA GPU. They are written
  against the 10.x API documentation and have NOT been run on a GPU by their author.
  The CLI runs them in NVIDIA's TensorRT container on the GPU host; without a GPU or
  without tensorrt it prints one line saying so and exits with code 3.

Exit codes of the CLI: 0 ok, 1 build or parity failure, 2 missing/invalid manifest or
ONNX file, 3 this machine cannot build engines (no tensorrt 10.x, no CUDA GPU, or the
parity check's Python packages are missing).

tensorrt, onnxruntime and numpy are imported lazily so that the CLI can explain what is
missing instead of failing at import time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from glipv2.runtime.graphs import CAPTION_START, CAPTION_STEP, DETECTOR, TEXT_ENCODER, VQA, model_file
from glipv2.runtime.graphs import opt_batch as default_opt_batch

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from glipv2.postprocess import Detections
    from glipv2.runtime.manifest import Manifest

MODELS_DETECTION = (TEXT_ENCODER, DETECTOR)
# A plan loads only into the TensorRT version that built it: the builder must run the
# TensorRT of the Triton release that serves the plans. NGC release -> TensorRT major.minor
# of its tritonserver and tensorrt images (NVIDIA's frameworks support matrix).
TRITON_TAG = "24.10"  # Triton 2.51, the one pytriton 0.7.0 embeds (export/local_triton.py)
TENSORRT_FOR_TRITON = {"24.08": "10.3", "24.09": "10.4", "24.10": "10.5", "24.11": "10.6", "24.12": "10.7"}
TRITON_TAG_ENV = "GLIPV2_TRITON_TAG"  # compose passes its TRITON_TAG here
CONTAINER = f"nvcr.io/nvidia/tensorrt:{TRITON_TAG}-py3"  # TensorRT 10.5; same YY.MM as tritonserver:24.10
EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_ENVIRONMENT = 0, 1, 2, 3

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]


class TensorRTUnavailable(RuntimeError):
    """This machine cannot build or run TensorRT engines (no tensorrt 10.x, or no CUDA GPU)."""


class OnnxParseError(RuntimeError):
    def __init__(self, onnx_path: Path, errors: Sequence[str]) -> None:
        self.onnx_path = Path(onnx_path)
        self.errors = list(errors)
        detail = "\n  ".join(self.errors) or "(the parser reported no details)"
        super().__init__(f"TensorRT's ONNX parser rejected {self.onnx_path} ({len(self.errors)} error(s)):\n  {detail}")


class EngineBuildError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------
# Optimization profiles (pure Python)


def load_manifest(repository: str | os.PathLike) -> "Manifest":
    """<repository>/manifest.json as glipv2.runtime.manifest.Manifest (imported here: it
    imports numpy, which this module's import must not). FileNotFoundError when absent,
    ManifestError (a ValueError) naming the bad key."""
    from glipv2.runtime.manifest import Manifest

    return Manifest.load(repository)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def profile_shapes(
    manifest: "Manifest",
    model: str,
    *,
    opt_batch: int | None = None,
    opt_tokens: int | None = None,
) -> ProfileShapes:
    """(min, opt, max) shapes per input of `model`, batch axis included.

    - batch: 1 .. the model's max_batch_size, opt = max_batch_size // 2 (at least 1);
    - every dynamic (-1) non-batch dim is the token axis: 1 .. manifest.max_tokens; opt is
      the middle token bucket (64 for buckets 16..256), clamped to max_tokens; except where
      the model's dynamic_axis counts "steps" (the caption step graph's cache), which gives
      its range;
    - fixed dims (image channels/height/width, the text feature width) as given.
    """
    if model not in manifest.models:
        raise ValueError(f"model {model!r} is not in the manifest (it has: {', '.join(manifest.models)})")
    entry = manifest.models[model]
    max_batch = _positive_int(entry.max_batch_size, f"{model} max_batch_size")
    max_tokens = _positive_int(manifest.max_tokens, "manifest max_tokens")
    if opt_batch is None:
        opt_batch = default_opt_batch(max_batch)
    if opt_tokens is None:
        buckets = sorted(b for b in manifest.token_buckets if 0 < b <= max_tokens)
        opt_tokens = buckets[len(buckets) // 2] if buckets else min(32, max_tokens)
    if not 1 <= _positive_int(opt_batch, "opt_batch") <= max_batch:
        raise ValueError(f"opt_batch {opt_batch} is outside 1..{max_batch}")
    if not 1 <= _positive_int(opt_tokens, "opt_tokens") <= max_tokens:
        raise ValueError(f"opt_tokens {opt_tokens} is outside 1..{max_tokens}")

    dynamic = entry.dynamic_axis
    if dynamic is not None and dynamic.counts == "steps":  # the caption step's cache length
        dynamic_range = (dynamic.min, dynamic.opt, dynamic.max)
    else:
        dynamic_range = (1, opt_tokens, max_tokens)
    shapes: ProfileShapes = {}
    for name, spec in entry.inputs.items():
        dims = spec.dims
        lo, mid, hi = [1], [opt_batch], [max_batch]
        for d in dims:
            if d == -1:
                ranges = dynamic_range
            elif isinstance(d, int) and not isinstance(d, bool) and d > 0:
                ranges = (d, d, d)
            else:
                raise ValueError(f"{model}.{name}: bad dim {d!r} in {list(dims)} (positive, or -1 for dynamic)")
            for axis, value in zip((lo, mid, hi), ranges):
                axis.append(value)
        shapes[name] = (tuple(lo), tuple(mid), tuple(hi))
    return shapes


# ----------------------------------------------------------------------------------
# Environment checks


def required_tensorrt(triton_tag: str = TRITON_TAG) -> str:
    """TensorRT major.minor whose plans the tritonserver:<triton_tag>-py3 image loads."""
    try:
        return TENSORRT_FOR_TRITON[triton_tag]
    except KeyError:
        raise ValueError(f"unknown Triton release {triton_tag!r}; known: {', '.join(TENSORRT_FOR_TRITON)}") from None


def tensorrt_pip_pin(triton_tag: str = TRITON_TAG) -> str:
    """The pip requirement of the TensorRT that matches the Triton release (never just the newest 10.x)."""
    return f"tensorrt-cu12=={required_tensorrt(triton_tag)}.*"


def check_tensorrt_version(version: str, triton_tag: str | None = TRITON_TAG) -> None:
    """TensorRT 10.x only (11 removed BuilderFlag.FP16; < 10 has a different API), and,
    unless triton_tag is None, the major.minor that the serving Triton release runs: its
    plans do not load anywhere else."""
    parts = str(version).split(".")
    try:
        major = int(parts[0])
    except ValueError:
        raise TensorRTUnavailable(f"cannot read the tensorrt version {version!r}") from None
    tag = triton_tag or TRITON_TAG
    fix = f"pip install '{tensorrt_pip_pin(tag)}', or use the container nvcr.io/nvidia/tensorrt:{tag}-py3"
    if major != 10:
        raise TensorRTUnavailable(f"tensorrt {version} is installed but this script needs TensorRT 10.x ({fix})")
    if triton_tag is not None and ".".join(parts[:2]) != required_tensorrt(triton_tag):
        raise TensorRTUnavailable(
            f"tensorrt {version} is installed but Triton {triton_tag} (tritonserver:{triton_tag}-py3) loads only "
            f"plans built by TensorRT {required_tensorrt(triton_tag)}: {fix} "
            "(or pass --triton-tag for the Triton release you serve with)")


def import_tensorrt(triton_tag: str | None = TRITON_TAG):
    """The tensorrt module, checked against the Triton release (None: only the 10.x check)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("the tensorrt Python package is not installed") from None
    except OSError as exc:  # the package is there but its libraries do not load
        raise TensorRTUnavailable(f"the tensorrt package does not load ({exc})") from None
    check_tensorrt_version(getattr(trt, "__version__", "unknown"), triton_tag)
    return trt


def cuda_device_count() -> int:
    """CUDA devices visible through the driver (libcuda.so.1); 0 when there is no driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def cuda_device_name(device: int = 0) -> str | None:
    """The GPU's name as the driver reports it ("NVIDIA A10G"); None without a driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev = ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(dev), device) != 0:
        return None
    if lib.cuDeviceGetName(name, len(name), dev) != 0:
        return None
    return name.value.decode(errors="replace")


def environment_problems(triton_tag: str = TRITON_TAG) -> list[str]:
    """What this machine lacks to build and run engines; empty when it can."""
    problems = []
    try:
        import_tensorrt(triton_tag)
    except TensorRTUnavailable as exc:
        problems.append(str(exc))
    if cuda_device_count() == 0:
        problems.append("no CUDA GPU found (libcuda.so.1 missing or no device)")
    return problems


def manifest_tokenizer(repository: str | os.PathLike, manifest: "Manifest") -> Path | None:
    """The tokenizer.json that export/repository.py copies into the repository (the
    manifest's tokenizer, relative to the repository), if it is there."""
    name = manifest.tokenizer
    if name:
        path = Path(repository) / name
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.is_file():
            return path
    return None


def parity_problems(tokenizer_path: str | os.PathLike | None = None) -> list[str]:
    """Python packages the parity check needs (onnxruntime, the glipv2 pipeline's
    tokenizers/pillow) and the tokenizer file (tokenizer_path, else glipv2's default)."""
    missing = []
    for module in ("numpy", "onnxruntime", "tokenizers", "PIL"):
        try:
            __import__(module)
        except ImportError:
            missing.append("pillow" if module == "PIL" else module)
    if missing:
        return [f"the parity check needs {', '.join(missing)} (pip install {' '.join(missing)}; or pass --no-verify)"]
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        return []
    try:
        from glipv2.text import default_tokenizer_path

        default_tokenizer_path()
    except FileNotFoundError as exc:
        return [f"the parity check needs the BERT tokenizer: {exc}"]
    return []


# ----------------------------------------------------------------------------------
# Build (GPU + tensorrt 10.x)


@dataclass
class BuildReport:
    onnx_path: Path
    plan_path: Path
    seconds: float  # parse + build, without writing files
    plan_bytes: int
    precision: str  # "fp16" or "fp32" (what the builder was allowed to use)
    tensorrt_version: str
    shapes: ProfileShapes
    timing_cache: Path | None = None
    timing_cache_loaded: bool = False  # an earlier cache was accepted by the builder
    notes: list[str] = field(default_factory=list)


def _atomic_write(path: Path, data) -> None:
    """Write bytes (or any buffer, e.g. tensorrt.IHostMemory) to path via temp + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the Triton container may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_logger(trt):
    class _Logger(trt.ILogger):
        """Prints warnings and errors, keeps errors for the exception message."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            if level <= int(trt.ILogger.Severity.WARNING):
                print(f"[tensorrt] {msg}", file=sys.stderr)

    return _Logger()


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    shapes: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
    fp16: bool = True,
    workspace_gib: float = 4,
    timing_cache: str | os.PathLike | None = None,
    triton_tag: str | None = TRITON_TAG,
) -> BuildReport:
    """ONNX file -> serialized TensorRT engine at plan_path (GPU only, tensorrt 10.x).

    One optimization profile from `shapes` ({input: (min, opt, max)}, batch axis
    included; every network input must be given). fp16 sets BuilderFlag.FP16 when the
    GPU has fast fp16. The timing cache is loaded from `timing_cache` when that file
    exists (a cache from another GPU/TensorRT is dropped, not fatal) and saved back.
    triton_tag: the Triton release that will serve the plan; its TensorRT is required.
    """
    trt = import_tensorrt(triton_tag)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    if not workspace_gib > 0:
        raise ValueError(f"workspace_gib must be > 0, got {workspace_gib!r}")
    notes: list[str] = []
    logger = _make_logger(trt)

    start = time.perf_counter()
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTUnavailable("trt.Builder could not be created (no usable CUDA GPU?)")
    network = builder.create_network(0)  # 10.x: always explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from file: external weights resolve next to it
        raise OnnxParseError(onnx_path, [str(parser.get_error(i)) for i in range(parser.num_errors)])

    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if set(inputs) != set(shapes):
        raise ValueError(f"{onnx_path}: network inputs {sorted(inputs)} but profile shapes for {sorted(shapes)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    precision = "fp32"
    if fp16:
        if getattr(builder, "platform_has_fast_fp16", True):
            config.set_flag(trt.BuilderFlag.FP16)  # 10.x only (deprecated since 10.12, removed in 11)
            precision = "fp16"
        else:
            notes.append("fp16 requested but this GPU has no fast fp16: built in fp32")

    profile = builder.create_optimization_profile()
    for name in inputs:
        lo, opt, hi = (tuple(int(d) for d in s) for s in shapes[name])
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"invalid optimization profile for {onnx_path}: {dict(shapes)}; {logger.errors}")

    cache_path = Path(timing_cache) if timing_cache else None
    cache_loaded = False
    cache = None
    if cache_path is not None and cache_path.is_file():
        try:
            cache = config.create_timing_cache(cache_path.read_bytes())
            cache_loaded = cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))
        except Exception:  # a corrupt file: same as a mismatch
            cache_loaded = False
        if not cache_loaded:
            notes.append(f"timing cache {cache_path} does not fit this GPU/TensorRT: starting a new one")
            cache = None
    if cache is None:
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        detail = "; ".join(logger.errors) or "see the [tensorrt] messages above"
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}: {detail}")

    _atomic_write(plan_path, plan)
    if cache_path is not None:
        _atomic_write(cache_path, config.get_timing_cache().serialize())
    return BuildReport(
        onnx_path=onnx_path, plan_path=plan_path, seconds=seconds, plan_bytes=plan_path.stat().st_size,
        precision=precision, tensorrt_version=trt.__version__,
        shapes={k: tuple(tuple(int(d) for d in s) for s in v) for k, v in shapes.items()},
        timing_cache=cache_path, timing_cache_loaded=cache_loaded, notes=notes,
    )


# ----------------------------------------------------------------------------------
# Runner (GPU only): a TensorRT engine as the Engine of glipv2.runtime.batch.
# Device memory through the CUDA driver API (libcuda.so.1, which every GPU host and
# `docker run --gpus all` provides) with ctypes: no torch or cuda-python needed in the
# TensorRT container. The primary context is the one TensorRT's runtime API uses.


class _Cuda:
    def __init__(self, device: int = 0) -> None:
        c = ctypes
        lib = c.CDLL("libcuda.so.1")
        u64, vp, sz = c.c_uint64, c.c_void_p, c.c_size_t
        signatures = {
            "cuInit": [c.c_uint],
            "cuDeviceGet": [c.POINTER(c.c_int), c.c_int],
            "cuDevicePrimaryCtxRetain": [c.POINTER(vp), c.c_int],
            "cuDevicePrimaryCtxRelease_v2": [c.c_int],
            "cuCtxSetCurrent": [vp],
            "cuMemAlloc_v2": [c.POINTER(u64), sz],
            "cuMemFree_v2": [u64],
            "cuMemcpyHtoD_v2": [u64, vp, sz],
            "cuMemcpyDtoH_v2": [vp, u64, sz],
            "cuStreamCreate": [c.POINTER(vp), c.c_uint],
            "cuStreamSynchronize": [vp],
            "cuStreamDestroy_v2": [vp],
            "cuGetErrorString": [c.c_int, c.POINTER(c.c_char_p)],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, c.c_int
        self.lib = lib
        self._check(lib.cuInit(0), "cuInit")
        dev = c.c_int()
        self._check(lib.cuDeviceGet(c.byref(dev), device), "cuDeviceGet")
        self.device = dev.value
        ctx = vp()
        self._check(lib.cuDevicePrimaryCtxRetain(c.byref(ctx), self.device), "cuDevicePrimaryCtxRetain")
        self.ctx = ctx
        self.make_current()
        stream = vp()
        self._check(lib.cuStreamCreate(c.byref(stream), 0), "cuStreamCreate")
        self.stream = stream

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")

    def make_current(self) -> None:
        self._check(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), max(int(nbytes), 1)), "cuMemAlloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self._check(self.lib.cuMemFree_v2(ptr), "cuMemFree")

    def to_device(self, ptr: int, array) -> None:
        if array.nbytes:
            self._check(self.lib.cuMemcpyHtoD_v2(ptr, array.ctypes.data, array.nbytes), "cuMemcpyHtoD")

    def to_host(self, array, ptr: int) -> None:
        if array.nbytes:
            self._check(self.lib.cuMemcpyDtoH_v2(array.ctypes.data, ptr, array.nbytes), "cuMemcpyDtoH")

    @property
    def stream_handle(self) -> int:
        return int(self.stream.value or 0)

    def synchronize(self) -> None:
        self._check(self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def close(self) -> None:
        if self.stream is not None:
            self.lib.cuStreamDestroy_v2(self.stream)
            self.stream = None
            self.lib.cuDevicePrimaryCtxRelease_v2(self.device)


class TrtModel:
    """One deserialized engine: run(**inputs as numpy) -> {output name: numpy}. GPU only."""

    def __init__(self, plan_path: str | os.PathLike, cuda: _Cuda) -> None:
        import numpy as np

        trt = import_tensorrt(None)
        self.cuda = cuda
        cuda.make_current()
        self.logger = _make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {plan_path} (built by another TensorRT version or GPU?): "
                               + "; ".join(self.logger.errors))
        self.context = self.engine.create_execution_context()
        numpy_types = {
            trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT32: np.int32,
            trt.DataType.INT64: np.int64, trt.DataType.INT8: np.int8, trt.DataType.UINT8: np.uint8,
            trt.DataType.BOOL: np.bool_,
        }
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(numpy_types[self.engine.get_tensor_dtype(n)]) for n in names}

    def run(self, **feeds: "np.ndarray") -> dict[str, "np.ndarray"]:
        import numpy as np

        if set(feeds) != set(self.inputs):
            raise ValueError(f"engine inputs are {self.inputs}, got {sorted(feeds)}")
        self.cuda.make_current()
        buffers: list[int] = []
        try:
            for name in self.inputs:
                host = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
                if not self.context.set_input_shape(name, tuple(host.shape)):
                    raise ValueError(f"input {name} shape {host.shape} is outside the engine's profile")
                ptr = self.cuda.alloc(host.nbytes)
                buffers.append(ptr)
                self.cuda.to_device(ptr, host)
                self.context.set_tensor_address(name, ptr)
            results = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"output {name} has an unresolved shape {shape}")
                results[name] = np.empty(shape, dtype=self.dtypes[name])
                ptr = self.cuda.alloc(results[name].nbytes)
                buffers.append(ptr)
                self.context.set_tensor_address(name, ptr)
            if not self.context.execute_async_v3(self.cuda.stream_handle):
                raise RuntimeError("TensorRT execute_async_v3 failed: " + "; ".join(self.logger.errors))
            self.cuda.synchronize()
            for name, ptr in zip(self.outputs, buffers[len(self.inputs):]):
                self.cuda.to_host(results[name], ptr)
            return results
        finally:
            for ptr in buffers:
                self.cuda.free(ptr)


class TrtEngine:
    """text_encoder.plan then detector.plan: the Engine of glipv2.runtime.batch; with the vqa
    plan also the VqaEngine (answer), with the caption plans a CaptionEngine (captioner).
    GPU only."""

    def __init__(self, text_plan: str | os.PathLike, detector_plan: str | os.PathLike, device: int = 0,
                 vqa_plan: str | os.PathLike | None = None,
                 caption_plans: tuple[str | os.PathLike, str | os.PathLike] | None = None) -> None:
        self.cuda = _Cuda(device)
        self.text = TrtModel(text_plan, self.cuda)
        self.detector = TrtModel(detector_plan, self.cuda)
        self.vqa_model = TrtModel(vqa_plan, self.cuda) if vqa_plan else None
        self.captioner = _TrtCaptioner(*(TrtModel(p, self.cuda) for p in caption_plans)) if caption_plans else None

    def encode_text(self, input_ids, attention_mask):
        return self.text.run(input_ids=input_ids, attention_mask=attention_mask)["token_features"]

    def detect(self, images, features, attention_mask):
        out = self.detector.run(images=images, token_features=features, attention_mask=attention_mask)
        return out["boxes"], out["logits"], out["centerness"]

    def __call__(self, images, input_ids, attention_mask):
        return self.detect(images, self.encode_text(input_ids, attention_mask), attention_mask)

    def answer(self, images, input_ids, attention_mask):
        """Question ids -> answer logits (glipv2.understanding's VqaEngine)."""
        features = self.encode_text(input_ids, attention_mask)
        return self.vqa_model.run(images=images, token_features=features,
                                  attention_mask=attention_mask)["answer_logits"]

    def close(self) -> None:
        # engines and contexts go before the CUDA context
        self.text = self.detector = self.vqa_model = self.captioner = None
        self.cuda.close()


class _TrtCaptioner:
    """caption_start.plan / caption_step.plan as glipv2.captioning's CaptionEngine."""

    def __init__(self, start: TrtModel, step: TrtModel) -> None:
        self.start_model, self.step_model = start, step

    def start(self, images):
        out = self.start_model.run(images=images)
        return tuple(out[k] for k in ("logprobs", "present_k", "present_v", "cross_k", "cross_v"))

    def step(self, tokens, past_k, past_v, cross_k, cross_v):
        import numpy as np

        out = self.step_model.run(tokens=np.asarray(tokens, dtype=np.int64).reshape(-1, 1), past_k=past_k,
                                  past_v=past_v, cross_k=cross_k, cross_v=cross_v)
        return tuple(out[k] for k in ("logprobs", "present_k", "present_v"))


# ----------------------------------------------------------------------------------
# Parity (numpy): same detections after postprocessing


@dataclass
class DetectionDiff:
    matched: int
    missing: int  # confident reference detections the candidate lacks
    extra: int  # confident candidate detections the reference lacks
    max_score_diff: float
    min_iou: float

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.extra == 0


def compare_detections(
    ref: "Detections", got: "Detections", *, min_score: float = 0.2, score_atol: float = 0.03, min_iou: float = 0.85
) -> DetectionDiff:
    """Do two detection lists agree within fp16 noise?

    Detections scoring >= min_score + score_atol on either side must have a partner on
    the other side: same phrase, |score difference| <= score_atol, IoU >= min_iou.
    Detections near min_score may appear on one side only; weaker ones are ignored
    (their ranking through NMS and the detection cap is not stable under fp16).
    """
    import numpy as np

    from glipv2.boxes import box_iou

    lo, hi = min_score - score_atol, min_score + score_atol
    ri = np.flatnonzero(ref.scores >= lo)
    gi = np.flatnonzero(got.scores >= lo)
    pairs = []
    if len(ri) and len(gi):
        iou = box_iou(ref.boxes[ri], got.boxes[gi])
        ok = (ref.phrase_ids[ri][:, None] == got.phrase_ids[gi][None, :]) \
            & (np.abs(ref.scores[ri][:, None] - got.scores[gi][None, :]) <= score_atol) & (iou >= min_iou)
        for a, b in zip(*np.nonzero(ok)):
            pairs.append((float(iou[a, b]), int(ri[a]), int(gi[b])))
    pairs.sort(reverse=True)
    used_r, used_g, ious, diffs = set(), set(), [], []
    for v, r, g in pairs:  # greedy, best IoU first
        if r in used_r or g in used_g:
            continue
        used_r.add(r)
        used_g.add(g)
        ious.append(v)
        diffs.append(abs(float(ref.scores[r] - got.scores[g])))
    missing = sum(1 for r in ri if r not in used_r and ref.scores[r] >= hi)
    extra = sum(1 for g in gi if g not in used_g and got.scores[g] >= hi)
    return DetectionDiff(matched=len(used_r), missing=missing, extra=extra,
                         max_score_diff=max(diffs, default=0.0), min_iou=min(ious, default=1.0))


@dataclass
class ParityReport:
    images: int
    reference_detections: int  # at or above min_score
    candidate_detections: int
    matched: int
    missing: int
    extra: int
    max_score_diff: float
    min_iou: float
    feature_max_abs_diff: float | None = None  # text encoder, on real (unmasked) tokens
    understanding: "UnderstandingParity | None" = None  # vqa / caption plans, when the model has them

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.extra == 0 and (self.understanding is None or self.understanding.ok)

    def summary(self) -> str:
        feat = "" if self.feature_max_abs_diff is None else f", token features max |diff| {self.feature_max_abs_diff:.2e}"
        more = "" if self.understanding is None else f"; {self.understanding.summary()}"
        return (f"{'OK' if self.ok else 'FAILED'}: {self.images} images, detections (score >= min) "
                f"reference {self.reference_detections} / engine {self.candidate_detections}, matched {self.matched}, "
                f"missing {self.missing}, extra {self.extra}, max score diff {self.max_score_diff:.4f}, "
                f"min IoU {self.min_iou:.3f}{feat}{more}")


@dataclass
class UnderstandingParity:
    """Answers and captions of an engine against the reference's (fp16 tolerances)."""

    answers: int = 0
    answer_mismatches: list[str] = field(default_factory=list)
    max_answer_score_diff: float = 0.0
    captions: int = 0
    caption_mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.answer_mismatches and not self.caption_mismatches

    def summary(self) -> str:
        return (f"answers {self.answers} ({len(self.answer_mismatches)} mismatched, max score diff "
                f"{self.max_answer_score_diff:.4f}), captions {self.captions} ({len(self.caption_mismatches)} "
                "mismatched)" + "".join(f"\n    {m}" for m in (self.answer_mismatches + self.caption_mismatches)[:8]))


QUESTIONS = ("what color is the star?", "how many circles are there?", "is there a red square?",
             "what shape is left of the blue circle?", "what color is the largest object?")


def understanding_parity(
    reference,
    candidate,
    manifest: "Manifest",
    images: Sequence["np.ndarray"],
    *,
    tokenizer=None,
    questions: Sequence[str] = QUESTIONS,
    beam_sizes: Sequence[int] = (1, 3),
    score_atol: float = 0.03,
) -> UnderstandingParity:
    """The same questions and captions through two engines (glipv2.understanding's VqaEngine
    `answer` and a CaptionEngine `captioner`), compared after decoding.

    An answer matches when the top answer is the same and its score is within score_atol,
    or, where the reference's top two answers are within score_atol of each other (a tie
    under fp16), when the candidate's answer is one of those two. Captions must be the
    same text (greedy and beam search)."""
    from glipv2.runtime.batch import IdsEngine
    from glipv2.runtime.pipeline import VqaPipeline
    from glipv2.understanding import CaptionPipeline

    report = UnderstandingParity()
    hw = manifest.image_hw
    answers = list(manifest.answer_vocabulary or ())
    if answers and getattr(candidate, "answer", None) is not None:
        pipes = [VqaPipeline(IdsEngine(answer=e.answer), hw, answers, tokenizer) for e in (reference, candidate)]
        for q in questions:
            ref, got = (p.answer(list(images), [q] * len(images), top_k=2) for p in pipes)
            for i, (a, b) in enumerate(zip(ref, got)):
                report.answers += 1
                tie = len(a.top) > 1 and a.top[0][1] - a.top[1][1] <= score_atol
                allowed = {t[0] for t in a.top[:2]} if tie else {a.answer}
                diff = abs(a.score - b.score) if a.answer == b.answer else float("inf")
                if a.answer == b.answer:
                    report.max_answer_score_diff = max(report.max_answer_score_diff, diff)
                if b.answer not in allowed or (a.answer == b.answer and diff > score_atol):
                    report.answer_mismatches.append(f"image {i}, {q!r}: {a.answer} ({a.score:.4f}) vs "
                                                    f"{b.answer} ({b.score:.4f})")
    caption = manifest.caption
    if caption and getattr(candidate, "captioner", None) is not None:
        pipes = [CaptionPipeline(e.captioner, hw, caption.tokens, caption.max_positions, caption.end_id, tokenizer,
                                 caption.words)
                 for e in (reference, candidate)]
        for beam in beam_sizes:
            ref, got = (p.caption(list(images), beam) for p in pipes)
            for i, (a, b) in enumerate(zip(ref, got)):
                report.captions += 1
                if a.text != b.text:
                    report.caption_mismatches.append(f"image {i}, beam {beam}: {a.text!r} vs {b.text!r}")
    return report


def sample_inputs(n: int = 4, seed: int = 0) -> tuple[list["np.ndarray"], list]:
    """n shapes-world images (uint8 HxWx3) with detection prompts of different lengths."""
    import numpy as np

    from glipv2.text import build_prompt
    from training import shapes_world as sw

    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for _ in range(n):
        scene = sw.sample_scene(rng)
        images.append(sw.render(scene, rng))
        prompts.append(build_prompt(sw.detection_phrases(scene, rng) or list(sw.SHAPES)))
    return images, prompts


def parity(
    reference,
    candidate,
    image_hw: Sequence[int],
    images: Sequence["np.ndarray"],
    prompts: Sequence,
    *,
    batch_size: int = 4,
    tokenizer=None,
    min_score: float = 0.2,
    score_atol: float = 0.03,
    min_iou: float = 0.85,
) -> ParityReport:
    """Run the same images and prompts through two Engines (glipv2.runtime.batch: the gateway's batch assembly) and compare
    the detections; also the token features when both engines have encode_text."""
    import numpy as np

    from glipv2.runtime.pipeline import DetectionPipeline
    from glipv2.text import Tokenizer, pad_batch, tokenize

    tokenizer = tokenizer or Tokenizer()
    ref_pipe = DetectionPipeline(reference, tuple(image_hw), tokenizer)
    cand_pipe = DetectionPipeline(candidate, tuple(image_hw), tokenizer)
    report = ParityReport(images=len(images), reference_detections=0, candidate_detections=0, matched=0,
                          missing=0, extra=0, max_score_diff=0.0, min_iou=1.0)
    feature_diffs = []
    for start in range(0, len(images), batch_size):
        ims, prs = list(images[start:start + batch_size]), list(prompts[start:start + batch_size])
        for a, b in zip(ref_pipe.predict(ims, prs), cand_pipe.predict(ims, prs)):
            d = compare_detections(a, b, min_score=min_score, score_atol=score_atol, min_iou=min_iou)
            report.reference_detections += int((a.scores >= min_score).sum())
            report.candidate_detections += int((b.scores >= min_score).sum())
            report.matched += d.matched
            report.missing += d.missing
            report.extra += d.extra
            report.max_score_diff = max(report.max_score_diff, d.max_score_diff)
            report.min_iou = min(report.min_iou, d.min_iou)
        if hasattr(reference, "encode_text") and hasattr(candidate, "encode_text"):
            tb = pad_batch([tokenize(tokenizer, p) for p in prs], ref_pipe.buckets, pad_id=tokenizer.pad_id)
            fa = np.asarray(reference.encode_text(tb.input_ids, tb.attention_mask), np.float32)
            fb = np.asarray(candidate.encode_text(tb.input_ids, tb.attention_mask), np.float32)
            real = tb.attention_mask.astype(bool)
            feature_diffs.append(float(np.abs(fa[real] - fb[real]).max()))
    if feature_diffs:
        report.feature_max_abs_diff = max(feature_diffs)
    return report


def _reference_engine(onnx_dir: str | os.PathLike):
    """ONNX Runtime over the same ONNX files: the reference the engines must match."""
    from glipv2.runtime.onnx import OrtEngine

    return OrtEngine(onnx_dir)


def verify_engine(
    plan: str | os.PathLike | Mapping[str, str | os.PathLike],
    onnx_dir: str | os.PathLike,
    manifest: "Manifest | None" = None,
    *,
    num_images: int = 4,
    seed: int = 0,
    tokenizer=None,
    min_score: float = 0.2,
    score_atol: float = 0.03,
    min_iou: float = 0.85,
) -> ParityReport:
    """GPU only. TensorRT engines vs ONNX Runtime: same detections after postprocessing
    on `num_images` shapes-world images (batched up to max_batch_size, prompts of
    different lengths), and the text encoder's features.

    plan: a repository folder (`<plan>/<model>/1/model.plan`) or {model: plan path} for
    text_encoder and detector. onnx_dir: a repository folder or an export folder.
    manifest: image size and max batch; default `<plan>/manifest.json`.
    tokenizer: a glipv2.text.Tokenizer; default the repository's tokenizer.json (the
    manifest's "tokenizer"), else glipv2's default.
    """
    if isinstance(plan, Mapping):
        plans = {m: Path(plan[m]) for m in MODELS_DETECTION}
    else:
        plans = {m: model_file(plan, m, "plan") for m in MODELS_DETECTION}
    if manifest is None:
        if isinstance(plan, Mapping):
            raise ValueError("verify_engine needs the manifest when plan is a mapping")
        manifest = load_manifest(plan)
    if tokenizer is None:
        from glipv2.text import Tokenizer

        path = None if isinstance(plan, Mapping) else manifest_tokenizer(plan, manifest)
        path = path or manifest_tokenizer(onnx_dir, manifest)
        tokenizer = Tokenizer(path, max_tokens=manifest.max_tokens)
    reference = _reference_engine(onnx_dir)
    images, prompts = sample_inputs(num_images, seed)
    extra = {}
    if not isinstance(plan, Mapping):  # the vqa and caption plans, when the model has those heads
        vqa_plan = model_file(plan, VQA, "plan")
        start_plan, step_plan = model_file(plan, CAPTION_START, "plan"), model_file(plan, CAPTION_STEP, "plan")
        extra = {"vqa_plan": vqa_plan if vqa_plan.is_file() else None,
                 "caption_plans": (start_plan, step_plan) if start_plan.is_file() and step_plan.is_file() else None}
    candidate = TrtEngine(plans["text_encoder"], plans["detector"], **extra)
    try:
        report = parity(reference, candidate, manifest.image_hw, images, prompts,
                        batch_size=manifest.max_batch_size, tokenizer=tokenizer,
                        min_score=min_score, score_atol=score_atol, min_iou=min_iou)
        if candidate.vqa_model is not None or candidate.captioner is not None:
            report.understanding = understanding_parity(
                reference, _Parts(candidate), manifest, images, tokenizer=tokenizer, score_atol=score_atol)
        return report
    finally:
        candidate.close()


class _Parts:
    """A TrtEngine seen only through the heads it has plans for (answer / captioner or None)."""

    def __init__(self, engine: TrtEngine) -> None:
        self.answer = engine.answer if engine.vqa_model is not None else None
        self.captioner = engine.captioner


# ----------------------------------------------------------------------------------
# CLI


def engine_record(manifest: "Manifest", tensorrt_version: str, gpu: str, precision: str,
                  triton_tag: str) -> dict[str, Any]:
    """What the plans of a repository were built from and for: the manifest's engines
    entry. Plans are current while this equals what a build now would record."""
    import hashlib

    layout = manifest.to_dict()  # hashed as manifest.json writes it
    shapes = {k: layout[k] for k in ("models", "token_buckets", "max_tokens", "image", "max_batch_size")}
    return {
        "tensorrt_version": str(tensorrt_version),
        "triton_tag": triton_tag,
        "gpu": gpu,
        "precision": precision,
        "checkpoint_sha256": manifest.checkpoint.sha256,
        "signatures_sha256": hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest(),
    }


def plans_are_current(repository: str | os.PathLike, manifest: "Manifest", record: Mapping[str, Any]) -> bool:
    """Every model's plan exists and the manifest says it was built by this TensorRT, on
    this GPU model, from this checkpoint and these signatures, at this precision."""
    if manifest.engines != dict(record):
        return False
    return all((Path(repository) / m / "1" / "model.plan").is_file() for m in manifest.models)


def write_engine_record(manifest_path: Path, record: Mapping[str, Any]) -> None:
    """The manifest with its engines entry set to `record`, written back through Manifest."""
    from dataclasses import replace

    manifest = replace(load_manifest(manifest_path), engines=dict(record))
    _atomic_write(Path(manifest_path), manifest.dumps().encode())


def _container_hint(repository: str, verify: bool = True) -> str:
    """The command for the GPU host, run from the project root (mounted at /w)."""
    repo = Path(repository)
    if repo.is_absolute():
        try:
            repo = repo.relative_to(Path.cwd())
        except ValueError:
            pass  # outside the project folder: the user has to mount it
    run = f"python3 -m export.tensorrt --repository {repo}"
    if verify:  # the container has tensorrt but not the parity check's packages
        run = f"sh -c 'pip install -q numpy pillow tokenizers onnxruntime && {run}'"
    return f"docker run --gpus all -v $PWD:/w -w /w {CONTAINER} {run}"


def _fail(code: int, message: str) -> int:
    print(f"export.tensorrt: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m export.tensorrt", description=(
        "Build TensorRT engines (<model>/1/model.plan) from a model repository's ONNX files and check "
        "them against ONNX Runtime. Needs tensorrt 10.x and a CUDA GPU (NVIDIA's TensorRT container)."))
    ap.add_argument("--repository", default="model_repository", help="model repository with manifest.json")
    ap.add_argument("--fp32", action="store_true", help="build fp32 engines (default: fp16)")
    ap.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace memory pool (GiB)")
    ap.add_argument("--timing-cache", default=".cache/trt_timing.cache", help="timing cache file ('' for none)")
    ap.add_argument("--no-verify", action="store_true", help="skip the parity check against ONNX Runtime")
    ap.add_argument("--parity-images", type=int, default=4, help="images for the parity check")
    ap.add_argument("--triton-tag", default=os.environ.get(TRITON_TAG_ENV) or TRITON_TAG,
                    choices=sorted(TENSORRT_FOR_TRITON),
                    help=f"the NGC release of the serving tritonserver image; its TensorRT is required "
                         f"(default ${TRITON_TAG_ENV} or {TRITON_TAG})")
    ap.add_argument("--rebuild", action="store_true",
                    help="build even when the manifest says the plans match this GPU, TensorRT and checkpoint")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    repo = Path(args.repository)
    manifest_path = repo / "manifest.json"
    if not manifest_path.is_file():
        return _fail(EXIT_INPUT, f"manifest not found: {manifest_path} (render the repository first: make export)")
    try:
        manifest = load_manifest(manifest_path)
        models = list(manifest.models)
        jobs = [(m, model_file(repo, m, "onnx"), repo / m / "1" / "model.plan", profile_shapes(manifest, m))
                for m in models]
    except (ValueError, AttributeError) as exc:
        return _fail(EXIT_INPUT, f"invalid manifest {manifest_path}: {exc}")
    for _, onnx_path, _, _ in jobs:
        if not onnx_path.is_file():
            return _fail(EXIT_INPUT, f"ONNX file not found: {onnx_path} (run make export first)")

    verify = not args.no_verify and all(m in models for m in MODELS_DETECTION)
    tokenizer_path = manifest_tokenizer(repo, manifest)
    problems = environment_problems(args.triton_tag)
    if problems:
        return _fail(EXIT_ENVIRONMENT, "cannot build TensorRT engines here: " + "; ".join(problems)
                     + ". Run it on the GPU host in NVIDIA's TensorRT container (README: TensorRT engines): "
                     + _container_hint(args.repository, verify))
    problems = parity_problems(tokenizer_path) if verify else []
    if problems:
        return _fail(EXIT_ENVIRONMENT, "; ".join(problems))

    if manifest.flavour != "gpu":
        print(f"note: {manifest_path} is the {manifest.flavour!r} flavour; Triton serves model.plan only "
              "from the 'gpu' flavour's tensorrt_plan configs")
    cache = args.timing_cache or None
    trt_version = str(import_tensorrt(args.triton_tag).__version__)
    gpu = cuda_device_name() or "unknown GPU"
    record = engine_record(manifest, trt_version, gpu, "fp32" if args.fp32 else "fp16", args.triton_tag)
    if not args.rebuild and plans_are_current(repo, manifest, record):
        print(f"plans are current (TensorRT {trt_version}, {gpu}, checkpoint "
              f"{str(record['checkpoint_sha256'])[:12]}): nothing to build (--rebuild to force)")
    else:
        for model, onnx_path, plan_path, shapes in jobs:
            try:
                r = build_engine(onnx_path, plan_path, shapes, fp16=not args.fp32, workspace_gib=args.workspace_gib,
                                 timing_cache=cache, triton_tag=args.triton_tag)
            except (OnnxParseError, EngineBuildError) as exc:
                return _fail(EXIT_FAILED, f"{model}: {exc}")
            except TensorRTUnavailable as exc:
                return _fail(EXIT_ENVIRONMENT, f"{model}: {exc}")
            profile = ", ".join(f"{k} {list(v[0])}..{list(v[2])}" for k, v in r.shapes.items())
            print(f"{model}: {r.plan_path} {r.precision} {r.plan_bytes / 2**20:.1f} MiB built in {r.seconds:.1f} s "
                  f"(TensorRT {r.tensorrt_version}; timing cache {'reused' if r.timing_cache_loaded else 'new'}; "
                  f"profile {profile})")
            for note in r.notes:
                print(f"  note: {note}")
        # recorded after every plan is written: an interrupted build is never taken as current
        write_engine_record(manifest_path, record)
        print(f"recorded in {manifest_path}: TensorRT {trt_version} (Triton {args.triton_tag}), {gpu}")
    if not verify:
        print("parity check skipped" + (" (--no-verify)" if args.no_verify else
                                         f" (needs both {' and '.join(MODELS_DETECTION)})"))
        return EXIT_OK
    from glipv2.text import Tokenizer

    tokenizer = Tokenizer(tokenizer_path, max_tokens=manifest.max_tokens)
    report = verify_engine(repo, repo, manifest, num_images=args.parity_images, tokenizer=tokenizer)
    print(f"parity vs ONNX Runtime: {report.summary()}")
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
