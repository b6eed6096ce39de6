"""Per-sample LoRA on the UNet's attention projections, through diffusers attention processors.

Targets are to_q, to_k and to_v of the self- (attn1) and cross-attention (attn2) of every transformer
block, found by walking the UNet. With W the Din x Dout matrix of a projection (nn.Linear keeps its
transpose), sample i of a batch computes

    x @ W + s * ((x @ A_i) @ B_i)

batched with einsum. The shared weights are only ever read, so concurrent personalisations (and the
training batch's different concepts) cannot leak into each other. `ConceptAttnProcessor` is
diffusers' AttnProcessor2_0 plus those offsets and the dual-path blend (components/model/dual_path.py);
called without a concept it computes exactly what AttnProcessor2_0 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from components.model.dual_path import ConceptBatch, blend


PROJECTIONS = ("to_q", "to_k", "to_v")


@dataclass(frozen=True)
class Target:
    """One adapted matrix: `name` is the projection's module path in the UNet."""

    name: str
    d_in: int
    d_out: int

    @property
    def params(self) -> int:
        return self.d_in * self.d_out


def find_targets(unet) -> list[Target]:
    """to_q/to_k/to_v of attn1 and attn2 in every transformer block, in module order (meta device is fine)."""
    # diffusers: only when targets are found (start-up time)
    from diffusers.models.attention_processor import Attention

    return [Target(f"{name}.{proj}", getattr(module, proj).in_features, getattr(module, proj).out_features)
            for name, module in unet.named_modules()
            if isinstance(module, Attention) and ".transformer_blocks." in name
            and name.rsplit(".", 1)[-1] in ("attn1", "attn2")
            for proj in PROJECTIONS]


def lora_delta(x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """s * (x_j @ A_i) @ B_i for rows x_j of shape (L, Din), where i = j % N (see ConceptBatch)."""
    n = a.shape[0]
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} rows is not a whole multiple of {n} concepts")
    if n == 1:  # one concept (tuning, generation): plain matmuls dispatch about half the ops of the einsums
        return scale * ((x @ a.squeeze(0).to(x.dtype)) @ b.squeeze(0).to(x.dtype))
    xs = x.unflatten(0, (-1, n))  # (k, N, L, Din)
    low = torch.einsum("knld,ndr->knlr", xs, a.to(x.dtype))
    return scale * torch.einsum("knlr,nro->knlo", low, b.to(x.dtype)).flatten(0, 1)


class ConceptAttnProcessor:
    """AttnProcessor2_0 with per-sample LoRA offsets and the dual-path blend.

    Holds nothing but the attention module's name, so one UNet serves many concepts at once.
    """

    def __init__(self, name: str):
        self.name = name

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 concept: ConceptBatch | None = None) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        concept = concept or ConceptBatch()
        is_cross = encoder_hidden_states is not None
        context = self._context(attn, encoder_hidden_states) if is_cross else hidden_states
        batch, seq_len = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        # base projections of the soft path; the hard path reuses those its inputs share
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        soft = hard = None
        if concept.alpha > 0:
            soft = self._attend(attn, self._offset(concept, "to_q", hidden_states, query),
                                self._offset(concept, "to_k", context, key),
                                self._offset(concept, "to_v", context, value), attention_mask)
        if concept.alpha < 1:
            if is_cross:
                hard_context = self._context(attn, concept.hard_context)
                key, value = attn.to_k(hard_context), attn.to_v(hard_context)
            hard = self._attend(attn, query, key, value, attention_mask)
        # to_out is linear and not adapted: blending before it equals blending the two layer outputs
        hidden_states = blend(soft, hard, concept.alpha)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _context(attn, encoder_hidden_states: Tensor) -> Tensor:
        return attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states

    def _offset(self, concept: ConceptBatch, projection: str, x: Tensor, base: Tensor) -> Tensor:
        factors = (concept.factors or {}).get(f"{self.name}.{projection}")
        return base if factors is None else base + lora_delta(x, *factors, concept.scale)

    @staticmethod
    def _attend(attn, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


def install_processors(unet) -> None:
    """Give every attention layer a ConceptAttnProcessor (idempotent; vanilla output without a concept)."""
    unet.set_attn_processor({name: ConceptAttnProcessor(name.removesuffix(".processor"))
                             for name in unet.attn_processors})
