"""Render a Triton model repository from a checkpoint.

    model_repository/
      manifest.json            what the gateway reads: checkpoint hash, preset, tokenizer,
                               input size, token buckets, top-K, tensor signatures, ...
      tokenizer.json           the BERT-uncased WordPiece tokenizer the prompts are cut with
      text_encoder/config.pbtxt
      text_encoder/1/model.onnx     (+ model.py for the cpu flavour, model.plan for gpu)
      detector/config.pbtxt
      detector/1/model.onnx         (idem)
      vqa/, caption_start/, caption_step/   the same, for a model with those heads
      caption/config.pbtxt          the caption decode loop inside Triton (every flavour):
      caption/1/model.py            export/triton_python/caption.py, calling caption_start /
      caption/1/glipv2_captioning.py  caption_step in-process (BLS) with glipv2/captioning.py's
                                    beam search (copied as is: the Triton image has no glipv2)
      caption/1/glipv2_phrases.py   glipv2/phrases.py as is: the decode rules' text tests

One template (export/templates/config.pbtxt) serves every flavour:

- ``cpu``: the python backend; ``export/triton_python/model.py`` runs the ONNX file with
  ONNX Runtime. Token inputs allow ragged batches (model.py pads them), so requests with
  different prompt lengths share a batch. This is what the real-tritonserver test serves.
- ``gpu-onnx``: the onnxruntime backend with the TensorRT execution accelerator at fp16.
- ``gpu``: ``tensorrt_plan``; ``model.plan`` is built next to ``model.onnx`` by
  ``python -m export.tensorrt`` on a GPU host. The configs are rendered here regardless.

The ``caption`` loop model is a python-backend model in every flavour (KIND_CPU: the loop
is numpy). In the cpu flavour it runs the two graphs' ONNX files with ONNX Runtime in its
own process; in the GPU flavours it calls the caption_start / caption_step engines through
BLS (see export/triton_python/caption.py for why and the figures). Since it forms the
decoding batches itself, caption_start / caption_step are rendered with no queue delay:
its step requests arrive one at a time and must not wait for company.

GPU flavours need dense batches: the gateway pads prompts to ``token_buckets`` so that
requests land on a few shapes the dynamic batcher can merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from export import graphs, onnx_export, trt_ops
from glipv2.config import ModelConfig
from glipv2.image import pad_value_for
from glipv2.postprocess import SERVING_SCORE_THRESHOLD, PostprocessConfig
from glipv2.runtime.graphs import CAPTION, CAPTION_START, CAPTION_STEP, caption_loop_spec, inputs_of, opt_batch, outputs_of
from glipv2.runtime.manifest import (FORMAT, MANIFEST_FILE, CaptionSpec, CheckpointInfo, DynamicAxis, GraphEntry,
                                     ImageLayout, Manifest, Normalisation, TensorSpec)
from glipv2.text import DEFAULT_BUCKETS, MAX_TOKENS, Tokenizer, default_tokenizer_path
from glipv2.understanding import caption_pieces

__all__ = [
    "FORMAT",
    "FLAVOURS",
    "MODELS",
    "RepositoryError",
    "SettingsError",
    "model_signatures",
    "default_preferred_batch_sizes",
    "render_config",
    "build_manifest",
    "manifest_of",
    "write_configs",
    "render_repository",
    "default_repository",
]

FLAVOURS = ("cpu", "gpu", "gpu-onnx")
MODELS = (graphs.TEXT_ENCODER, graphs.DETECTOR)  # every repository has these; VQA / caption graphs when the model has the heads
VERSION = "1"
MANIFEST = MANIFEST_FILE
TOKENIZER = "tokenizer.json"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
# The digest of the checkpoint the (ignored) ONNX files were exported from, and of the code
# that traced them. manifest.json is in git, so after a pull that brings a new checkpoint and
# its manifest the manifest matches while the ONNX files on disk are still the old model's;
# and a change to the model's code can change the graphs with the same checkpoint. Only this
# file tells.
EXPORTED_FROM = "exported-from.sha256"

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
TEMPLATE = HERE / "templates" / "config.pbtxt"
PYTHON_MODEL = HERE / "triton_python" / "model.py"
CAPTION_MODEL = HERE / "triton_python" / "caption.py"
PB_TENSORS = HERE / "triton_python" / "pb_tensors.py"
CAPTIONING = PROJECT_ROOT / "glipv2" / "captioning.py"
PHRASES = PROJECT_ROOT / "glipv2" / "phrases.py"  # the caption rules' text tests (stdlib only)

# The sources the exported graphs are traced from (folders: their *.py files).
GRAPH_SOURCES = ("glipv2/modeling", "glipv2/config.py", "glipv2/boxes.py", "glipv2/runtime/graphs.py",
                 "export/graphs.py", "export/onnx_export.py")

# Hand-written files of a repository folder that re-rendering keeps (README, .gitignore).
KEPT_FILES = ("README.md", ".gitignore")
# What export.tensorrt writes into the manifest about the plans it built (TensorRT version,
# GPU, checkpoint): re-rendering keeps it with the plans, so the builder can tell whether
# they still fit (a new checkpoint or model table makes them stale).
ENGINES_KEY = "engines"  # glipv2.runtime.manifest.Manifest.engines
GITIGNORE = ("# Generated by `make export`; configs and manifest.json are in git.\n*.onnx\n*.plan\ntokenizer.json\n"
             "# copies of export/triton_python/model.py (Triton wants one per model version)\n*/1/model.py\n"
             "# and of the files the python models import (pb_tensors.py, glipv2_captioning.py)\n*/1/*.py\n"
             "# the checkpoint the ONNX files were exported from (not the committed manifest's)\n"
             f"{EXPORTED_FROM}\n")

# Serving defaults (all overridable through render_config / render_repository arguments).
MAX_QUEUE_DELAY_US = 2000
MAX_QUEUE_SIZE = 128
QUEUE_TIMEOUT_US = 0  # 0 = requests wait in the queue until served; clients may set their own
INSTANCE_COUNT = 1
TRT_WORKSPACE_BYTES = 4 << 30
# gpu-onnx: where ONNX Runtime's TensorRT provider keeps its engines. One level below the
# root on purpose: the provider creates only the last level of the path, so a nested folder
# under /tmp fails to load every model in a fresh container. compose.yaml mounts a named
# volume here, so engines survive a restart; each model's engines carry its name as prefix.
TRT_CACHE_DIR = "/ort_trt_cache"


class RepositoryError(ValueError):
    """A repository that cannot be rendered; the message says why."""


class SettingsError(RepositoryError):
    """An invalid flavour, batch size, queue setting or top-K (caught before any export)."""


@dataclass(frozen=True)
class BatchingSettings:
    """How Triton queues, batches and places a model; the same for both models."""

    preferred_batch_sizes: list[int] | None = None  # None: half the max and the max
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US
    max_queue_size: int = MAX_QUEUE_SIZE
    queue_timeout_us: int = QUEUE_TIMEOUT_US
    instance_count: int = INSTANCE_COUNT
    cpu_threads: int = 0  # ONNX Runtime threads per instance (cpu flavour; 0 = its default)
    trt_workspace_bytes: int = TRT_WORKSPACE_BYTES
    trt_cache_dir: str = TRT_CACHE_DIR


# --------------------------------------------------------------------------- signatures


def repository_models(model_cfg: ModelConfig, top_k: int) -> dict[str, graphs.GraphSpec]:
    """Every Triton model of the repository: the graphs, then the caption loop model when
    the model has a caption decoder."""
    specs = dict(graphs.graph_specs(model_cfg, top_k))
    loop = caption_loop_spec(model_cfg)
    if loop is not None:
        specs[CAPTION] = loop
    return specs


def python_files(name: str, flavour: str) -> dict[str, Path]:
    """{file name in <model>/1/: source} of a model's python-backend files (none for a
    graph served by a GPU flavour's own backend)."""
    if name == CAPTION:
        return {"model.py": CAPTION_MODEL, "pb_tensors.py": PB_TENSORS, "glipv2_captioning.py": CAPTIONING,
                "glipv2_phrases.py": PHRASES}
    return {"model.py": PYTHON_MODEL, "pb_tensors.py": PB_TENSORS} if flavour == "cpu" else {}


