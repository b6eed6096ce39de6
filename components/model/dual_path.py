"""Dual-path adaptation (paper Eq. 5), blended at the level of each attention layer.

    out = a * Attn(f, C_soft, W + dW) + (1 - a) * Attn(f, C_hard, W)

C_soft is the prompt with v* at the S* positions; C_hard is the same prompt with S* spelled as the
real token nearest to v*. The paper blends whole UNet blocks; we blend every attention layer's output
and let the two paths share the hidden states in between (resnets, feed-forwards and norms have no
offsets and see no text, so they would compute the same thing twice). a = 1 is plain LoRA + embedding,
a = 0 is the vanilla model on the hard prompt; at either end the unused path is not computed.

Everything one UNet call needs travels in a `ConceptBatch` passed as
`cross_attention_kwargs={"concept": batch}`; nothing is stored on the shared UNet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


# target name ("...transformer_blocks.0.attn2.to_k") -> (A: (N, Din, r), B: (N, r, Dout))
Factors = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ConceptBatch:
    """N concepts' personalisation for one UNet call.

    Batch convention: the UNet batch is k stacked copies of the N concepts, and row j uses concept
    j % N. Classifier-free guidance in diffusers' layout, `torch.cat([uncond, cond])`, is k = 2: the
    unconditional rows get the same offsets and blend as the conditional ones, i.e. guidance runs on
    the personalised model (as with any loaded LoRA). `hard_context` rows align with the
    `encoder_hidden_states` rows (see `with_guidance`).
    """

    factors: Factors | None = None
    scale: float = 1.0
    alpha: float = 1.0
    hard_context: Tensor | None = None

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.alpha < 1.0 and self.hard_context is None:
            raise ValueError("alpha < 1 blends in the hard-prompt path, which needs hard_context")

    def with_guidance(self, uncond_context: Tensor) -> ConceptBatch:
        """The same concepts for a CFG batch cat([uncond, cond]): the hard path gets the same uncond rows."""
        if self.hard_context is None:
            return self
        return replace(self, hard_context=torch.cat([uncond_context, self.hard_context]))


def blend(soft: Tensor | None, hard: Tensor | None, alpha: float) -> Tensor:
    """a * soft + (1 - a) * hard; at a in {0, 1} the other path may be None (it was skipped)."""
    if alpha == 1.0:
        return soft
    if alpha == 0.0:
        return hard
    return torch.lerp(hard, soft, alpha)  # exact when the paths agree


def condition(prompts, ids: Tensor, v_star: Tensor, factors: Factors | None, scale: float,
              alpha: float) -> tuple[Tensor, ConceptBatch]:
    """Soft context (v* substituted) and the ConceptBatch for one UNet call on prompts `ids`.

    `prompts` is a components.model.placeholder.PromptEncoder and `ids` its tokenised prompts, row i for
    v_star[i]. The hard prompt uses v*'s nearest real token and carries no gradient: the token choice
    is discrete and the vanilla path has nothing to train.
    """
    soft = prompts.encode(ids, v_star)
    hard = None
    if alpha < 1.0:
        with torch.no_grad():
            hard = prompts.encode(prompts.hard_ids(ids, prompts.nearest_tokens(v_star.detach())))
    return soft, ConceptBatch(factors=factors, scale=scale, alpha=alpha, hard_context=hard)
