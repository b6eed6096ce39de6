"""Export a tuned concept for stock tools: a diffusers LoRA, a textual-inversion embedding, kohya keys.

Our offset of a projection y = x W is s * (x @ A) @ B with A (Din, r), B (r, Dout). nn.Linear and
peft store weights as (out, in), so the peft/diffusers pair is lora_A.weight = A^T (r, Din) and
lora_B.weight = s * B^T (Dout, r), with lora_alpha = r so that peft's scaling alpha / r is 1. The
kohya file carries the same matrices as lora_down / lora_up with `.alpha` = r. The embedding file
maps the token to v*. Stock diffusers then reproduces the concept at blend a = 1 (plain LoRA +
embedding); the dual path (a < 1) is our own attention processor and has no stock equivalent.

    pipe.load_lora_weights(dir)                                   # pytorch_lora_weights.safetensors
    pipe.load_textual_inversion(f"{dir}/learned_embeds.safetensors", token=token)
    pipe(prompt.replace("S*", token), ...)  # the same sampler settings
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.inference.tuning import Concept

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = "learned_embeds.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


def lora_matrices(concept: Concept) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """target module path -> (down (r, Din), up (Dout, r)) with the scale s folded into up."""
    return {name: (a[0].T.contiguous().float(), (concept.scale * b[0]).T.contiguous().float())
            for name, (a, b) in (concept.factors or {}).items()}


def kohya_prefix(target: str) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> 'lora_unet_down_blocks_0_..._attn1_to_q'."""
    return "lora_unet_" + target.replace(".", "_")


def export_concept(concept: Concept, out: str | Path, token: str) -> dict:
    """Write the three files into `out`; returns {"dir", "token", "files", "rank"}."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    matrices = lora_matrices(concept)
    rank = next(iter(matrices.values()))[0].shape[0] if matrices else 0
    diffusers_lora, kohya = {}, {}
    for target, (down, up) in matrices.items():
        diffusers_lora[f"unet.{target}.lora_A.weight"] = down
        diffusers_lora[f"unet.{target}.lora_B.weight"] = up
        prefix = kohya_prefix(target)
        kohya[f"{prefix}.lora_down.weight"] = down
        kohya[f"{prefix}.lora_up.weight"] = up
        kohya[f"{prefix}.alpha"] = torch.tensor(float(rank))
    files = [EMBEDDING_FILE]
    # diffusers' textual-inversion training script layout: {token: (num_vectors, D)}
    save_file({token: concept.v_star.detach().float().reshape(1, -1).contiguous()}, str(out / EMBEDDING_FILE))
    if matrices:  # an embedding-only encoder (ablation) has no LoRA to export
        save_file(diffusers_lora, str(out / LORA_FILE), metadata={"format": "pt"})
        save_file(kohya, str(out / KOHYA_FILE), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
        files += [LORA_FILE, KOHYA_FILE]
    return {"dir": str(out), "token": token, "files": files, "rank": rank}