Signature = graphs.Signature


def model_signatures(model_cfg: ModelConfig, top_k: int) -> dict[str, dict[str, Signature]]:
    """{model: {"inputs": {name: (triton dtype, dims)}, "outputs": {...}}}, dims without the
    batch axis, -1 for the dynamic axis. From export/graphs.py, the names' single source."""
    return {name: {"inputs": spec.inputs, "outputs": spec.outputs}
            for name, spec in graphs.graph_specs(model_cfg, top_k).items()}


# --------------------------------------------------------------------------- config.pbtxt


def default_preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Half the maximum and the maximum: the batcher waits (up to the queue delay) for a
    full batch but also cuts at half, which keeps latency down under moderate load."""
    return sorted({max(1, max_batch_size // 2), max_batch_size})


def _preferred(preferred_batch_sizes: list[int] | None, max_batch_size: int) -> list[int]:
    if preferred_batch_sizes:
        return sorted(set(preferred_batch_sizes))
    return default_preferred_batch_sizes(max_batch_size if isinstance(max_batch_size, int) else 1)


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor_block(name: str, dtype: str, dims: list[int], extra: str = "") -> str:
    lines = [
        "  {",
        f'    name: "{name}"',
        f"    data_type: {dtype}",
        f"    dims: {_dims(dims)}",
    ]
    if extra:
        lines.append(f"    {extra}")
    lines.append("  }")
    return "\n".join(lines)


def _quoted(value: str) -> str:
    """A protobuf text-format string body: backslashes and quotes escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _parameters(params: Mapping[str, str], indent: str = "") -> str:
    return "\n".join(
        f'{indent}parameters {{ key: "{k}" value: {{ string_value: "{_quoted(v)}" }} }}' for k, v in params.items()
    )


