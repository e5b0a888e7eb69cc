"""Images + prompts -> detections around any engine (PyTorch, ONNX Runtime, Triton).

numpy only: the steps every backend shares (letterbox, tokenize, pad, postprocess) live
here once; an engine only maps (uint8 images, token ids, mask) to the detector's top-K
outputs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from glipv2.image import letterbox_batch
from glipv2.postprocess import Detections, PostprocessConfig, postprocess_batch
from glipv2.text import DEFAULT_BUCKETS, Prompt, Tokenizer, pad_batch, tokenize

# (images uint8 [B,3,H,W], input_ids [B,T], attention_mask [B,T]) -> (boxes [B,K,4], logits [B,K,T], centerness [B,K])
Engine = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


class DetectionPipeline:
    def __init__(
        self,
        engine: Engine,
        image_hw: tuple[int, int],
        tokenizer: Tokenizer | None = None,
        postprocess: PostprocessConfig = PostprocessConfig(),
        buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    ) -> None:
        self.engine = engine
        self.image_hw = tuple(image_hw)
        self.tokenizer = tokenizer or Tokenizer()
        self.postprocess = postprocess
        self.buckets = buckets

    def predict(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> list[Detections]:
        """One prompt per image (prompts may differ in length and phrase count)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels, boxes_map = letterbox_batch(images, self.image_hw)
        tb = pad_batch([tokenize(self.tokenizer, p) for p in prompts], self.buckets, pad_id=self.tokenizer.pad_id)
        boxes, logits, ctr = self.engine(pixels, tb.input_ids, tb.attention_mask)
        return postprocess_batch(boxes, logits, ctr, tb.positive_map, boxes_map, self.postprocess)
