"""Checkpoints: atomic writes, validated loads, and the model they rebuild.

A checkpoint is a dict {"format", "model_config", "model", ...training state}. When the
text encoder is frozen and pretrained (the tiny preset), its weights are left out: they
come from the installed package, which keeps the demo checkpoint small.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from glipv2.config import SERVING_FIELDS, ModelConfig

FORMAT = "glipv2-serve/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target:
    a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _skips_text_encoder(cfg: ModelConfig) -> bool:
    return cfg.freeze_text and cfg.text_encoder == "minilm"


def model_state(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if _skips_text_encoder(cfg):
        state = {k: v for k, v in state.items() if not k.startswith("language.")}
    return state


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only first: official GLIP files (plain tensors) never need more. This
        # project's training checkpoints also hold RNG states, which need the full loader.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {e}") from e
    from glipv2.official import convert_loaded, is_official

    if is_official(ckpt):  # microsoft/GLIP's {"model": {"module.*": tensor}}: convert on the fly
        return convert_loaded(ckpt, path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} checkpoint")
    return ckpt


def load_model_weights(model: torch.nn.Module, cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that reports every missing / unexpected / mis-shaped key by name."""
    expected = model_state(model, cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[:2]})")
        raise CheckpointError(f"{source} does not fit the {cfg.preset!r} model: " + "; ".join(parts))
    model.load_state_dict(state, strict=not _skips_text_encoder(cfg))


UNDERSTANDING_PREFIXES = ("vqa_head.", "caption_decoder.")
CAPTION_DECODER_SIZES = ("caption_dim", "caption_layers", "caption_heads", "caption_max_len")
APPEARANCE_PREFIXES = ("appearance_embed.", "head.region_colour.", "head.region_geometry.",
                       "head.candidate_comparison.", "box_refiner.")


def init_weights(model: torch.nn.Module, cfg: ModelConfig, path: str | os.PathLike[str]) -> None:
    """Start a new run from another run's weights: same model except, possibly, the
    understanding heads, which start fresh where the checkpoint has none."""
    ckpt = read_checkpoint(path)
    theirs = ModelConfig.from_dict(ckpt["model_config"])
    keep = SERVING_FIELDS + ("vqa_answers", "vqa_extremes", "vqa_count_thresholds", "caption_tokens",
                             "grounding_appearance", "grounding_comparison", "box_refinement", "caption_objects",
                             "caption_object_prompt")
    if not theirs.caption_tokens:  # no caption decoder there (a stage-1 checkpoint): its sizes say nothing
        keep += CAPTION_DECODER_SIZES
    if theirs.replace(**{k: getattr(cfg, k) for k in keep}) != cfg:
        raise CheckpointError(f"{path} was trained as another model ({theirs.preset!r}, other sizes); "
                              "--init-from needs the same preset and overrides")
    state = dict(ckpt["model"])
    expected = model_state(model, cfg)
    for k in list(state):
        if k.startswith(UNDERSTANDING_PREFIXES) and (k not in expected or state[k].shape != expected[k].shape):
            del state[k]  # another answer / token vocabulary: that head starts fresh
        elif k.startswith(APPEARANCE_PREFIXES) and k not in expected:
            del state[k]  # trained with the appearance paths, started without them
    # Heads it lacks start fresh, and so do the grounding appearance paths and the box
    # refiner (zero-initialised outputs: the model then grounds and boxes exactly as the
    # checkpoint did).
    fresh = {k: v for k, v in expected.items()
             if k.startswith(UNDERSTANDING_PREFIXES + APPEARANCE_PREFIXES) and k not in state}
    load_model_weights(model, cfg, {**state, **fresh}, f"checkpoint {path}")


def load_model(path: str | os.PathLike[str], preset: str | None = None, device: str = "cpu",
               image_hw: tuple[int, int] | None = None):
    """Rebuild the model a checkpoint was trained as. `preset`, when given, must match.
    image_hw, when given, replaces the input canvas (the weights do not depend on it)."""
    from glipv2.modeling.glipv2 import build_model

    ckpt = read_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid model_config: {e}") from e
    if preset is not None and cfg.preset != preset:
        raise CheckpointError(f"checkpoint {path} is a {cfg.preset!r} model, not {preset!r}")
    if image_hw is not None:
        try:
            cfg = cfg.replace(image_hw=tuple(int(v) for v in image_hw))
        except ValueError as e:
            raise CheckpointError(f"cannot export {path} at {image_hw}: {e}") from e
        ckpt = {**ckpt, "model_config": cfg.to_dict()}
    model = build_model(cfg)
    load_model_weights(model, cfg, ckpt["model"], f"checkpoint {path}")
    return model.to(device).eval(), ckpt


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
