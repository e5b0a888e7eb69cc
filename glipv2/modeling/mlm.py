"""Masked language modelling head over the fused text features (a GLIPv2 training loss)."""

from __future__ import annotations

import torch
from torch import nn


class MLMHead(nn.Module):
    """Fused token features [N, Dt] -> vocabulary logits [N, V].

    The decoder is tied to the text encoder's word embeddings, as in BERT, so the head
    adds only a transform and a bias.
    """

    def __init__(self, dim: int, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.word_embeddings = [word_embeddings]  # a list: tied, not registered twice
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.transform(features) @ self.word_embeddings[0].weight.t() + self.bias
