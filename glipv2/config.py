"""Model presets.

Frozen dataclasses, validated on construction, never read from the environment: the same
config object travels inside every checkpoint and export manifest, so what was trained is
exactly what is served.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MAX_TOKENS = 256
# How a phrase's probability comes from its tokens' (glipv2.postprocess.phrase_probabilities).
TOKEN_AGGREGATIONS = ("mean", "geometric")
PHRASE_TOKENS = ("all", "head")  # see glipv2.postprocess.PostprocessConfig
# ModelConfig fields that only serving reads (how detections are scored from the same
# outputs, which words a caption may use, which phrases it checks): the weights do not
# depend on them, so a release may change them (training.release) and a run may start from
# weights that had others (glipv2.checkpoint.init_weights).
SERVING_FIELDS = ("threshold_on", "token_aggregation", "phrase_tokens", "caption_words", "caption_checked_phrases",
                  "caption_check_threshold")


@dataclass(frozen=True)
class ModelConfig:
    preset: str
    # Input: images are letterboxed to this fixed (h, w); normalisation happens in the graph.
    image_hw: tuple[int, int]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    bgr: bool  # official GLIP weights expect BGR 0-255
    # Visual backbone.
    backbone: str  # "convnet" | "swin"
    backbone_widths: tuple[int, ...]  # convnet: stem, stride 4, 8, 16, 32 widths
    swin_embed_dim: int
    swin_depths: tuple[int, ...]
    swin_heads: tuple[int, ...]
    fpn_channels: int
    strides: tuple[int, ...]  # FPN levels; stride 8 is P3
    anchor_scale: float  # anchor side = anchor_scale * stride
    # Language encoder.
    text_encoder: str  # "minilm" (pretrained, from the PyPI package) | "bert-base" (random init)
    text_dim: int
    freeze_text: bool
    max_tokens: int
    # Deep fusion and head.
    fusion_layers: int
    fusion_heads: int
    fusion_dim: int
    fusion_layer_scale: float
    fusion_text_layer: bool  # a BERT-style self-attention layer on the text after each fusion
    tower_groups: int  # GroupNorm groups in the conv tower
    proj_dim: int  # region-token alignment dimension
    prior_prob: float = 0.01
    vocab_size: int = 30522
    head_kernel: int = 3  # bbox / centerness conv kernel; official GLIP uses 1x1
    # "conv": plain 3x3 conv + GroupNorm + ReLU per level; "dyhead": GLIP's DyConv layers
    # (deformable convs across levels, scale-aware attention, DyReLU; modeling/dyhead.py).
    tower: str = "conv"
    # Preprocessing and postprocessing rules that travel to the manifest (official GLIP:
    # long side capped at 1333, padding with the mean, threshold on the phrase probability).
    resize_max_side: int = 0  # 0 = only fit the image_hw canvas
    pad_with_mean: bool = False
    threshold_on: str = "score"  # see glipv2.postprocess.PostprocessConfig
    token_aggregation: str = "mean"  # a phrase's probability from its tokens': see PostprocessConfig
    phrase_tokens: str = "all"  # which of a phrase's tokens score it: see PostprocessConfig
    fusion_norm_residual: bool = False  # GLIP adds the fusion update to the normed input
    # Grounding reads each cell's mean colour and position (added to the FPN maps before
    # fusion) and each anchor's colour and predicted box (added to its region embedding):
    # see GLIPv2.cell_colours and GroundingHead.region_extras. Off for official GLIP.
    grounding_appearance: bool = False
    # Phrase words compare candidates ("large star", "left of the hexagon"): see
    # glipv2.modeling.comparison. Off for official GLIP.
    grounding_comparison: bool = False
    # Each kept box's sides looked at again on a stride-2 edge map: see
    # glipv2.modeling.box_refine. Off for official GLIP.
    box_refinement: bool = False
    # Understanding heads. Their vocabularies come from the training annotations (set by
    # the training run, empty in the presets): no answers = no VQA head, no caption
    # tokens = no caption decoder.
    vqa_answers: tuple[str, ...] = ()
    vqa_dim: int = 64
    vqa_layers: int = 2
    vqa_extremes: bool = False  # see glipv2.modeling.vqa.Extremes
    # Count features: soft counts of score-map peaks above these scores (learned from these
    # starting values); empty = the peaks' score mass only. See VqaHead._counts.
    vqa_count_thresholds: tuple[float, ...] = ()
    caption_tokens: tuple[int, ...] = ()  # WordPiece ids the decoder can emit (its shortlist)
    # The whole words of the training captions (WordPieces joined): decoding never leaves
    # a word unfinished ("a red hexa") where a piece the rules refuse cut it short. Empty:
    # no word check (glipv2.captioning.MentionRules). Serving reads it, the weights do not.
    caption_words: tuple[str, ...] = ()
    caption_start_id: int = 101  # [CLS] of the BERT uncased vocabulary starts a caption
    caption_end_id: int = 102  # [SEP] ends it
    caption_dim: int = 128
    caption_layers: int = 2
    caption_heads: int = 4
    caption_max_len: int = 40  # tokens, [CLS] and [SEP] included
    # Object tokens beside the grid in the caption decoder's memory: the detector's
    # caption_objects best anchors for caption_object_prompt (the object words the captions
    # name), each with its region embedding, appearance, box, score and the pixel colour at
    # its box centre. See GLIPv2.caption_objects. 0 = the grid alone.
    caption_objects: int = 0
    caption_object_prompt: str = ""
    # Detector-checked captions: before decoding, the detector grounds these phrases on the
    # image, and a caption names one ("a red circle", "two red circles") only where one
    # scored at least caption_check_threshold; elsewhere the beam takes its next best word
    # (glipv2.captioning.CheckedRules, glipv2.runtime.batch). Serving reads them, the
    # weights do not. Empty: no check.
    caption_checked_phrases: tuple[str, ...] = ()
    caption_check_threshold: float = 0.4

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig.{name}: {why} (got {getattr(self, name)!r})")

        need(self.backbone in ("convnet", "swin"), "backbone", "must be 'convnet' or 'swin'")
        need(self.text_encoder in ("minilm", "bert-base"), "text_encoder", "must be 'minilm' or 'bert-base'")
        need(len(self.image_hw) == 2 and all(s > 0 for s in self.image_hw), "image_hw", "must be two positive ints")
        # Feature maps are ceil(size / stride) on every level (as anchor_grid assumes);
        # multiples of 32 keep the backbone free of padding corner cases.
        need(all(s % 32 == 0 for s in self.image_hw), "image_hw", "must be multiples of 32")
        need(list(self.strides) == sorted(self.strides) and self.strides[0] == 8, "strides",
             "must be increasing and start at 8 (P3)")
        need(0 < self.max_tokens <= MAX_TOKENS, "max_tokens", f"must be in 1..{MAX_TOKENS}")
        need(self.fusion_layers >= 0, "fusion_layers", "must be >= 0")
        need(self.fusion_dim % self.fusion_heads == 0, "fusion_dim", "must be divisible by fusion_heads")
        need(self.fpn_channels % self.tower_groups == 0, "fpn_channels", "must be divisible by tower_groups")
        need(0.0 < self.prior_prob < 1.0, "prior_prob", "must be in (0, 1)")
        need(self.head_kernel in (1, 3), "head_kernel", "must be 1 or 3")
        need(self.tower in ("conv", "dyhead"), "tower", "must be 'conv' or 'dyhead'")
        need(self.threshold_on in ("score", "probability"), "threshold_on", "must be 'score' or 'probability'")
        need(self.token_aggregation in TOKEN_AGGREGATIONS, "token_aggregation", f"must be one of {TOKEN_AGGREGATIONS}")
        need(self.phrase_tokens in PHRASE_TOKENS, "phrase_tokens", f"must be one of {PHRASE_TOKENS}")
        need(self.resize_max_side >= 0, "resize_max_side", "must be >= 0")
        need(len(self.pixel_mean) == 3 and len(self.pixel_std) == 3, "pixel_mean", "mean and std need 3 values")
        need(len(set(self.vqa_answers)) == len(self.vqa_answers), "vqa_answers", "must be distinct")
        need(len(set(self.caption_tokens)) == len(self.caption_tokens), "caption_tokens", "must be distinct")
        need(not self.caption_tokens or {self.caption_start_id, self.caption_end_id} <= set(self.caption_tokens),
             "caption_tokens", "must include caption_start_id and caption_end_id")
        need(isinstance(self.caption_words, tuple)
             and all(isinstance(w, str) and w and w == w.strip() and " " not in w for w in self.caption_words),
             "caption_words", "must be a list of words without spaces")
        need(isinstance(self.caption_checked_phrases, tuple)
             and all(isinstance(p, str) and p == " ".join(p.lower().split()) and p
                     and all(w.isalnum() for w in p.split()) for p in self.caption_checked_phrases)
             and len(set(self.caption_checked_phrases)) == len(self.caption_checked_phrases),
             "caption_checked_phrases", "must be distinct lower-case phrases of words (letters and digits: "
             "captions spell punctuation as words of its own) separated by single spaces")
        need(isinstance(self.caption_check_threshold, (int, float)) and not isinstance(self.caption_check_threshold, bool)
             and 0 < self.caption_check_threshold < 1, "caption_check_threshold", "must be a score in (0, 1)")
        need(self.caption_dim % self.caption_heads == 0, "caption_dim", "must be divisible by caption_heads")
        need(self.vqa_dim % 4 == 0, "vqa_dim", "must be divisible by 4 (attention heads)")
        need(all(isinstance(t, (int, float)) and 0 < t < 1 for t in self.vqa_count_thresholds),
             "vqa_count_thresholds", "must be scores in (0, 1)")
        need(2 < self.caption_max_len <= self.max_tokens, "caption_max_len", "must be in 3..max_tokens")
        need(isinstance(self.caption_objects, int) and 0 <= self.caption_objects <= self.num_anchors,
             "caption_objects", f"must be an int from 0 to the number of anchors ({self.num_anchors})")
        need(not self.caption_objects or bool(self.caption_object_prompt.strip()), "caption_objects",
             "needs caption_object_prompt, the object words the detector looks for")
        # The prompt's token features are stored with the decoder: a text encoder that trains
        # would leave them stale.
        need(not self.caption_objects or self.freeze_text, "caption_objects", "needs freeze_text")

    @property
    def bias0_init(self) -> float:
        return -math.log((1 - self.prior_prob) / self.prior_prob)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**tuples)

    @property
    def level_hw(self) -> list[tuple[int, int]]:
        """(height, width) of each FPN level's map: one anchor per location."""
        h, w = self.image_hw
        return [(math.ceil(h / s), math.ceil(w / s)) for s in self.strides]

    @property
    def num_anchors(self) -> int:
        """Anchors per image: one per location of every level."""
        return sum(h * w for h, w in self.level_hw)

    @property
    def caption_grid_length(self) -> int:
        """Caption decoder memory tokens of the grid: P4 (with P3 pooled onto its grid, for
        small objects), then P5."""
        (h4, w4), (h5, w5) = self.level_hw[1:3]
        return h4 * w4 + h5 * w5

    @property
    def caption_memory_length(self) -> int:
        """Caption decoder memory tokens: the grid, then the object tokens. Here (torch-free)
        because the exported signature needs it too."""
        return self.caption_grid_length + self.caption_objects

    @property
    def caption_start_index(self) -> int:
        """Decoder index (position in caption_tokens) of the start token."""
        return self.caption_tokens.index(self.caption_start_id)

    @property
    def caption_end_index(self) -> int:
        return self.caption_tokens.index(self.caption_end_id)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_RGB_STD = (58.395, 57.12, 57.375)

