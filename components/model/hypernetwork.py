"""Hypernetwork head: LoRA factors (A: Din x r, B: r x Dout) for every target matrix (paper Eq. 2).

A head with Din*r + r*Dout outputs per matrix would need about hidden * 4 * 149,376 weights for
SD 1.5's 96 targets at rank 4 (306M at hidden 512). Instead it is factorised:

    u_m = GELU(LayerNorm(g(h) + e_m))          g: shared MLP of the image code h; e_m: learned per matrix
    A_m = P[Din_m] @ reshape(W_A u_m, k x r)   P[d]: learned d x k basis, shared by all matrices with Din = d
    B_m = reshape(W_B u_m, r x k) @ Q[Dout_m]  Q[d]: learned k x d basis, shared likewise

so the size grows with the number of distinct widths, not with Din*Dout: 1.17M parameters for SD 1.5
at rank 4 (hidden 512, k 64), see `datencoder targets --base sd15`. W_B starts at zero, so B = 0 and
the first offsets leave the UNet unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.model.dual_path import Factors
from components.model.lora import Target


class HyperNetwork(nn.Module):
    def __init__(self, targets: list[Target], in_dim: int, hidden: int, rank: int, basis: int):
        super().__init__()
        self.targets, self.rank, self.basis = list(targets), rank, basis
        self.image_code = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.target_embedding = nn.Parameter(torch.randn(len(self.targets), hidden))
        self.norm = nn.LayerNorm(hidden)
        self.to_a = nn.Linear(hidden, basis * rank)
        self.to_b = nn.Linear(hidden, rank * basis)
        nn.init.zeros_(self.to_b.weight)
        nn.init.zeros_(self.to_b.bias)
        # A's entries ~ 1/sqrt(Din), like a kaiming-initialised LoRA down-projection
        self.in_bases = nn.ParameterDict({str(d): nn.Parameter(torch.randn(d, basis) * math.sqrt(3 / (d * basis)))
                                          for d in sorted({t.d_in for t in self.targets})})
        self.out_bases = nn.ParameterDict({str(d): nn.Parameter(torch.randn(basis, d) / math.sqrt(basis))
                                           for d in sorted({t.d_out for t in self.targets})})

    def forward(self, h: Tensor) -> Factors:
        u = F.gelu(self.norm(self.image_code(h)[:, None] + self.target_embedding))  # (N, M, hidden)
        coeff_a = self.to_a(u).unflatten(-1, (self.basis, self.rank))  # (N, M, k, r)
        coeff_b = self.to_b(u).unflatten(-1, (self.rank, self.basis))  # (N, M, r, k)
        return {t.name: (self.in_bases[str(t.d_in)] @ coeff_a[:, m], coeff_b[:, m] @ self.out_bases[str(t.d_out)])
                for m, t in enumerate(self.targets)}
