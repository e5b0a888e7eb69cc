"""Load official GLIP checkpoints (microsoft/GLIP) into the glip-t preset.

Official files are {"model": {"module.<name>": tensor}}. Most names carry over:
the Swin backbone, the FPN, the BERT language backbone, the bidirectional fusion
blocks (dyhead_tower.3i.b_attn), the BERT layers on the text (dyhead_tower.3i+1, whose
separate q/k/v are concatenated into PyTorch's in_proj) and the output layers. GLIP's
DyConv tower (dyhead_tower.3i+2) uses a deformable convolution, a compiled CUDA op with
no ONNX/TensorRT export; this project's tower is a plain conv tower, so those weights
have no destination and the tower needs fine-tuning. load_official reports exactly
what was loaded and what was not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from glipv2.checkpoint import CheckpointError
from glipv2.modeling.glipv2 import GLIPv2

_DIRECT = [
    (r"^backbone\.body\.(.*)$", r"backbone.\1"),
    (r"^backbone\.fpn\.(.*)$", r"fpn.\1"),
    (r"^language_backbone\.body\.model\.(?!pooler\.)(.*)$", r"language.model.\1"),
    (r"^rpn\.head\.(bbox_pred|centerness|dot_product_projection_text)\.(weight|bias)$", r"head.\1.\2"),
    (r"^rpn\.head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
    (r"^rpn\.head\.(log_scale|bias_lang|bias0)$", r"head.\1"),
]
_BERT_LAYER = {
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "output.LayerNorm": "norm2",
}


@dataclass
class OfficialLoadReport:
    loaded: list[str] = field(default_factory=list)  # our parameter names that were filled
    unused: list[str] = field(default_factory=list)  # official names with no destination
    not_loaded: list[str] = field(default_factory=list)  # our parameters left as initialised


def convert_official_state_dict(official: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official GLIP names -> this project's names. Returns (converted, unused official names)."""
    state = {k.removeprefix("module."): v for k, v in official.items()}
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        for pattern, target in _DIRECT:
            if re.match(pattern, name):
                out[re.sub(pattern, target, name)] = tensor
                break
        else:
            m = re.match(r"^rpn\.head\.dyhead_tower\.(\d+)\.(.*)$", name)
            if not m:
                unused.append(name)
                continue
            index, rest = int(m.group(1)), m.group(2)
            layer, role = divmod(index, 3)
            if role == 0 and rest.startswith("b_attn."):
                out[f"head.fusion.{layer}.{rest.removeprefix('b_attn.')}"] = tensor
            elif role == 1 and (qm := re.match(r"^attention\.self\.(query|key|value)\.(weight|bias)$", rest)):
                qkv.setdefault(layer, {})[f"{qm.group(1)}.{qm.group(2)}"] = tensor
            elif role == 1 and (bm := re.match(r"^(.*)\.(weight|bias)$", rest)) and bm.group(1) in _BERT_LAYER:
                out[f"head.text_layers.{layer}.{_BERT_LAYER[bm.group(1)]}.{bm.group(2)}"] = tensor
            else:
                unused.append(name)
    for layer, parts in qkv.items():
        for kind in ("weight", "bias"):
            pieces = [parts.get(f"{p}.{kind}") for p in ("query", "key", "value")]
            if all(p is not None for p in pieces):
                out[f"head.text_layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(pieces, 0)
    return out, unused


def load_official(model: GLIPv2, path: str) -> OfficialLoadReport:
    """Fill `model` (the glip-t preset) from an official GLIP checkpoint file."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"official checkpoint {path} is corrupt or not a torch file: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path} is not an official GLIP checkpoint (no 'model' dict)")
    converted, unused = convert_official_state_dict(raw["model"])
    own = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in converted.items()
                  if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{path} does not fit the {model.cfg.preset!r} model: {mismatched[:3]}")
    unknown = [k for k in converted if k not in own]
    usable = {k: v for k, v in converted.items() if k in own}
    model.load_state_dict(usable, strict=False)
    return OfficialLoadReport(
        loaded=sorted(usable),
        unused=sorted(unused + unknown),
        not_loaded=sorted(k for k in own if k not in usable and not k.startswith("mlm_head")),
    )
