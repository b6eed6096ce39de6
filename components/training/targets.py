"""The `targets` stage: which matrices of a base UNet the hypernetwork adapts, and what its head costs.

It reads the UNet's structure only (on the meta device, no weights): SD 1.5 from the bundled config, the toy
base from its trained config, else from the toy bootstrap recipe, so it answers before anything is trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from components.config import BaseConfig, BootstrapConfig, Config
from components.model import sd15
from components.model.hypernetwork import HyperNetwork
from components.model.lora import find_targets
from components.toy.bootstrap import make_unet


def unet_structure(base: BaseConfig, bootstrap: BootstrapConfig, kind: str | None = None):
    """The base UNet on the meta device: SD 1.5 from the bundled config (`kind`, default base.kind), the toy one
    from the trained model's config if present, else from the bootstrap recipe."""
    if (kind or base.kind) == "sd15":
        return sd15.meta_unet()
    saved = Path(base.pretrained) / "unet" / "config.json"
    if saved.is_file():
        return sd15.meta_unet(json.loads(saved.read_text()))

    with torch.device("meta"):
        return make_unet(bootstrap)


def targets_report(cfg: Config, kind: str | None = None) -> dict:
    """The `targets` stage: which matrices the hypernetwork adapts, and what its head costs."""
    targets = find_targets(unet_structure(cfg.base, cfg.bootstrap, kind))
    e = cfg.encoder
    with torch.device("meta"):
        head = HyperNetwork(targets, e.trunk_channels, e.hyper_hidden, e.rank, e.hyper_basis)
    total = sum(t.params for t in targets)
    return {
        "base": kind or cfg.base.kind,
        "count": len(targets),
        "total_params": total,
        "mean_params": round(total / len(targets), 2),
        "by_projection": {f"{attn}.{proj}": sum(t.name.endswith(f"{attn}.{proj}") for t in targets)
                          for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")},
        "rank": e.rank,
        "lora_params_per_concept": sum((t.d_in + t.d_out) * e.rank for t in targets),
        "hypernetwork_params": sum(p.numel() for p in head.parameters()),
        # what a direct head (hidden -> every factor entry) would cost at the same width
        "direct_head_params": sum((t.d_in + t.d_out) * e.rank for t in targets) * e.hyper_hidden,
        "targets": [{"name": t.name, "in": t.d_in, "out": t.d_out} for t in targets],
    }