def _profile_shapes(inputs: Signature, batch: int, tokens: int) -> str:
    """"name:BxD1xD2,..." for the onnxruntime TensorRT accelerator: -1 (dynamic axis) -> tokens."""
    return ",".join(
        f"{name}:" + "x".join(str(d) for d in [batch] + [tokens if d == -1 else d for d in dims])
        for name, (_, dims) in inputs.items()
    )


def _check_settings(flavour: str, top_k: int, max_batch_size: int, settings: BatchingSettings) -> None:
    if flavour not in FLAVOURS:
        raise SettingsError(f"unknown flavour {flavour!r}; choose one of {list(FLAVOURS)}")

    def positive(name: str, v: Any, minimum: int = 1) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise SettingsError(f"{name} must be an integer >= {minimum}, got {v!r}")

    positive("top_k", top_k)
    positive("max_batch_size", max_batch_size)
    positive("instance_count", settings.instance_count)
    for name in ("max_queue_delay_us", "max_queue_size", "queue_timeout_us", "cpu_threads"):
        positive(name, getattr(settings, name), 0)
    preferred = _preferred(settings.preferred_batch_sizes, max_batch_size)
    if not preferred or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= max_batch_size
                            for b in preferred):
        raise SettingsError(
            f"preferred_batch_sizes must be integers in 1..max_batch_size ({max_batch_size}), got {preferred!r}")


