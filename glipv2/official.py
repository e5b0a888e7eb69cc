"""Convert official GLIP-T checkpoints (microsoft/GLIP) into this project's glip-t model.

Official files are {"model": {"module.<name>": tensor}, ...} (some also hold "model_ema").
Every official name has a destination here, by a fixed renaming (the modules keep the
official parameter names):

    backbone.body.*                         -> backbone.*           (Swin-T)
    backbone.fpn.*                          -> fpn.*
    language_backbone.body.model.*          -> language.model.*     (bert-base-uncased)
    rpn.head.dyhead_tower.{3i}.b_attn.*     -> head.fusion.{i}.*    (MHA-B early fusion)
    rpn.head.dyhead_tower.{3i+1}.*          -> head.text_layers.{i}.*  (BertEncoderLayer)
    rpn.head.dyhead_tower.{3i+2}.*          -> head.tower.{i}.*     (DyConv, deformable)
    rpn.head.{bbox_pred,centerness,scales,dot_product_projection_text,log_scale,bias_lang,bias0}
                                            -> head.*

Names the official model builds but never uses on the grounding path are skipped with a
reason (KNOWN_SKIPPED); anything else left over is reported as unused. The conversion is
strict: a missing or mis-shaped key is an error that names the keys.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from glipv2.checkpoint import FORMAT, CheckpointError
from glipv2.config import ModelConfig, get_preset

_RENAMES = [
    (r"^backbone\.body\.(.*)$", r"backbone.\1"),
    (r"^backbone\.fpn\.(.*)$", r"fpn.\1"),
    (r"^language_backbone\.body\.model\.(.*)$", r"language.model.\1"),
    (r"^rpn\.head\.(bbox_pred|centerness|dot_product_projection_text)\.(weight|bias)$", r"head.\1.\2"),
    (r"^rpn\.head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
    (r"^rpn\.head\.(log_scale|bias_lang|bias0)$", r"head.\1"),
]

# Official names with no destination on purpose: (pattern, why).
KNOWN_SKIPPED = [
    (r"^rpn\.head\.cls_logits\.(weight|bias)$",
     "classification conv: GLIP-T scores regions with the dot-product token logits "
     "(USE_DOT_PRODUCT_TOKEN_LOSS); cls_logits is built, its loss is off and inference never reads it"),
    (r"^language_backbone\.body\.model\.pooler\.",
     "BERT pooler: GLIP uses token features only (files saved with a pooled BertModel carry it)"),
    (r"^language_backbone\.body\.model\.embeddings\.(position_ids|token_type_ids)$",
     "constant BERT buffer saved by older transformers versions; rebuilt by BertModel"),
    (r"^rpn\.anchor_generator\.cell_anchors\.\d+$",
     "ATSS base anchors, recomputed from the config (checked against glip-t's anchors)"),
]

# This model's parameters that official files do not have: (prefix, why).
NOT_IN_OFFICIAL = [
    ("mlm_head.", "GLIPv2 masked-language-model head, training only (GLIP-T was trained without MLM)"),
]


@dataclass
class ConversionReport:
    mapped: dict[str, str] = field(default_factory=dict)  # official name -> ours
    known_skipped: dict[str, str] = field(default_factory=dict)  # official name -> why
    unused: list[str] = field(default_factory=list)  # official names with no destination
    missing: list[str] = field(default_factory=list)  # our names no official key fills
    misshaped: list[str] = field(default_factory=list)  # "official -> ours: shapes"
    initialised: dict[str, str] = field(default_factory=dict)  # our names kept as initialised -> why

    @property
    def ok(self) -> bool:
        return not self.missing and not self.misshaped

    def format(self, limit: int = 50) -> str:
        """The human-readable report `glipv2 convert` prints."""
        lines = [f"mapped: {len(self.mapped)}", f"known and skipped: {len(self.known_skipped)}"]
        reasons: dict[str, list[str]] = {}
        for name, why in self.known_skipped.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            lines.append(f"  {len(names)} x {names[0]}{' ...' if len(names) > 1 else ''}: {why}")
        for title, items in (("unused", self.unused), ("missing", self.missing), ("mis-shaped", self.misshaped)):
            lines.append(f"{title}: {len(items)}")
            lines += [f"  {x}" for x in items[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more")
        groups: dict[str, int] = {}
        for name, why in self.initialised.items():
            groups[why] = groups.get(why, 0) + 1
        for why, n in groups.items():
            lines.append(f"kept as initialised: {n} ({why})")
        return "\n".join(lines)


def official_to_ours(name: str) -> str | None:
    """One official name (without "module.") -> this project's name, or None."""
    for pattern, target in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, target, name)
    m = re.match(r"^rpn\.head\.dyhead_tower\.(\d+)\.(.*)$", name)
    if m:
        layer, role = divmod(int(m.group(1)), 3)
        rest = m.group(2)
        if role == 0 and rest.startswith("b_attn."):
            return f"head.fusion.{layer}.{rest.removeprefix('b_attn.')}"
        if role == 1:
            return f"head.text_layers.{layer}.{rest}"
        if role == 2:
            return f"head.tower.{layer}.{rest}"
    return None