PRESETS: dict[str, ModelConfig] = {
    # Trains on a 2-core CPU in minutes: small conv backbone, frozen pretrained MiniLM.
    "tiny": ModelConfig(
        preset="tiny",
        image_hw=(256, 256),
        pixel_mean=_IMAGENET_RGB_MEAN,
        pixel_std=_IMAGENET_RGB_STD,
        bgr=False,
        backbone="convnet",
        backbone_widths=(16, 32, 64, 128, 256),
        swin_embed_dim=96,
        swin_depths=(2, 2, 6, 2),
        swin_heads=(3, 6, 12, 24),
        fpn_channels=64,
        strides=(8, 16, 32),
        anchor_scale=4.0,
        text_encoder="minilm",
        text_dim=384,
        freeze_text=True,
        max_tokens=MAX_TOKENS,
        fusion_layers=2,
        fusion_heads=1,  # one narrow head: fusion is most of a CPU training step
        fusion_dim=64,
        fusion_layer_scale=0.1,
        fusion_text_layer=False,
        tower_groups=16,
        proj_dim=64,
        grounding_appearance=True,
        token_aggregation="geometric",
        phrase_tokens="head",
        vqa_extremes=True,
        vqa_count_thresholds=(0.15, 0.2, 0.3),
    ),
    # Official GLIP-T (configs/pretrain/glip_Swin_T_O365.yaml): Swin-T, FPN P3-P7 at 256,
    # bert-base, 6 x [MHA-B fusion, BERT layer, DyConv], ATSS anchors 64..1024.
    "glip-t": ModelConfig(
        preset="glip-t",
        image_hw=(800, 1344),
        pixel_mean=(103.53, 116.28, 123.675),
        pixel_std=(57.375, 57.12, 58.395),
        bgr=True,
        backbone="swin",
        backbone_widths=(),
        swin_embed_dim=96,
        swin_depths=(2, 2, 6, 2),
        swin_heads=(3, 6, 12, 24),
        fpn_channels=256,
        strides=(8, 16, 32, 64, 128),
        anchor_scale=8.0,
        text_encoder="bert-base",
        text_dim=768,
        freeze_text=False,
        max_tokens=MAX_TOKENS,
        fusion_layers=6,
        fusion_heads=8,
        fusion_dim=2048,
        fusion_layer_scale=1.0 / 6,  # GLIP: 1 / NUM_CONVS
        fusion_text_layer=True,
        tower_groups=16,
        proj_dim=256,
        head_kernel=1,
        tower="dyhead",
        fusion_norm_residual=True,
        resize_max_side=1333,
        pad_with_mean=True,
        threshold_on="probability",
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class LossConfig:
    """Weights of the training losses; a weight of 0 switches that loss off."""

    grounding: float = 1.0
    box_giou: float = 2.0
    box_refine: float = 1.0  # L1 of the refined sides, in input pixels (models with box_refinement)
    centerness: float = 1.0
    contrastive: float = 0.5  # GLIPv2 inter-image region-word loss
    mlm: float = 0.1
    vqa: float = 0.0  # answer BCE; > 0 gives the model a VQA head
    caption: float = 0.0  # caption cross-entropy (teacher forcing); > 0 gives it a caption decoder
    mlm_fraction: float = 0.25  # share of prompts in a batch that get masked tokens
    mlm_probability: float = 0.15
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    atss_topk: int = 9
    contrastive_max_regions: int = 16  # positive regions per image sampled for the contrastive loss

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v < 0:
                raise ValueError(f"LossConfig.{f.name} must be >= 0 (got {v})")
        for name in ("mlm_fraction", "mlm_probability", "focal_alpha"):
            if getattr(self, name) > 1:
                raise ValueError(f"LossConfig.{name} must be <= 1 (got {getattr(self, name)})")


__all__ = ["MAX_TOKENS", "ModelConfig", "LossConfig", "PRESETS", "get_preset"]
