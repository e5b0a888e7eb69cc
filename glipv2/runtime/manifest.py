"""manifest.json: what a rendered model repository promises its clients, as one typed,
frozen dataclass.

export/repository.py writes it (`Manifest(...).dump(path)`), the gateway and the TensorRT
tools read it (`Manifest.load(repository)`), so a renamed or missing key fails when the
file is read, naming the key, not later inside a request. The format version changes
when the layout of the file does (a reader refuses other versions and says to re-render):

    /1  the first typed layout
    /2  image.pad_value may be one value per RGB channel; image.max_side (long-side cap),
        image.normalisation (what the graph applies) and postprocess.threshold_on (score or
        official probability rule) are written, for models converted from official GLIP;
        caption.decoder (optional: absent or null in a repository without it) names the
        Triton model that runs the whole caption decode loop
        (later, optional keys of /2: caption.words, caption.checked_phrases and
        caption.check_threshold; a reader defaults them to no word rule and no check)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from glipv2.postprocess import PostprocessConfig

FORMAT = "glipv2-serve-repository/2"
MANIFEST_FILE = "manifest.json"


class ManifestError(ValueError):
    """manifest.json is missing a key, has one it should not, or a value of the wrong kind."""


def _require(d: Mapping[str, Any], where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if not isinstance(d, Mapping):
        raise ManifestError(f"{where} must be an object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    unknown = [k for k in d if k not in required and k not in optional]
    if missing:
        raise ManifestError(f"{where}: missing {', '.join(map(repr, missing))}")
    if unknown:
        raise ManifestError(f"{where}: unknown {', '.join(map(repr, unknown))}")


def _int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ManifestError(f"{where} must be an integer" + (f" >= {minimum}" if minimum is not None else "")
                            + f", got {value!r}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"{where} must be a string, got {value!r}")
    return value


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ManifestError(f"{where} must be a list of integers, got {value!r}")
    return tuple(_int(v, f"{where}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # v2-protocol name: FP32, INT64, UINT8
    dims: tuple[int, ...]  # without the batch axis; -1 = the graph's dynamic axis

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> TensorSpec:
        _require(d, where, ("dtype", "dims"))
        return cls(_str(d["dtype"], f"{where}.dtype"), _ints(d["dims"], f"{where}.dims"))


@dataclass(frozen=True)
class DynamicAxis:
    counts: str  # "tokens" or "steps"
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class GraphEntry:
    """One graph of the repository: its tensors (in call order) and batch limit."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    max_batch_size: int
    dynamic_axis: DynamicAxis | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> GraphEntry:
        _require(d, where, ("inputs", "outputs", "max_batch_size"), ("dynamic_axis",))
        tensors = {}
        for kind in ("inputs", "outputs"):
            if not isinstance(d[kind], Mapping) or not d[kind]:
                raise ManifestError(f"{where}.{kind} must be a non-empty object")
            tensors[kind] = {n: TensorSpec.from_dict(t, f"{where}.{kind}.{n}") for n, t in d[kind].items()}
        axis = d.get("dynamic_axis")
        if axis is not None:
            _require(axis, f"{where}.dynamic_axis", ("counts", "min", "opt", "max"))
            axis = DynamicAxis(_str(axis["counts"], f"{where}.dynamic_axis.counts"),
                               *(_int(axis[k], f"{where}.dynamic_axis.{k}", 1) for k in ("min", "opt", "max")))
        return cls(tensors["inputs"], tensors["outputs"], _int(d["max_batch_size"], f"{where}.max_batch_size", 1),
                   axis)


@dataclass(frozen=True)
class CheckpointInfo:
    path: str  # relative to the project when the checkpoint was inside it
    sha256: str
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"{where} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Normalisation:
    """What the graph does to the uint8 pixels it is given (written for clients that run the
    ONNX files themselves; the gateway only sends uint8): reorder the channels to
    channel_order, then (x - mean) / std per channel, x on the 0-255 scale."""

    mean: tuple[float, float, float]  # in channel_order
    std: tuple[float, float, float]
    channel_order: str  # "RGB", or "BGR" (official GLIP weights)
    scale: str = "0-255"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> Normalisation:
        _require(d, where, ("mean", "std", "channel_order", "scale"))
        triples = {}
        for k in ("mean", "std"):
            if not isinstance(d[k], (list, tuple)) or len(d[k]) != 3:
                raise ManifestError(f"{where}.{k} must be 3 numbers, got {d[k]!r}")
            triples[k] = tuple(_float(v, f"{where}.{k}[{i}]") for i, v in enumerate(d[k]))
        if min(triples["std"]) <= 0:
            raise ManifestError(f"{where}.std must be positive, got {list(triples['std'])}")
        if d["channel_order"] not in ("RGB", "BGR"):
            raise ManifestError(f"{where}.channel_order must be 'RGB' or 'BGR', got {d['channel_order']!r}")
        if d["scale"] != "0-255":
            raise ManifestError(f"{where}.scale must be '0-255', got {d['scale']!r}")
        return cls(triples["mean"], triples["std"], d["channel_order"], d["scale"])