def render_config(
    name: str,
    flavour: str,
    model_cfg: ModelConfig,
    top_k: int = 100,
    max_batch_size: int = 8,
    settings: BatchingSettings = BatchingSettings(),
) -> str:
    """config.pbtxt text of one model (a graph of export/graphs.py, or the caption loop) for
    one flavour."""
    specs = repository_models(model_cfg, top_k)
    if name not in specs:
        raise SettingsError(f"unknown model {name!r}; this model has {list(specs)}")
    spec = specs[name]
    _check_settings(flavour, top_k, max_batch_size, settings)
    # caption_step carries every beam of every image: its batch limit and preferred sizes
    # both scale with the multiplier ([20, 40] for max batch 8 and 5 beams, not [4, 8])
    preferred = [b * spec.batch_multiplier for b in _preferred(settings.preferred_batch_sizes, max_batch_size)]
    max_batch_size *= spec.batch_multiplier
    anchors = model_cfg.num_anchors
    if top_k > anchors:
        raise SettingsError(f"top_k={top_k} exceeds the {anchors} anchors of a {model_cfg.image_hw} input")
    # python backend pads token axes; engines need dense batches (the gateway pads to buckets)
    ragged = flavour == "cpu" and spec.ragged
    inputs = ",\n".join(
        _tensor_block(n, dt, dims, "allow_ragged_batch: true" if ragged and -1 in dims else
                      "optional: true" if n in spec.optional else "")
        for n, (dt, dims) in spec.inputs.items()
    )
    outputs = ",\n".join(_tensor_block(n, dt, dims) for n, (dt, dims) in spec.outputs.items())
    low, typical, high = spec.dynamic_range
    queue_delay_us = settings.max_queue_delay_us
    if name in (CAPTION_START, CAPTION_STEP) and CAPTION in specs:
        queue_delay_us = 0  # the loop model forms the batches; its steps come one at a time

    if name == CAPTION:  # the decode loop: python in every flavour, the graphs wherever they run
        platform_line = 'backend: "python"'
        kind = "KIND_CPU"
        blocks = _parameters({
            # cpu: the graphs' ONNX files in this model's process (their own models are python
            # too: a BLS call per step would be two process hops); GPU flavours: BLS to the engines
            "graphs": "onnxruntime" if flavour == "cpu" else "triton",
            "intra_op_thread_count": str(settings.cpu_threads),
            "start_model": CAPTION_START, "start_inputs": ",".join(inputs_of(CAPTION_START)),
            "start_outputs": ",".join(outputs_of(CAPTION_START)),
            "step_model": CAPTION_STEP, "step_inputs": ",".join(inputs_of(CAPTION_STEP)),
            "step_outputs": ",".join(outputs_of(CAPTION_STEP)),
            "end_index": str(list(model_cfg.caption_tokens).index(model_cfg.caption_end_id)),
            "max_len": str(model_cfg.caption_max_len - 1),
            # the shortlist's WordPiece strings: the decode rules (glipv2.captioning.MentionRules)
            "pieces": " ".join(caption_pieces(Tokenizer(), model_cfg.caption_tokens)),  # WordPieces hold no spaces
            "words": " ".join(model_cfg.caption_words),  # ModelConfig checks they hold no spaces
            # the phrases a request's `found` input flags, in its order (PhraseCheck)
            "checked_phrases": json.dumps(list(model_cfg.caption_checked_phrases)),
        })
    elif flavour == "cpu":
        platform_line = 'backend: "python"'
        kind = "KIND_CPU"
        blocks = _parameters({"onnx_file": ONNX_FILE, "intra_op_thread_count": str(settings.cpu_threads)})
    elif flavour == "gpu-onnx":
        platform_line = f'platform: "onnxruntime_onnx"\ndefault_model_filename: "{ONNX_FILE}"'
        kind = "KIND_GPU"
        trt = {
            "precision_mode": "FP16",
            "max_workspace_size_bytes": str(settings.trt_workspace_bytes),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": settings.trt_cache_dir,
            "trt_engine_cache_prefix": name,
            # one profile covering batch 1..max and the dynamic axis' whole range (tokens
            # 1..MAX_TOKENS), so the engine is built once instead of again for every new shape;
            # opt batch as in the gpu flavour's plans (export.tensorrt.profile_shapes)
            "trt_profile_min_shapes": _profile_shapes(spec.inputs, 1, low),
            "trt_profile_opt_shapes": _profile_shapes(spec.inputs, opt_batch(max_batch_size), typical),
            "trt_profile_max_shapes": _profile_shapes(spec.inputs, max_batch_size, high),
        }
        params = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in trt.items())
        blocks = (
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator [\n      {\n"
            '        name: "tensorrt"\n' + params + "\n      }\n    ]\n  }\n}"
        )
    else:  # gpu
        platform_line = f'platform: "tensorrt_plan"\ndefault_model_filename: "{PLAN_FILE}"'
        kind = "KIND_GPU"
        blocks = ""

    template = string.Template(TEMPLATE.read_text())
    text = template.substitute(
        flavour=flavour,
        name=name,
        platform_line=platform_line,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        preferred_batch_sizes=", ".join(str(b) for b in preferred),
        max_queue_delay_us=queue_delay_us,
        queue_timeout_us=settings.queue_timeout_us,
        max_queue_size=settings.max_queue_size,
        instance_count=settings.instance_count,
        instance_kind=kind,
        flavour_blocks=blocks,
    )
    return text.rstrip("\n") + "\n"


# --------------------------------------------------------------------------- manifest


def _display_path(path: Path) -> str:
    """Checkpoint path as recorded: relative to the project when inside it (so the
    committed manifest does not depend on where the clone lives), else absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def _protocol_dtype(triton_type: str) -> str:
    """TYPE_FP32 (config.pbtxt) -> FP32 (the v2 protocol name tritonclient sends)."""
    return triton_type.removeprefix("TYPE_")


def manifest_of(
    model_cfg: ModelConfig,
    checkpoint_path: Path,
    ckpt: Mapping[str, Any],
    flavour: str,
    top_k: int,
    max_batch_size: int,
) -> Manifest:
    """The repository's manifest: everything a client needs to talk to the models."""
    from glipv2.checkpoint import file_sha256

    if flavour not in FLAVOURS:
        raise SettingsError(f"unknown flavour {flavour!r}; choose one of {list(FLAVOURS)}")

    def tensors(sig: Signature) -> dict[str, TensorSpec]:
        return {n: TensorSpec(_protocol_dtype(dt), tuple(dims)) for n, (dt, dims) in sig.items()}

    models = {
        name: GraphEntry(tensors(spec.inputs), tensors(spec.outputs), max_batch_size * spec.batch_multiplier,
                         DynamicAxis(spec.dynamic, *spec.dynamic_range) if spec.dynamic else None)
        for name, spec in graphs.graph_specs(model_cfg, top_k).items()
    }
    return Manifest(
        format=FORMAT,
        flavour=flavour,
        checkpoint=CheckpointInfo(_display_path(checkpoint_path), file_sha256(checkpoint_path), ckpt.get("step"),
                                  dict(ckpt.get("metrics") or {})),
        preset=model_cfg.preset,
        model_config=json.loads(json.dumps(model_cfg.to_dict())),
        tokenizer=TOKENIZER,
        max_tokens=MAX_TOKENS,
        token_buckets=tuple(DEFAULT_BUCKETS),
        image=ImageLayout(tuple(model_cfg.image_hw), "uint8", "NCHW", "RGB",
                          pad_value_for(model_cfg.pixel_mean, model_cfg.bgr, model_cfg.pad_with_mean),
                          model_cfg.resize_max_side,
                          Normalisation(tuple(model_cfg.pixel_mean), tuple(model_cfg.pixel_std),
                                        "BGR" if model_cfg.bgr else "RGB")),
        top_k=top_k,
        max_batch_size=max_batch_size,
        models=models,
        postprocess=PostprocessConfig.for_model(model_cfg, score_threshold=SERVING_SCORE_THRESHOLD),
        answer_vocabulary=tuple(model_cfg.vqa_answers) or None,
        # a caption has at most caption_max_len - 1 tokens: position 0 is the start token
        caption=CaptionSpec(tuple(model_cfg.caption_tokens), model_cfg.caption_start_id, model_cfg.caption_end_id,
                            model_cfg.caption_max_len - 1, CAPTION, tuple(model_cfg.caption_words),
                            tuple(model_cfg.caption_checked_phrases), model_cfg.caption_check_threshold)
        if model_cfg.caption_tokens else None,
    )


def build_manifest(
    model_cfg: ModelConfig,
    checkpoint_path: Path,
    ckpt: Mapping[str, Any],
    flavour: str,
    top_k: int,
    max_batch_size: int,
) -> dict[str, Any]:
    """manifest.json's JSON object (manifest_of(...).to_dict())."""
    return manifest_of(model_cfg, checkpoint_path, ckpt, flavour, top_k, max_batch_size).to_dict()


# --------------------------------------------------------------------------- rendering


def write_configs(
    out: Path,
    model_cfg: ModelConfig,
    flavour: str = "cpu",
    top_k: int = 100,
    max_batch_size: int = 8,
    settings: BatchingSettings = BatchingSettings(),
) -> dict[str, Path]:
    """Write <out>/<model>/config.pbtxt for every model of the repository and the python
    files of the python-backend ones (python_files); no weights. Returns {model: config path}."""
    out = Path(out)
    written = {}
    for name in repository_models(model_cfg, top_k):
        text = render_config(name, flavour, model_cfg, top_k, max_batch_size, settings)
        version_dir = out / name / VERSION
        version_dir.mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(text)
        for file, source in python_files(name, flavour).items():
            shutil.copyfile(source, version_dir / file)
        written[name] = out / name / "config.pbtxt"
    return written


def default_repository(flavour: str) -> Path:
    """Where a flavour is rendered by default: the committed cpu repository is
    model_repository/; the GPU flavours get folders of their own (model_repository-gpu,
    model_repository-gpu-onnx, not in git), so rendering one never overwrites the
    committed cpu configs."""
    if flavour not in FLAVOURS:
        raise SettingsError(f"unknown flavour {flavour!r}; choose one of {list(FLAVOURS)}")
    return Path("model_repository" if flavour == "cpu" else f"model_repository-{flavour}")


def _existing_flavour(out: Path) -> str | None:
    try:
        return json.loads((out / MANIFEST).read_text()).get("flavour")
    except (OSError, ValueError, AttributeError):
        return None


def _keep_engines(out: Path, staging: Path, manifest: Manifest) -> tuple[list[str], Manifest]:
    """Carry the built model.plan files (hard links: no copy of large files) and the
    manifest's engine record from the old repository into the new one; returns the models
    whose plans were kept and the manifest with the record. Whether they still fit is export.tensorrt's call (it rebuilds
    when the record does not match the checkpoint, GPU or TensorRT version)."""
    kept = []
    for name in manifest.models:
        plan = out / name / VERSION / PLAN_FILE
        target = staging / name / VERSION / PLAN_FILE
        if plan.is_file() and target.parent.is_dir():
            try:
                os.link(plan, target)
            except OSError:
                shutil.copyfile(plan, target)
            kept.append(name)
    try:
        record = json.loads((out / MANIFEST).read_text()).get(ENGINES_KEY)
    except (OSError, ValueError, AttributeError):
        record = None
    if kept and isinstance(record, dict):
        manifest = replace(manifest, engines=record)
    return kept, manifest


def repository_is_current(
    checkpoint: Path,
    out: Path,
    flavour: str = "cpu",
    top_k: int = 100,
    max_batch_size: int = 8,
    settings: BatchingSettings = BatchingSettings(),
) -> bool:
    """True when `out` is exactly what render_repository would write for these arguments
    (same manifest, so same checkpoint bytes; ONNX files exported from that checkpoint; same
    configs; every ONNX file and the tokenizer present): compose's exporter skips the
    export then. Reads the checkpoint's config only (no ONNX export)."""
    from glipv2.checkpoint import read_checkpoint

    out = Path(out)
    try:
        existing = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    ckpt = read_checkpoint(checkpoint)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    existing.pop(ENGINES_KEY, None)
    expected = build_manifest(cfg, checkpoint, ckpt, flavour, top_k, max_batch_size)
    if existing != expected:
        return False
    stamp = out / EXPORTED_FROM
    if not stamp.is_file() or stamp.read_text() != export_stamp(expected["checkpoint"]["sha256"]):
        return False  # ONNX files of another checkpoint, or traced by other code, under a current manifest
    if not (out / TOKENIZER).is_file():
        return False
    onnx = graphs.graph_specs(cfg, top_k)
    for name in repository_models(cfg, top_k):
        config = out / name / "config.pbtxt"
        if (name in onnx and not (out / name / VERSION / ONNX_FILE).is_file()) or not config.is_file():
            return False
        if config.read_text() != render_config(name, flavour, cfg, top_k, max_batch_size, settings):
            return False
        for file, source in python_files(name, flavour).items():  # a stale copy is re-rendered
            target = out / name / VERSION / file
            if not target.is_file() or target.read_bytes() != source.read_bytes():
                return False
    return True


def graph_source_digest(root: Path = PROJECT_ROOT) -> str:
    """sha256 over GRAPH_SOURCES under `root` (paths and bytes, in a fixed order)."""
    h = hashlib.sha256()
    for rel in GRAPH_SOURCES:
        path = root / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(f.read_bytes() if f.is_file() else b"missing")
    return h.hexdigest()


def export_stamp(checkpoint_sha256: str) -> str:
    """EXPORTED_FROM's text: the checkpoint's digest, then the graph sources'."""
    return f"{checkpoint_sha256}\ngraph sources {graph_source_digest()}\n"


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by `staging` with two renames (same parent folder, so same file
    system); the old folder is removed only after the new one is in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def render_repository(
    checkpoint: Path,
    out: Path,
    flavour: str = "cpu",
    top_k: int = 100,
    max_batch_size: int = 8,
    settings: BatchingSettings = BatchingSettings(),
    log: Callable[[str], None] | None = None,
    replace_flavour: bool = False,
    image_hw: tuple[int, int] | None = None,
) -> Path:
    """checkpoint -> ONNX graphs -> a complete Triton repository at `out` (returned).

    Everything is rendered into a temporary folder beside `out` and swapped in at the end,
    so a failure (bad checkpoint, an op TensorRT cannot parse) leaves `out` as it was.
    README.md and .gitignore of an existing `out` are kept, and so are built model.plan
    files with the manifest's engine record.
    A repository of another flavour is not overwritten unless replace_flavour is set
    (SettingsError): each flavour has its own folder (default_repository).
    Raises glipv2.checkpoint.CheckpointError for an unusable checkpoint and RepositoryError
    for anything else that refuses to render.
    """
    from glipv2.checkpoint import load_model

    say = log or (lambda _msg: None)
    checkpoint, out = Path(checkpoint), Path(out)
    _check_settings(flavour, top_k, max_batch_size, settings)  # before the (slow) export
    existing = _existing_flavour(out)
    if existing not in (None, flavour) and not replace_flavour:
        raise SettingsError(
            f"{out} holds the {existing!r} flavour; render {flavour!r} into its own folder "
            f"({default_repository(flavour)}, the default for --flavour {flavour}) or pass --force to replace it")

    say(f"[1/5] loading checkpoint {checkpoint}")
    model, ckpt = load_model(checkpoint, image_hw=image_hw)
    cfg = model.cfg
    for name in repository_models(cfg, top_k):  # settings that depend on the model (top-K vs anchors) fail here
        render_config(name, flavour, cfg, top_k, max_batch_size, settings)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.render-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the repository from a server run as another user
    try:
        say(f"[2/5] exporting ONNX graphs ({cfg.preset}, {cfg.image_hw[0]}x{cfg.image_hw[1]}, top-{top_k})")
        files = onnx_export.export_onnx(model, staging / ".onnx", top_k=top_k)

        say("[3/5] checking every op against TensorRT's ONNX parser")
        problems = {}
        for name, path in files.items():
            bad = trt_ops.unsupported_ops(path)
            if bad:
                problems[name] = bad
        if problems:
            detail = "; ".join(f"{m}: " + ", ".join(f"{op} ({why})" for op, why in sorted(ops.items()))
                               for m, ops in problems.items())
            raise RepositoryError(f"refusing to render {out}: unsupported ONNX ops in {detail}")

        say(f"[4/5] writing {flavour} configs, manifest and tokenizer")
        write_configs(staging, cfg, flavour, top_k, max_batch_size, settings)
        for name, path in files.items():
            os.replace(path, staging / name / VERSION / ONNX_FILE)
        shutil.rmtree(staging / ".onnx", ignore_errors=True)
        kept, manifest = _keep_engines(out, staging, manifest_of(cfg, checkpoint, ckpt, flavour, top_k, max_batch_size))
        if kept:
            say(f"      kept the built {PLAN_FILE} of {', '.join(kept)} (export.tensorrt rebuilds stale ones)")
        manifest.dump(staging / MANIFEST)
        (staging / EXPORTED_FROM).write_text(export_stamp(manifest.checkpoint.sha256))
        shutil.copyfile(default_tokenizer_path(), staging / TOKENIZER)
        for kept in KEPT_FILES:
            if (out / kept).is_file():
                shutil.copyfile(out / kept, staging / kept)
        if not (staging / ".gitignore").exists():
            (staging / ".gitignore").write_text(GITIGNORE)

        say(f"[5/5] swapping the new repository into {out}")
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if flavour == "gpu":
        say(f"note: {PLAN_FILE} is not built here; run `python -m export.tensorrt` on a GPU host "
            f"to build it next to each {ONNX_FILE}")
    return out
