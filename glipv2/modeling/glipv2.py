"""GLIPv2: the one model definition used by training, export and serving."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from glipv2.boxes import anchor_grid
from glipv2.config import ModelConfig
from glipv2.modeling import box_ops
from glipv2.modeling.box_refine import BoxRefiner
from glipv2.modeling.convnet import ConvBackbone
from glipv2.modeling.fpn import FPN
from glipv2.modeling.head import GroundingHead, HeadOutput
from glipv2.modeling.language import TextEncoder
from glipv2.modeling.caption import CaptionDecoder
from glipv2.modeling.mlm import MLMHead
from glipv2.modeling.vqa import ExtremeLogits, VqaHead


@dataclass
class DetectorOutput:
    boxes: torch.Tensor  # [B, A, 4] xyxy, model-input (letterboxed) pixels
    logits: torch.Tensor  # [B, A, T] region-token alignment logits
    centerness: torch.Tensor  # [B, A] logits
    head: HeadOutput  # raw head tensors, for the losses
    edges: torch.Tensor | None = None  # the box refiner's edge maps (see `top_k`), when it has one


class GLIPv2(nn.Module):
    """image [B, 3, H, W] (RGB, 0-255, letterboxed to cfg.image_hw) + prompt tokens -> detections.

    Parts can be passed in (tests build small ones); None builds them from the config.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        backbone: nn.Module | None = None,
        text_encoder: TextEncoder | None = None,
        pretrained_text: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else _build_backbone(cfg)
        extra = len(cfg.strides) - len(self.backbone.out_channels)
        self.fpn = FPN(list(self.backbone.out_channels), cfg.fpn_channels, extra_levels=extra)
        self.language = text_encoder if text_encoder is not None else TextEncoder(cfg.text_encoder, pretrained_text)
        if self.language.dim != cfg.text_dim:
            raise ValueError(f"text encoder width {self.language.dim} != ModelConfig.text_dim {cfg.text_dim}")
        if cfg.freeze_text:
            self.language.requires_grad_(False)
        self.head = GroundingHead(cfg)
        self.mlm_head = MLMHead(cfg.text_dim, self.language.word_embeddings)  # training only
        self.vqa_head = VqaHead(cfg) if cfg.vqa_answers else None
        self.caption_decoder = CaptionDecoder(cfg, self._object_prompt()) if cfg.caption_tokens else None
        self.box_refiner = BoxRefiner() if cfg.box_refinement else None
        anchors, _ = anchor_grid(cfg.image_hw, cfg.strides, cfg.anchor_scale)
        self.register_buffer("anchors", torch.as_tensor(anchors, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        if cfg.grounding_appearance:
            # Each cell's mean colour and its (x, y) in [-1, 1] added to the FPN maps before
            # fusion, so "red" and "left" have something to attend to (zero-initialised last
            # layer: weights trained without it load unchanged).
            c = cfg.fpn_channels
            self.appearance_embed = nn.Sequential(nn.Conv2d(5, c, 1), nn.ReLU(), nn.Conv2d(c, c, 1))
            nn.init.zeros_(self.appearance_embed[-1].weight)
            nn.init.zeros_(self.appearance_embed[-1].bias)
            for i, (lh, lw) in enumerate(cfg.level_hw):
                ys = (torch.arange(lh, dtype=torch.float32) + 0.5) / lh * 2 - 1
                xs = (torch.arange(lw, dtype=torch.float32) + 0.5) / lw * 2 - 1
                grid = torch.stack([xs[None].expand(lh, -1), ys[:, None].expand(-1, lw)])[None]
                self.register_buffer(f"coords{i}", grid, persistent=False)  # [1, 2, h, w]
        else:
            self.appearance_embed = None

    def train(self, mode: bool = True) -> "GLIPv2":
        super().train(mode)
        if self.cfg.freeze_text:
            self.language.eval()  # a frozen encoder keeps its dropout off
        return self

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] ids + mask -> token features [B, T, Dt]; cacheable per prompt."""
        if self.cfg.freeze_text:
            with torch.no_grad():
                return self.language(input_ids, attention_mask)
        return self.language(input_ids, attention_mask)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB 0-255 (any dtype, any spatial size) -> the backbone's input scale and order."""
        x = pixels.to(self.pixel_mean.dtype)
        if self.cfg.bgr:
            x = x.flip(1)
        return (x - self.pixel_mean) / self.pixel_std

    def visual(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] RGB 0-255 (any dtype) -> FPN maps; shared by every task.

        With cfg.grounding_appearance the maps also carry each cell's colour and position."""
        h, w = self.cfg.image_hw
        torch._assert(images.shape[-2] == h and images.shape[-1] == w, "images must be letterboxed to cfg.image_hw")
        feats = self.fpn(self.backbone(self.normalize(images)))
        if self.appearance_embed is None:
            return feats
        out = []
        for i, (f, c) in enumerate(zip(feats, self.cell_colours(images))):
            coords = getattr(self, f"coords{i}").expand(f.shape[0], -1, -1, -1).to(f.dtype)
            out.append(f + self.appearance_embed(torch.cat([c.to(f.dtype), coords], dim=1)))
        return out

    def cell_colours(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images RGB 0-255 -> each FPN cell's mean colour, normalised like the input
        ([B, 3, h, w] per level)."""
        # Pool, then normalise the small maps (the normalisation is per-channel affine, so the
        # order does not matter and the full-size image is not normalised a second time).
        return [self.pooled_colours(images, s) for s in self.cfg.strides]

    def pooled_colours(self, images: torch.Tensor, stride: int) -> torch.Tensor:
        """images RGB 0-255 -> mean colour of each stride x stride cell, normalised like the
        input ([B, 3, h, w])."""
        x = images.to(self.pixel_mean.dtype)
        return self.normalize(nn.functional.avg_pool2d(x, stride, stride, ceil_mode=True))

    def appearance(self, images: torch.Tensor, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """FPN maps with the image's mean colour over each cell appended ([B, C + 3, h, w]).

        What the understanding heads read. Measured on the detection-trained tiny model: a
        linear probe reads an object's colour from the raw pixels at its centre every time,
        but from the FPN feature there only 23% of the time (chance: 17%); the BatchNorm
        backbone keeps shape and drops absolute colour, which "what color is..." and
        captions need. The pooled pixels give it back at no cost."""
        return [torch.cat([f, c.to(f.dtype)], dim=1) for f, c in zip(feats, self.cell_colours(images))]

    def detect(self, images: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> DetectorOutput:
        """images [B, 3, H, W] RGB 0-255 (any dtype) + token features -> per-anchor outputs."""
        feats = self.visual(images)
        colours = self.cell_colours(images) if self.cfg.grounding_appearance else None
        out = self.detect_features(feats, text, text_mask, colours)
        if self.box_refiner is None:
            return out
        return replace(out, edges=self.box_refiner.edge_maps(self.normalize(images)))

    def detect_features(self, feats: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor,
                        colours: list[torch.Tensor] | None = None, compare: bool = True) -> DetectorOutput:
        """colours: `cell_colours` of the image, needed when cfg.grounding_appearance.
        compare: False leaves out the candidate comparison (the VQA head's pass, see `answer`)."""
        out = self.head(feats, text, text_mask)
        boxes = box_ops.decode(self.anchors[None], out.box_deltas)
        if self.cfg.grounding_appearance:
            if colours is None:
                raise ValueError("this model grounds with the cells' colours: pass colours=cell_colours(images)")
            flat = box_ops.per_anchor(colours).to(out.regions.dtype)
            out = replace(out, regions=out.regions + self.head.region_extras(flat, boxes))
        logits = self.head.align(out.regions, out.tokens, out.token_bias)
        if compare and self.head.candidate_comparison is not None:
            logits = logits + self.head.candidate_comparison(logits, out.centerness, boxes, self.cfg.image_hw,
                                                             out.fused_text, text_mask)
        return DetectorOutput(boxes, logits, out.centerness, out)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_features: torch.Tensor | None = None,
    ) -> DetectorOutput:
        """text_features, when given (e.g. from a prompt cache), replace the text encoder."""
        if text_features is None:
            text_features = self.encode_text(input_ids, attention_mask)
        return self.detect(images, text_features, attention_mask)

    def answer(self, feats: list[torch.Tensor], looks: list[torch.Tensor], question: torch.Tensor,
               question_mask: torch.Tensor, with_extremes: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, ExtremeLogits]:
        """FPN maps, their appearance maps and question token features -> answer logits
        [B, num_answers], through a detector pass whose prompt is the question (with_extremes:
        and the VQA head's extremes' objectness and gate logits, for training)."""
        if self.vqa_head is None:
            raise RuntimeError("this model has no VQA head (trained without VQA data)")
        colours = [look[:, -3:] for look in looks] if self.cfg.grounding_appearance else None
        # Without the candidate comparison: the VQA extremes compare the candidates
        # themselves. (Measured once each, relation questions were 0.693 with it in this
        # pass and 0.698 without: the choice is not what lowered them from 0.78.)
        out = self.detect_features(feats, question, question_mask, colours, compare=False)
        return self.vqa_head(looks, out.boxes, out.logits, out.centerness, out.head.regions, out.head.fused_text,
                             question_mask, with_extremes)

    def vqa(self, images: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """images + question token features -> answer logits [B, num_answers]."""
        feats = self.visual(images)
        return self.answer(feats, self.appearance(images, feats), question, question_mask)

    def _object_prompt(self) -> torch.Tensor | None:
        """Token features of cfg.caption_object_prompt (None without object tokens). From a
        checkpoint, the stored ones replace these."""
        if not (self.cfg.caption_tokens and self.cfg.caption_objects):
            return None
        from glipv2.text import Tokenizer

        ids = torch.as_tensor(Tokenizer(max_tokens=self.cfg.max_tokens).encode(self.cfg.caption_object_prompt).ids)
        return self.encode_text(ids[None], torch.ones_like(ids[None]))

    def caption_objects(self, images: torch.Tensor, feats: list[torch.Tensor], looks: list[torch.Tensor]
                        ) -> torch.Tensor:
        """The caption decoder's object tokens' inputs [B, K, object_input_size]: the K anchors
        the detector scores best for the object prompt (`anchor_scores`), each with its
        region embedding, appearance, box geometry, score and the input's colour at its box
        centre (4-pixel cells: an object's own colour, where the anchor's cell mixes in the
        background). With the grid memory alone, 54 of the pairs named in 200 val captions
        were absent (a present shape in another colour, or a present colour on another
        shape): the grid leaves the decoder to bind shape and colour, a token holds both.

        Not trained by the caption loss: the detector's outputs are inputs here."""
        dec = self.caption_decoder
        b = images.shape[0]
        with torch.no_grad():
            text = dec.object_prompt.expand(b, -1, -1)
            mask = torch.ones(text.shape[:2], dtype=torch.int64, device=text.device)
            colours = [look[:, -3:] for look in looks] if self.cfg.grounding_appearance else None
            out = self.detect_features(feats, text, mask, colours)
            score = self.anchor_scores(out, mask)  # [B, A]
            idx = score.topk(self.cfg.caption_objects, dim=1).indices  # [B, K], best first
            visual = box_ops.per_anchor(looks)  # [B, A, C + 3]

            def pick(t: torch.Tensor) -> torch.Tensor:
                return box_ops.gather_rows(t, idx)

            geometry = box_ops.box_geometry(pick(out.boxes), self.cfg.image_hw)
            fine = self.pooled_colours(images, 4)
            h, w = fine.shape[-2:]
            col = (geometry[..., 0] * w).long().clamp(0, w - 1)
            row = (geometry[..., 1] * h).long().clamp(0, h - 1)
            centre = box_ops.gather_rows(box_ops.per_anchor([fine]), row * w + col)
            parts = [pick(out.head.regions), pick(visual), geometry, score.gather(1, idx)[..., None], centre]
            return torch.cat([p.to(visual.dtype) for p in parts], dim=-1)

    def caption_memory(self, images: torch.Tensor, feats: list[torch.Tensor], looks: list[torch.Tensor]
                       ) -> torch.Tensor:
        """Images, their FPN maps and appearance maps (see `appearance`) -> the caption
        decoder's memory (the grid, then the object tokens where the model has them)."""
        if self.caption_decoder is None:
            raise RuntimeError("this model has no caption decoder (trained without captions)")
        objects = self.caption_objects(images, feats, looks) if self.cfg.caption_objects else None
        return self.caption_decoder.memory(looks, objects)

    def caption_start(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images -> the first decoding step from the start token: (log-probabilities [B, V],
        self-attention cache k, v [B, L, H, 1, d], cross-attention k, v [B, L, H, M, d])."""
        dec = self.caption_decoder
        feats = self.visual(images)
        cross_k, cross_v = dec.cross_keys_values(self.caption_memory(images, feats, self.appearance(images, feats)))
        start = torch.full((images.shape[0],), self.cfg.caption_start_index, dtype=torch.int64, device=images.device)
        logprobs, past_k, past_v = dec.step(start, cross_k, cross_v)
        return logprobs, past_k, past_v, cross_k, cross_v

    @staticmethod
    def anchor_scores(out: DetectorOutput, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each anchor's best token score [B, A]: max over real tokens of sigmoid(logit) *
        sigmoid(centerness), an upper bound of every phrase score the postprocess can compute
        from that anchor."""
        pad = attention_mask[:, None, :] == 0
        return out.logits.masked_fill(pad, -1e4).amax(-1).sigmoid() * out.centerness.sigmoid()

    def top_k(self, out: DetectorOutput, attention_mask: torch.Tensor, k: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the k anchors with the best token score, so only K x T leaves the graph;
        with a box refiner, their boxes are refined (only the K kept: it costs little).

        Score: `anchor_scores`.
        """
        best = self.anchor_scores(out, attention_mask)  # [B, A]
        k = min(k, best.shape[1])
        idx = best.topk(k, dim=1).indices  # [B, K]
        boxes = box_ops.gather_rows(out.boxes, idx)
        logits = box_ops.gather_rows(out.logits, idx)
        ctr = out.centerness.gather(1, idx)
        if self.box_refiner is not None:
            if out.edges is None:
                raise ValueError("this model refines its boxes: pass the output of `detect`, which has the edge maps")
            boxes = self.box_refiner(out.edges, boxes, self.cfg.image_hw)
        return boxes, logits, ctr


def _build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone == "convnet":
        return ConvBackbone(cfg.backbone_widths)
    from glipv2.modeling.swin import SwinTransformer

    return SwinTransformer(embed_dim=cfg.swin_embed_dim, depths=cfg.swin_depths, num_heads=cfg.swin_heads)


def build_model(cfg: ModelConfig, pretrained_text: bool = True) -> GLIPv2:
    return GLIPv2(cfg, pretrained_text=pretrained_text)
