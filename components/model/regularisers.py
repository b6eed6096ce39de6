"""Regularisers of the two heads (paper section 4.2-4.3).

Embedding variants (config `encoder.regulariser`, for the ablation):
  none         nothing
  l2           ||v*||^2 (Eq. 4)
  nn-cosine    ||v*||^2 + (1 - cos(v*, nearest real token)): a VQ-codebook pull, no negatives
  contrastive  ||v*||^2 + Eq. 3: the K nearest real words (cosine) are positives, the other images'
               v' in the global batch are negatives, temperature tau
"Real" words are the base's trained vocabulary (BaseConfig.vocabulary): on a base whose text encoder saw only some
of its rows, a pull toward the others would pull toward random vectors.
Similarities are cosine (the translation's dot product between unnormalised vectors would let the
loss be lowered by growing ||v*||, which Eq. 4 then fights). Offsets get their own L2 penalty.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from components.model.dual_path import Factors
from components.model.token_embedder import nearest_tokens


Variant = Literal["none", "l2", "nn-cosine", "contrastive"]


def gather_batch(v: Tensor) -> tuple[Tensor, int]:
    """All workers' rows stacked, and where this worker's rows start. Gradient flows to the local rows
    only (the usual all_gather contrastive set-up: every worker computes the loss of its own rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return v, 0
    parts = [torch.empty_like(v) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, v.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = v
    return torch.cat(parts), rank * v.shape[0]


def contrastive_loss(v: Tensor, table: Tensor, k: int, tau: float) -> Tensor:
    """Eq. 3, averaged over the local batch; `table`: the candidate words' embeddings."""
    positives = nearest_tokens(v, table, k)[0] / tau  # (N, K)
    everyone, offset = gather_batch(F.normalize(v, dim=-1))
    negatives = F.normalize(v, dim=-1) @ everyone.T / tau  # (N, G)
    own = torch.arange(v.shape[0], device=v.device) + offset
    negatives = negatives.index_put((torch.arange(v.shape[0], device=v.device), own),
                                    torch.tensor(float("-inf"), device=v.device, dtype=negatives.dtype))
    numerator = positives.logsumexp(-1)
    return (torch.cat([positives, negatives], dim=-1).logsumexp(-1) - numerator).mean()


def nn_cosine_loss(v: Tensor, table: Tensor) -> Tensor:
    return (1 - nearest_tokens(v, table, 1)[0][:, 0]).mean()


def embedding_l2(v: Tensor) -> Tensor:
    """Eq. 4, averaged over the batch."""
    return v.pow(2).sum(-1).mean()


def offsets_l2(factors: Factors | None, scale: float) -> Tensor | float:
    """Mean over samples and matrices of ||s A_i B_i||_F^2, without forming the Din x Dout products:
    ||A B||_F^2 = sum((A^T A) * (B B^T)), both r x r."""
    if not factors:
        return 0.0
    norms = [((a.transpose(1, 2) @ a) * (b @ b.transpose(1, 2))).sum((1, 2)) for a, b in factors.values()]
    return scale ** 2 * torch.stack(norms).mean()


def embedding_regulariser(variant: Variant, v: Tensor, table: Tensor, k: int, tau: float) -> dict[str, Tensor]:
    """{"contrastive": the variant's nearest-neighbour term, "l2_embedding": ||v*||^2 (0 for `none`)}; `table`: the
    embeddings of the real words v* may be pulled toward (PromptEncoder.word_table)."""
    zero = v.new_zeros(())
    if variant == "none":
        return {"contrastive": zero, "l2_embedding": zero}
    pull = {"l2": lambda: zero,
            "nn-cosine": lambda: nn_cosine_loss(v, table),
            "contrastive": lambda: contrastive_loss(v, table, k, tau)}[variant]()
    return {"contrastive": pull, "l2_embedding": embedding_l2(v)}