def _skip_reason(name: str) -> str | None:
    for pattern, why in KNOWN_SKIPPED:
        if re.match(pattern, name):
            return why
    return None


def official_cell_anchor(stride: int, anchor_scale: float) -> list[float]:
    """maskrcnn_benchmark's base anchor for one level (one size, aspect ratio 1): the "+1"
    pixel convention, centred on pixel (stride - 1) / 2 of the first cell."""
    size = anchor_scale * stride
    ctr = (stride - 1) / 2
    return [ctr - 0.5 * (size - 1), ctr - 0.5 * (size - 1), ctr + 0.5 * (size - 1), ctr + 0.5 * (size - 1)]


@functools.lru_cache(maxsize=4)
def expected_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Shapes (and dtypes) of this model's state dict, built on the meta device (no memory)."""
    from glipv2.modeling.glipv2 import build_model

    with torch.device("meta"):
        model = build_model(cfg, pretrained_text=False)
    return model.state_dict()


def convert_state_dict(official: Mapping[str, torch.Tensor], cfg: ModelConfig | None = None
                       ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Official state dict -> (our state dict, report). Does not raise; see report.ok."""
    cfg = cfg or get_preset("glip-t")
    expected = expected_state(cfg)
    report = ConversionReport()
    out: dict[str, torch.Tensor] = {}
    for full_name, tensor in official.items():
        name = full_name.removeprefix("module.")
        why = _skip_reason(name)
        if why is not None:
            report.known_skipped[name] = why
            m = re.match(r"^rpn\.anchor_generator\.cell_anchors\.(\d+)$", name)
            if m:  # a file trained with other anchors would silently mis-place every box
                level = int(m.group(1))
                want = (torch.tensor([official_cell_anchor(cfg.strides[level], cfg.anchor_scale)])
                        if level < len(cfg.strides) else None)
                if want is None or tensor.shape != want.shape or not torch.allclose(tensor.float(), want):
                    report.misshaped.append(f"{name}: {tensor.tolist()} is not glip-t's anchor "
                                            f"{None if want is None else want.tolist()}")
            continue
        ours = official_to_ours(name)
        if ours is None or ours not in expected:
            report.unused.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            report.misshaped.append(f"{name} -> {ours}: {tuple(tensor.shape)} vs model {tuple(expected[ours].shape)}")
            continue
        report.mapped[name] = ours
        out[ours] = tensor.to(expected[ours].dtype)
    for name in expected:
        if name in out:
            continue
        why = next((w for prefix, w in NOT_IN_OFFICIAL if name.startswith(prefix)), None)
        if why is not None:
            report.initialised[name] = why
        elif not any(m.endswith(" -> " + name) or f"-> {name}:" in m for m in report.misshaped):
            report.missing.append(name)
    report.unused.sort()
    report.missing.sort()
    return out, report


def convert_loaded(raw: Mapping[str, Any], path: str | Path, use_ema: bool = False) -> dict[str, Any]:
    """An already loaded official file -> a glipv2-serve checkpoint dict (CheckpointError
    naming the keys when anything is missing or mis-shaped). What lets `make export
    CHECKPOINT=glip_tiny_model_o365_goldg.pth` take an official file directly."""
    key = "model_ema" if use_ema else "model"
    if key not in raw:
        raise CheckpointError(f"{path} has no {key!r} weights")
    cfg = get_preset("glip-t")
    state, report = convert_state_dict(raw[key], cfg)
    if not report.ok:
        raise CheckpointError(f"{path} does not convert to the {cfg.preset!r} model: "
                              f"{len(report.missing)} missing {report.missing[:5]}, "
                              f"{len(report.misshaped)} mis-shaped {report.misshaped[:5]}")
    return checkpoint_from(state, report, path, use_ema, cfg)


def read_official(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of an official file, loaded with weights_only=True."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"official checkpoint {path} is corrupt or not a plain torch file: {e}") from e
    key = "model_ema" if use_ema else "model"
    if not is_official(raw):
        raise CheckpointError(f"{path} is not an official GLIP checkpoint (no 'model' dict of tensors)")
    if key not in raw:
        raise CheckpointError(f"{path} has no {key!r} weights")
    return raw[key]


def is_official(raw: Any) -> bool:
    """Does a loaded file look like {"model": {"module.backbone...": tensor}}?"""
    state = raw.get("model") if isinstance(raw, dict) else None
    return (isinstance(state, dict) and bool(state) and "format" not in raw
            and all(isinstance(k, str) for k in state)
            and any(k.removeprefix("module.").startswith(("backbone.", "rpn.", "language_backbone.")) for k in state))


def convert_file(path: str | Path, use_ema: bool = False, cfg: ModelConfig | None = None
                 ) -> tuple[dict[str, Any], ConversionReport]:
    """Official file -> (a glipv2-serve checkpoint dict, report). Raises CheckpointError,
    naming the keys, when anything is missing or mis-shaped."""
    cfg = cfg or get_preset("glip-t")
    state, report = convert_state_dict(read_official(path, use_ema), cfg)
    if not report.ok:
        raise CheckpointError(f"{path} does not convert to the {cfg.preset!r} model: "
                              f"{len(report.missing)} missing {report.missing[:5]}, "
                              f"{len(report.misshaped)} mis-shaped {report.misshaped[:5]}")
    return checkpoint_from(state, report, path, use_ema, cfg), report


def checkpoint_from(state: dict[str, torch.Tensor], report: ConversionReport, path: str | Path,
                    use_ema: bool = False, cfg: ModelConfig | None = None) -> dict[str, Any]:
    """A converted state dict -> a glipv2-serve checkpoint dict (what `glipv2 convert` saves)."""
    from glipv2.modeling.glipv2 import build_model

    cfg = cfg or get_preset("glip-t")
    state = dict(state)
    # Fill what official files do not carry (the training-only MLM head) from a fresh model.
    if report.initialised:
        torch.manual_seed(0)
        fresh = build_model(cfg, pretrained_text=False).state_dict()
        state.update({k: fresh[k] for k in report.initialised})
    return {"format": FORMAT, "model_config": cfg.to_dict(), "model": state,
            "source": {"official": Path(path).name, "weights": "model_ema" if use_ema else "model",
                       "mapped": len(report.mapped), "known_skipped": len(report.known_skipped),
                       "unused": report.unused}}


# ----------------------------------------------------------------- random official layout


def random_official_state_dict(shapes: Mapping[str, tuple[list[int], str]], seed: int = 0
                               ) -> dict[str, torch.Tensor]:
    """A state dict in the official layout with random values at sensible scales, as a pure
    function of (key list, seed): what tests, the parity fixture and the benchmark use in
    place of the real weights, which cannot be downloaded here.

    shapes: {"module.<name>": ([dims], dtype)} (tests/fixtures/official_glip/glip_t_keys.json).
    Each tensor gets its own generator (seeded from the seed and the name), so a value does
    not depend on the other keys. Integer buffers (Swin's relative_position_index) and the
    anchors get their real values, since no trained file has anything else there.
    The temperature (log_scale -3) and bias0 (-2.5) are set so that random regions get
    token probabilities on both sides of the 0.05 pre-NMS threshold (at GLIP's init values,
    -4.6 +- 0.1 logits, nothing would ever be detected and the postprocess go untested).
    """
    from glipv2.modeling.swin import relative_position_index

    out = {}
    for full_name, (dims, dtype) in shapes.items():
        name = full_name.removeprefix("module.")
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        randn = torch.randn(dims, generator=g, dtype=torch.float32) if dims else torch.randn((), generator=g)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("relative_position_index"):
            value = relative_position_index(int(round(math.sqrt(dims[0]))))
        elif m := re.match(r"^rpn\.anchor_generator\.cell_anchors\.(\d+)$", name):
            value = torch.tensor([official_cell_anchor(8 * 2 ** int(m.group(1)), 8.0)])
        elif leaf in ("gamma_v", "gamma_l"):
            value = (1.0 / 6) * (1 + 0.1 * randn)
        elif leaf == "log_scale":
            value = -3.0 + 0.1 * randn
        elif leaf == "bias0":
            value = -2.5 + 0.1 * randn
        elif leaf == "scale":
            value = 1 + 0.1 * randn
        elif leaf == "bias" or leaf == "bias_lang" or "position_bias_table" in leaf:
            value = 0.02 * randn
        elif len(dims) == 1:  # LayerNorm / GroupNorm weights
            value = 1 + 0.1 * randn
        else:  # weights: unit-variance outputs for unit-variance inputs
            value = randn / math.sqrt(math.prod(dims[1:]))
        out[full_name] = value.to(getattr(torch, dtype)).reshape(dims)
    return out
