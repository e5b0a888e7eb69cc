"""Caption decoder: a small pre-norm transformer decoder over the image's FPN features.

Vocabulary: a shortlist of the text encoder's WordPiece ids (those that occur in the
training captions, plus [CLS] as start and [SEP] as end), stored in the model config.
Decoding over the 30k-word vocabulary would cost a 30k-wide softmax per step for words
the captions never use; the ids stay WordPiece ids, so the tokenizer decodes them.

Two ways to run the same weights:
- `forward`: teacher forcing over a whole caption with a causal mask (training);
- `start` / `step`: one token at a time with a key/value cache (inference, ONNX export).
  Cross-attention keys/values are computed once per image (`cross_keys_values`); the
  self-attention cache grows by one position per step. A test checks both paths agree.
  Caches are batch-first, [B, L, H, t, d] (L layers, H heads), as Triton wants batch axes.
"""

from __future__ import annotations

import torch
from torch import nn

from glipv2.config import ModelConfig
from glipv2.modeling.attention import TransformerLayer



# Per object token: region embedding, appearance (FPN + cell colour), box geometry (5),
# score (1) and the pixel colour at the box centre (3).
def object_input_size(cfg: ModelConfig) -> int:
    return cfg.proj_dim + cfg.fpn_channels + 3 + 5 + 1 + 3


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, object_prompt: torch.Tensor | None = None) -> None:
        """object_prompt: token features [1, T, text_dim] of cfg.caption_object_prompt
        (stored with the weights), needed when cfg.caption_objects."""
        super().__init__()
        d = cfg.caption_dim
        self.max_len = cfg.caption_max_len
        self.memory_proj = nn.Linear(cfg.fpn_channels + 3, d)  # appearance maps: FPN + mean colour
        self.memory_pos = nn.Parameter(torch.zeros(1, cfg.caption_grid_length, d))
        if cfg.caption_objects:
            if object_prompt is None:
                raise ValueError("ModelConfig.caption_objects needs the object prompt's token features")
            self.register_buffer("object_prompt", object_prompt.detach().clone())
            self.object_proj = nn.Linear(object_input_size(cfg), d)
            self.object_rank = nn.Parameter(torch.zeros(1, cfg.caption_objects, d))  # best first
            self.object_norm = nn.LayerNorm(d)
            nn.init.normal_(self.object_rank, std=0.02)
        else:
            self.object_proj = None
        self.memory_norm = nn.LayerNorm(d)
        # The cells' mean colour enters again after the LayerNorm, through its own small MLP:
        # as 3 of the 67 projected channels it was drowned (measured: colour-shape pairs right
        # in 14% of captions; 44% with this, after the same 300 decoder-only steps).
        self.colour_embed = nn.Sequential(nn.Linear(3, d), nn.GELU(), nn.Linear(d, d))
        self.embed = nn.Embedding(len(cfg.caption_tokens), d)
        self.pos = nn.Embedding(cfg.caption_max_len, d)
        self.layers = nn.ModuleList(TransformerLayer(d, cfg.caption_heads) for _ in range(cfg.caption_layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, len(cfg.caption_tokens))
        nn.init.normal_(self.memory_pos, std=0.02)
        self.register_buffer("token_ids", torch.tensor(cfg.caption_tokens, dtype=torch.int64), persistent=False)

    # ------------------------------------------------------------------ image side
    def memory(self, feats: list[torch.Tensor], objects: torch.Tensor | None = None) -> torch.Tensor:
        """Appearance maps of P3, P4, P5, ... (GLIPv2.appearance) and, with object tokens, their
        inputs [B, K, object_input_size] (GLIPv2.caption_objects) -> memory tokens [B, M, D]."""
        p3, p4, p5 = feats[0], feats[1], feats[2]
        p4 = p4 + nn.functional.avg_pool2d(p3, 2, 2, ceil_mode=True)
        flat = torch.cat([p4.flatten(2), p5.flatten(2)], dim=2).transpose(1, 2)  # [B, M, C + 3]
        grid = self.memory_norm(self.memory_proj(flat) + self.memory_pos) + self.colour_embed(flat[..., -3:])
        if self.object_proj is None:
            return grid
        if objects is None:
            raise ValueError("this decoder reads object tokens: pass GLIPv2.caption_objects")
        # The centre colour (the last 3 inputs) enters after the norm too, as the grid's does.
        tokens = self.object_norm(self.object_proj(objects) + self.object_rank) + self.colour_embed(objects[..., -3:])
        return torch.cat([grid, tokens], dim=1)

    def cross_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [B, M, D] -> cross-attention keys, values [B, L, H, M, d] (computed once per image)."""
        kv = [layer.cross_attn.keys_values(memory) for layer in self.layers]
        return torch.stack([k for k, _ in kv], dim=1), torch.stack([v for _, v in kv], dim=1)

    # ------------------------------------------------------------------ training
    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens [B, L] shortlist indices (start first) -> logits [B, L, V]."""
        n = tokens.shape[1]
        x = self.embed(tokens) + self.pos.weight[:n]
        causal = torch.full((n, n), -1e4, device=tokens.device).triu(1)
        cross_k, cross_v = self.cross_keys_values(memory)
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.keys_values(layer.norm_self(x))
            x = layer(x, k, v, causal, cross_k[:, i], cross_v[:, i])
        return self.out(self.norm(x))

    # ------------------------------------------------------------------ inference
    def step(self, tokens: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor,
             past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoding step for a batch in lockstep.

        tokens [B] shortlist indices at position t = past length (0 without a past);
        cross_k/v [B, L, H, M, d]; past_k/v [B, L, H, t, d] -> (log-probabilities [B, V],
        past_k/v grown to t + 1)."""
        if past_k is None:
            position = torch.zeros_like(tokens)
        else:  # the past length as data, not a Python int, so an exported graph keeps it dynamic
            position = torch.ones_like(past_k[:, 0, 0, :, 0]).sum(-1).to(tokens.dtype)
        x = self.embed(tokens[:, None]) + self.pos(position)[:, None]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.keys_values(layer.norm_self(x))
            if past_k is not None:
                k, v = torch.cat([past_k[:, i], k], dim=2), torch.cat([past_v[:, i], v], dim=2)
            new_k.append(k)
            new_v.append(v)
            x = layer(x, k, v, None, cross_k[:, i], cross_v[:, i])
        logprobs = self.out(self.norm(x[:, 0])).log_softmax(-1)
        return logprobs, torch.stack(new_k, dim=1), torch.stack(new_v, dim=1)