@dataclass(frozen=True)
class ImageLayout:
    """What the image input of every graph takes: letterboxed to hw (top-left, padded
    bottom/right with pad_value), uint8 RGB, NCHW; the graph normalises it."""

    hw: tuple[int, int]
    dtype: str = "uint8"
    layout: str = "NCHW"
    channels: str = "RGB"
    pad_value: int | tuple[int, int, int] = 114  # one value, or one per RGB channel
    # Official GLIP weights (glipv2.official): the long side is capped at max_side (0 = the
    # canvas only) and padding is the pixel mean, zero after the graph's normalisation.
    max_side: int = 0
    normalisation: Normalisation | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> ImageLayout:
        _require(d, where, ("hw", "pad_value", "max_side", "normalisation"), ("dtype", "layout", "channels"))
        hw = _ints(d["hw"], f"{where}.hw")
        if len(hw) != 2 or min(hw) < 1:
            raise ManifestError(f"{where}.hw must be [height, width], got {list(hw)}")
        pad = d["pad_value"]
        pads = _ints(pad if isinstance(pad, (list, tuple)) else [pad], f"{where}.pad_value")
        if len(pads) not in (1, 3) or not all(0 <= v <= 255 for v in pads):
            raise ManifestError(f"{where}.pad_value must be one value or 3 (RGB) in 0..255, got {pad!r}")
        norm = d["normalisation"]
        return cls((hw[0], hw[1]), **{k: _str(d[k], f"{where}.{k}") for k in ("dtype", "layout", "channels")
                                      if k in d},
                   pad_value=pads if isinstance(pad, (list, tuple)) else pads[0],
                   max_side=_int(d["max_side"], f"{where}.max_side", 0),
                   normalisation=None if norm is None else Normalisation.from_dict(norm, f"{where}.normalisation"))


@dataclass(frozen=True)
class CaptionSpec:
    tokens: tuple[int, ...]  # the decoder's shortlist of WordPiece ids
    start_id: int
    end_id: int
    max_len: int  # most tokens a caption may have (the model's positions minus the start token)
    # the Triton model that runs the whole decode loop in-process (glipv2.runtime.graphs.CAPTION);
    # None in a repository rendered before it existed: clients then drive caption_start/step
    decoder: str | None = None
    words: tuple[str, ...] = ()  # ModelConfig.caption_words: the whole words captions may use (empty: any)
    # ModelConfig.caption_checked_phrases / caption_check_threshold: a caption names one of
    # these phrases only where the detector scores it at least check_threshold (empty: no check)
    checked_phrases: tuple[str, ...] = ()
    check_threshold: float = 0.4

    @property
    def max_positions(self) -> int:
        """Decoder positions, start token included (glipv2.understanding.CaptionPipeline)."""
        return self.max_len + 1


