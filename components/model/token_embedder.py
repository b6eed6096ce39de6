"""Token embedder head: predicts v*, the placeholder's word embedding, in the text encoder's
input-embedding space.

v* = origin + MLP(h). `origin` is the embedding of a real word (config `token_init_word`, e.g.
"object"), and the MLP's output layer is scaled so the per-image spread starts at `token_init_spread`
times the mean token-embedding norm: the first predictions are in distribution, near a word the text
encoder knows, never at an arbitrary scale.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def nearest_tokens(v: Tensor, table: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """Cosine similarities (N, k) and row indices (N, k) of the k rows of `table` nearest to each v.

    Similarities stay differentiable in v (the regularisers pull along them)."""
    sims = F.normalize(v, dim=-1) @ F.normalize(table.to(v.dtype), dim=-1).T
    return sims.topk(min(k, table.shape[0]), dim=-1)


class TokenEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, origin: Tensor, token_norm: float, spread: float):
        super().__init__()
        dim = origin.shape[-1]
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        self.register_buffer("origin", origin.detach().clone().float())
        # LayerNorm output has unit-variance entries, so this std gives offsets of norm ~ spread * token_norm
        nn.init.normal_(self.mlp[-1].weight, std=spread * token_norm / math.sqrt(dim * hidden))
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.origin + self.mlp(h)
