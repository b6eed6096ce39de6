"""Export a tuned concept for stock tools: an embedding named after its token, a kohya LoRA, a diffusers LoRA.

Our offset of a projection y = x W is s * (x @ A) @ B with A (Din, r), B (r, Dout). nn.Linear and
peft store weights as (out, in), so the peft/diffusers pair is lora_A.weight = A^T (r, Din) and
lora_B.weight = s * B^T (Dout, r), with lora_alpha = r so that peft's scaling alpha / r is 1. The
kohya file is diffusers' own conversion of that (`convert_state_dict_to_kohya`: lora_down / lora_up,
`.alpha` = r). Stock diffusers then reproduces the concept at blend a = 1 (plain LoRA + embedding); the
dual path (a < 1) is our own attention processor and has no stock equivalent.

A1111 and ComfyUI take an embedding's trigger word from its file name, so every file is named after the
token (`<token>.safetensors`, `<token>-kohya.safetensors`, `<token>-diffusers.safetensors`): exports of
several concepts live side by side in one folder, and the token printed is the word to type there.

    pipe.load_lora_weights(dir, weight_name=f"{token}-kohya.safetensors")   # or -diffusers
    pipe.load_textual_inversion(f"{dir}/{token}.safetensors", token=token)
    pipe(prompt.replace("S*", token), ...)  # the same sampler settings
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from components.errors import UserError
from components.inference.tuning import Concept


# a trigger word every tool takes as one word and as a file name: letters, digits, underscores
TOKEN_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{2,63}")
FINGERPRINT_KEY = "datencoder.concept"  # safetensors metadata: which concept a file holds


def token_for(digest: str) -> str:
    """The token of a concept personalised from images with this sha256: `concept_<8 hex>`."""
    return f"concept_{digest[:8]}"


def export_files(token: str) -> dict[str, str]:
    return {"embedding": f"{token}.safetensors", "kohya": f"{token}-kohya.safetensors",
            "diffusers": f"{token}-diffusers.safetensors"}


def lora_matrices(concept: Concept) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """target module path -> (down (r, Din), up (Dout, r)) with the scale s folded into up."""
    return {name: (a[0].T.contiguous().float(), (concept.scale * b[0]).T.contiguous().float())
            for name, (a, b) in (concept.factors or {}).items()}


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def held_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get(FINGERPRINT_KEY)
    except Exception:  # noqa: BLE001 - not a safetensors file we wrote: some other concept
        return None


def export_concept(concept: Concept, out: str | Path, token: str) -> dict:
    """Write the concept's files into `out`; returns {"dir", "token", "files", "rank"}. A folder that already
    holds a different concept under this token is refused (UserError) before anything is written."""
    from diffusers.utils import convert_state_dict_to_kohya  # diffusers: only when exporting (start-up time)

    if not TOKEN_PATTERN.fullmatch(token):
        raise UserError(f"token {token!r} is not usable as a trigger word: 3-64 letters, digits or underscores, "
                        f"starting with a letter")
    out = Path(out)
    matrices = lora_matrices(concept)
    rank = next(iter(matrices.values()))[0].shape[0] if matrices else 0
    # diffusers' textual-inversion layout read by A1111 and ComfyUI too: one (num_vectors, D) tensor
    embedding = {"emb_params": concept.v_star.detach().float().reshape(1, -1).contiguous()}
    peft = {f"unet.{target}.lora_{part}.weight": matrix for target, (down, up) in matrices.items()
            for part, matrix in (("A", down), ("B", up))}
    concept_id = fingerprint({**embedding, **peft})
    names = export_files(token)
    files = {"embedding": embedding}
    if matrices:  # an embedding-only encoder (ablation) has no LoRA to export
        files["kohya"] = {k: v.float() if k.endswith(".alpha") else v
                          for k, v in convert_state_dict_to_kohya(peft).items()}
        files["diffusers"] = peft
    for kind in files:
        path = out / names[kind]
        if path.exists() and held_fingerprint(path) != concept_id:
            raise UserError(f"{path} already holds a different concept with the token {token}; export to another "
                            f"folder or remove it (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    metadata = {FINGERPRINT_KEY: concept_id, "format": "pt"}
    kohya_metadata = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    for kind, tensors in files.items():
        save_file(tensors, str(out / names[kind]),
                  metadata={**metadata, **(kohya_metadata if kind == "kohya" else {})})
    return {"dir": str(out), "token": token, "files": [names[k] for k in files], "rank": rank}
