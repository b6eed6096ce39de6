"""Feature-extraction backbone (paper section 4.1, after E4T): two frozen towers and a trainable trunk.

- CLIP image tower (open_clip; ViT-H-14 for sd15, the toy backbone CLIP for toy): the last layer's
  patch tokens as a spatial map.
- UNet encoder: the outputs of the down blocks and the mid block for the image's noised latent at the
  current timestep, conditioned on the EMPTY prompt.
- Trunk: normalises each map, resamples all to the CLIP patch grid, merges them with a 1x1 conv and a
  few residual conv blocks, and pools to the code h that the two heads share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClipImageTower(nn.Module):
    """A frozen open_clip vision tower: images in [-1, 1] -> last-layer features (N, C, g, g): a ViT's patch tokens,
    a ModifiedResNet's last stage."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        import open_clip  # open_clip: only when a backbone is built (start-up time)

        self.visual = visual.eval().requires_grad_(False)
        preprocess = getattr(visual, "preprocess_cfg", {}) or {}
        mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if hasattr(visual, "transformer"):  # a ViT: its patch grid, at the transformer's width
            self.grid, self.channels = tuple(visual.grid_size), visual.transformer.width
        else:  # open_clip's ModifiedResNet: the last stage's map, 32x smaller than the input
            self.grid = (self.image_size[0] // 32, self.image_size[1] // 32)
            self.channels = visual.layer4[-1].conv3.out_channels

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        x = (pixels.float() + 1) / 2
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        out = self.visual.forward_intermediates(x, indices=1, normalize_intermediates=True, intermediates_only=True)
        return out["image_intermediates"][-1]


@torch.no_grad()
def unet_encoder_features(unet, noisy_latents: Tensor, timesteps: Tensor, context: Tensor) -> list[Tensor]:
    """Outputs of each down block and of the mid block (UNet2DConditionModel.forward up to the mid block)."""
    timesteps = timesteps.expand(noisy_latents.shape[0])
    emb = unet.time_embedding(unet.time_proj(timesteps).to(noisy_latents.dtype))
    h = unet.conv_in(noisy_latents)
    features = []
    for block in unet.down_blocks:
        text = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        h, _ = block(hidden_states=h, temb=emb, **text)
        features.append(h)
    features.append(unet.mid_block(h, emb, encoder_hidden_states=context))
    return features


def unet_feature_channels(unet_config) -> list[int]:
    """Channels of unet_encoder_features' maps, from the UNet's config."""
    channels = list(unet_config["block_out_channels"])
    return channels + channels[-1:]


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Trunk(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, blocks: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.merge = nn.Conv2d(sum(in_channels), channels, 1)
        self.blocks = nn.Sequential(*(ResBlock(channels) for _ in range(blocks)))
        self.out = nn.LayerNorm(channels)

    def forward(self, features: list[Tensor]) -> Tensor:
        maps = []
        for f in features:
            # per-location channel norm: the towers' activations differ in scale by orders of magnitude
            f = F.layer_norm(f.float().movedim(1, -1), f.shape[1:2]).movedim(-1, 1)
            if tuple(f.shape[-2:]) != self.grid:
                f = F.interpolate(f, size=self.grid, mode="bilinear", align_corners=False, antialias=True)
            maps.append(f)
        x = self.blocks(self.merge(torch.cat(maps, dim=1)))
        return self.out(x.mean(dim=(2, 3)))