@dataclass(frozen=True)
class Manifest:
    format: str
    flavour: str  # cpu | gpu-onnx | gpu
    checkpoint: CheckpointInfo
    preset: str
    model_config: dict[str, Any]  # glipv2.config.ModelConfig.to_dict()
    tokenizer: str  # file name inside the repository
    max_tokens: int
    token_buckets: tuple[int, ...]
    image: ImageLayout
    top_k: int
    max_batch_size: int
    models: dict[str, GraphEntry]
    postprocess: PostprocessConfig = PostprocessConfig()
    answer_vocabulary: tuple[str, ...] | None = None
    caption: CaptionSpec | None = None
    # what export.tensorrt built the model.plan files from and for (TensorRT version, GPU,
    # checkpoint, signatures); absent until plans are built. Its keys are the builder's.
    engines: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ManifestError(f"format {self.format!r}, expected {FORMAT!r} (re-render the repository: make export)")

    # ------------------------------------------------------------------ derived
    @property
    def image_hw(self) -> tuple[int, int]:
        return self.image.hw

    def postprocess_with(self, score_threshold: float | None = None,
                         max_detections: int | None = None) -> PostprocessConfig:
        """The repository's postprocessing defaults with a request's overrides."""
        changes: dict[str, Any] = {}
        if score_threshold is not None:
            changes["score_threshold"] = float(score_threshold)
        if max_detections is not None:
            changes["max_detections"] = int(max_detections)
        return replace(self.postprocess, **changes)

    def caption_check(self) -> PostprocessConfig | None:
        """The settings that ground the model's checked caption phrases (a phrase is found
        where it has a detection: the score threshold is the model's check threshold);
        None when the model checks no phrases."""
        if self.caption is None or not self.caption.checked_phrases:
            return None
        return self.postprocess_with(self.caption.check_threshold)

    # ------------------------------------------------------------------ (de)serialise
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        optional = ("postprocess", "answer_vocabulary", "caption", "engines")
        _require(d, "manifest", tuple(f.name for f in fields(cls) if f.name not in optional), optional)
        if d["format"] != FORMAT:  # before the keys of another version are read
            raise ManifestError(f"format {d['format']!r}, expected {FORMAT!r} (re-render the repository: make export)")
        ck = d["checkpoint"]
        _require(ck, "manifest.checkpoint", ("path", "sha256"), ("step", "metrics"))
        if not isinstance(d["models"], Mapping) or not d["models"]:
            raise ManifestError("manifest.models must be a non-empty object")
        if not isinstance(d["model_config"], Mapping):
            raise ManifestError("manifest.model_config must be an object")
        pp = d.get("postprocess")
        try:
            postprocess = PostprocessConfig(**pp) if pp else PostprocessConfig()
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest.postprocess: {exc}") from None
        caption = d.get("caption")
        if caption is not None:
            _require(caption, "manifest.caption", ("tokens", "start_id", "end_id", "max_len"),
                     ("decoder", "words", "checked_phrases", "check_threshold"))
            decoder = caption.get("decoder")
            words, checked = caption.get("words") or [], caption.get("checked_phrases") or []
            for key, value in (("words", words), ("checked_phrases", checked)):
                if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
                    raise ManifestError(f"manifest.caption.{key} must be a list of non-empty strings")
            threshold = _float(caption.get("check_threshold", CaptionSpec.check_threshold),
                               "manifest.caption.check_threshold")
            if not 0 < threshold < 1:
                raise ManifestError(f"manifest.caption.check_threshold must be in (0, 1), got {threshold!r}")
            caption = CaptionSpec(_ints(caption["tokens"], "manifest.caption.tokens"),
                                  *(_int(caption[k], f"manifest.caption.{k}", 0) for k in ("start_id", "end_id")),
                                  _int(caption["max_len"], "manifest.caption.max_len", 1),
                                  None if decoder is None else _str(decoder, "manifest.caption.decoder"), tuple(words),
                                  tuple(checked), threshold)
        answers = d.get("answer_vocabulary")
        if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
            raise ManifestError("manifest.answer_vocabulary must be a list of strings or null")
        return cls(
            format=d["format"],
            flavour=_str(d["flavour"], "manifest.flavour"),
            checkpoint=CheckpointInfo(_str(ck["path"], "manifest.checkpoint.path"),
                                      _str(ck["sha256"], "manifest.checkpoint.sha256"),
                                      ck.get("step"), dict(ck.get("metrics") or {})),
            preset=_str(d["preset"], "manifest.preset"),
            model_config=dict(d["model_config"]),
            tokenizer=_str(d["tokenizer"], "manifest.tokenizer"),
            max_tokens=_int(d["max_tokens"], "manifest.max_tokens", 1),
            token_buckets=tuple(sorted(_ints(d["token_buckets"], "manifest.token_buckets"))),
            image=ImageLayout.from_dict(d["image"], "manifest.image"),
            top_k=_int(d["top_k"], "manifest.top_k", 1),
            max_batch_size=_int(d["max_batch_size"], "manifest.max_batch_size", 1),
            models={name: GraphEntry.from_dict(e, f"manifest.models.{name}") for name, e in d["models"].items()},
            postprocess=postprocess,
            answer_vocabulary=tuple(answers) if answers else None,
            caption=caption,
            engines=dict(d["engines"]) if isinstance(d.get("engines"), Mapping) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of manifest.json (lists, not tuples)."""
        def graph(e: GraphEntry) -> dict[str, Any]:
            return {
                **{kind: {n: {"dtype": t.dtype, "dims": list(t.dims)} for n, t in tensors.items()}
                   for kind, tensors in (("inputs", e.inputs), ("outputs", e.outputs))},
                "max_batch_size": e.max_batch_size,
                "dynamic_axis": asdict(e.dynamic_axis) if e.dynamic_axis else None,
            }

        return json.loads(json.dumps({
            "format": self.format,
            "flavour": self.flavour,
            "checkpoint": asdict(self.checkpoint),
            "preset": self.preset,
            "model_config": self.model_config,
            "tokenizer": self.tokenizer,
            "max_tokens": self.max_tokens,
            "token_buckets": list(self.token_buckets),
            "image": asdict(self.image),
            "top_k": self.top_k,
            "max_batch_size": self.max_batch_size,
            "models": {name: graph(e) for name, e in self.models.items()},
            "postprocess": asdict(self.postprocess),
            "answer_vocabulary": list(self.answer_vocabulary) if self.answer_vocabulary else None,
            "caption": asdict(self.caption) if self.caption else None,
            **({"engines": self.engines} if self.engines is not None else {}),
        }))

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def dump(self, path: str | Path) -> Path:
        """Write manifest.json (to `path`, or into `path` when it is a folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        path.write_text(self.dumps())
        return path

    @classmethod
    def load(cls, repository: str | Path) -> Manifest:
        """<repository>/manifest.json (or the file itself). FileNotFoundError names `make
        export`; ManifestError names the bad key."""
        path = Path(repository)
        if path.is_dir() or not path.suffix:
            path = path / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no manifest; run `make export` to render the model repository")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: not JSON ({exc})") from None
        try:
            return cls.from_dict(data)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
