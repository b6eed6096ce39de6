"""The tuning encoder (paper Figure 2): backbone trunk + token embedder + hypernetwork, and its losses.

`TuningEncoder` holds only what is trained and saved (trunk and heads). The frozen base it reads
(UNet, text encoder, noise scheduler, backbone CLIP) is a `FrozenBase`, kept as a plain attribute so
it is neither in the state dict nor in `parameters()` nor synchronised by DDP.

    base = FrozenBase.load(cfg.base, cfg.runtime)   # or FrozenBase(unet, text_encoder, tokenizer, ...)
    encoder = TuningEncoder.for_base(cfg.encoder, base)
    losses = encoder(pixels, latents, ["a photo of S*", ...])   # dict; losses["total"].backward()
    encoder.save_pretrained(path); TuningEncoder.from_pretrained(path, base)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from components import __version__
from components.config import BaseConfig, EncoderConfig, RuntimeConfig
from components.errors import UserError
from components.model.backbone import (
    ClipImageTower,
    Trunk,
    unet_encoder_features,
    unet_feature_channels,
)
from components.model.base import load_clip, load_pipeline
from components.model.dual_path import Factors, condition
from components.model.hypernetwork import HyperNetwork
from components.model.lora import Target, find_targets, install_processors
from components.model.placeholder import PromptEncoder
from components.model.regularisers import embedding_regulariser, offsets_l2
from components.model.token_embedder import TokenEmbedder
from components.runtime import resolve


WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class FrozenBase:
    """The base model's frozen parts. Construction freezes them and installs the concept processors
    (vanilla behaviour unless a UNet call passes a ConceptBatch)."""

    def __init__(self, unet, text_encoder, tokenizer, noise_scheduler, clip: ClipImageTower,
                 vocabulary: list[str] | None = None):
        for module in (unet, text_encoder, clip):
            module.eval().requires_grad_(False)
        install_processors(unet)
        self.unet, self.text_encoder, self.noise_scheduler, self.clip = unet, text_encoder, noise_scheduler, clip
        self.prompts = PromptEncoder(tokenizer, text_encoder, vocabulary)

    @classmethod
    def load(cls, base: BaseConfig, runtime: RuntimeConfig | None = None, pipe=None) -> FrozenBase:
        """From the diffusers pipeline at base.pretrained in `runtime` (default auto), or `pipe`, already loaded
        from it (then the base shares its modules, and the pipeline's VAE and sampler stay usable), and the
        backbone CLIP, on the pipeline's device."""
        from diffusers import DDPMScheduler  # diffusers: only when the base is wrapped (start-up time)

        pipe = pipe if pipe is not None else load_pipeline(base, resolve(runtime or RuntimeConfig()))
        # training noises with DDPM on the pipeline's own betas and prediction type
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        clip = ClipImageTower(load_clip(base.backbone_clip, pipe.device).model.visual)
        if base.gradient_checkpointing:  # only acts while gradients flow (tuning, pre-training)
            pipe.unet.enable_gradient_checkpointing()
        return cls(pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler, clip, base.vocabulary)

    def to(self, *args, **kwargs) -> FrozenBase:
        for module in (self.unet, self.text_encoder, self.clip):
            module.to(*args, **kwargs)
        return self

    def noised(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """z_t and the regression target of the scheduler's prediction type (Eq. 1)."""
        s = self.noise_scheduler
        noisy = s.add_noise(latents, noise, timesteps)
        kind = s.config.prediction_type
        if kind == "epsilon":
            return noisy, noise
        if kind == "v_prediction":
            return noisy, s.get_velocity(latents, noise, timesteps)
        raise UserError(f"unsupported prediction type {kind!r} (expected epsilon or v_prediction)")

    def denoise(self, noisy: Tensor, timesteps: Tensor, ids: Tensor, v_star: Tensor, factors: Factors | None,
                scale: float, alpha: float) -> Tensor:
        """The personalised UNet's prediction for prompts `ids` with v* at S* and offsets `factors`."""
        context, concept = condition(self.prompts, ids, v_star, factors, scale, alpha)
        return self.unet(noisy, timesteps, encoder_hidden_states=context,
                         cross_attention_kwargs={"concept": concept}).sample

    @torch.no_grad()
    def empty_context(self, n: int) -> Tensor:
        return self.prompts.encode(self.prompts.tokenize([""], require_placeholder=False)).expand(n, -1, -1)


@dataclass(frozen=True)
class EncoderShape:
    """Everything about the base that fixes the encoder's tensor shapes (saved in config.json)."""

    clip_channels: int
    clip_grid: tuple[int, int]
    unet_channels: tuple[int, ...]
    token_dim: int
    targets: tuple[Target, ...]

    @classmethod
    def of(cls, unet, text_encoder, clip_channels: int, clip_grid) -> EncoderShape:
        return cls(clip_channels, tuple(clip_grid), tuple(unet_feature_channels(unet.config)),
                   text_encoder.get_input_embeddings().embedding_dim, tuple(find_targets(unet)))

    @classmethod
    def from_dict(cls, d: dict) -> EncoderShape:
        return cls(d["clip_channels"], tuple(d["clip_grid"]), tuple(d["unet_channels"]), d["token_dim"],
                   tuple(Target(**t) for t in d["targets"]))


class Prediction(NamedTuple):
    v_star: Tensor  # (N, D) placeholder embeddings
    factors: Factors | None  # LoRA factors per target; None without the hypernetwork


class TuningEncoder(nn.Module):
    def __init__(self, config: EncoderConfig, shape: EncoderShape, origin: Tensor | None = None,
                 token_norm: float = 1.0):
        """`origin`/`token_norm` initialise the token embedder (see for_base); from_pretrained overwrites them."""
        super().__init__()
        self.config, self.shape = config, shape
        self.base: FrozenBase | None = None
        self.trunk = Trunk([shape.clip_channels, *shape.unet_channels], config.trunk_channels, config.trunk_blocks,
                           shape.clip_grid)
        origin = torch.zeros(shape.token_dim) if origin is None else origin
        self.token_embedder = TokenEmbedder(config.trunk_channels, config.token_hidden, origin, token_norm,
                                            config.token_init_spread)
        self.hypernetwork = (HyperNetwork(list(shape.targets), config.trunk_channels, config.hyper_hidden,
                                          config.rank, config.hyper_basis) if config.use_hypernetwork else None)

    @classmethod
    def for_base(cls, config: EncoderConfig, base: FrozenBase) -> TuningEncoder:
        """A fresh encoder whose v* starts at `config.token_init_word`'s embedding."""
        prompts = base.prompts
        word = prompts.tokenizer(config.token_init_word, add_special_tokens=False).input_ids
        if not word or max(word) >= prompts.token_table.shape[0]:
            raise UserError(f"encoder.token_init_word {config.token_init_word!r} is not in the base's vocabulary")
        origin = prompts.token_table.detach().float()[word].mean(0)
        shape = EncoderShape.of(base.unet, base.text_encoder, base.clip.channels, base.clip.grid)
        encoder = cls(config, shape, origin, prompts.word_table.detach().float().norm(dim=-1).mean().item())
        return encoder.attach(base)

    def attach(self, base: FrozenBase) -> TuningEncoder:
        found = EncoderShape.of(base.unet, base.text_encoder, base.clip.channels, base.clip.grid)
        if found != self.shape:
            raise UserError("this encoder was built for a different base model "
                            "(feature, token or target shapes differ)")
        self.base = base
        return self

    def predict(self, pixels: Tensor, noisy_latents: Tensor, timesteps: Tensor) -> Prediction:
        """v* and LoRA factors for each image, from its pixels and its noised latent at `timesteps`."""
        base = self._base()
        features = [base.clip(pixels), *unet_encoder_features(base.unet, noisy_latents, timesteps,
                                                               base.empty_context(len(pixels)))]
        h = self.trunk(features)
        return Prediction(self.token_embedder(h), self.hypernetwork(h) if self.hypernetwork else None)

    def forward(self, pixels: Tensor, latents: Tensor, prompts: list[str] | Tensor, noise: Tensor | None = None,
                timesteps: Tensor | None = None, gradient_norms: bool = False,
                encoder_timesteps: Tensor | None = None) -> dict[str, Tensor]:
        """One pre-training step's losses for N images: pixels (N, 3, H, W) in [-1, 1], their clean scaled
        VAE latents (N, 4, h, w), one prompt with S* each (strings or PromptEncoder ids); timesteps uniform
        unless given. The prediction reads the latent at the loss's timesteps (the paper's) or, given
        `encoder_timesteps`, the latent noised there with noise of its own (as personalisation predicts once, from
        one noise level, for every step). Returns {"diffusion", "contrastive", "l2_embedding", "l2_offsets",
        "total"} and, with
        `gradient_norms`, the mean per-image norm of the gradient on v* of the denoising loss
        ("grad_v_star/diffusion") and of the weighted embedding regulariser ("grad_v_star/regulariser")."""
        base, cfg = self._base(), self.config
        ids = prompts if isinstance(prompts, Tensor) else base.prompts.tokenize(prompts)
        ids = ids.to(latents.device)
        noise = torch.randn_like(latents) if noise is None else noise
        if timesteps is None:
            timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                      device=latents.device)
        noisy, target = base.noised(latents, noise, timesteps)
        if encoder_timesteps is None:
            v_star, factors = self.predict(pixels, noisy, timesteps)
        else:
            seen = base.noised(latents, torch.randn_like(latents), encoder_timesteps)[0]
            v_star, factors = self.predict(pixels, seen, encoder_timesteps)
        alpha = cfg.alpha("train")
        prediction = base.denoise(noisy, timesteps, ids, v_star, factors, cfg.lora_scale, alpha)
        losses = {"diffusion": F.mse_loss(prediction.float(), target.float()),
                  **embedding_regulariser(cfg.regulariser, v_star, base.prompts.word_table, cfg.neighbours,
                                          cfg.temperature),
                  "l2_offsets": v_star.new_zeros(()) + offsets_l2(factors, cfg.lora_scale)}
        regulariser = cfg.contrastive_weight * losses["contrastive"] + cfg.l2_embedding_weight * losses["l2_embedding"]
        losses["total"] = losses["diffusion"] + regulariser + cfg.l2_offsets_weight * losses["l2_offsets"]
        if gradient_norms:  # the two pulls on v*: does the regulariser drown the denoising signal?
            for name, term in (("diffusion", losses["diffusion"]), ("regulariser", regulariser)):
                grad = torch.autograd.grad(term, v_star, retain_graph=True, allow_unused=True)[0] \
                    if term.requires_grad else None
                losses[f"grad_v_star/{name}"] = (grad.norm(dim=-1).mean() * len(v_star) if grad is not None
                                                 else v_star.new_zeros(())).detach()
        return losses

    def _base(self) -> FrozenBase:
        if self.base is None:
            raise RuntimeError("TuningEncoder has no base: use for_base(...) or from_pretrained(path, base)")
        return self.base

    # --- diffusers-style persistence: config.json + safetensors ----------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))
        shape = asdict(self.shape)
        (path / CONFIG_NAME).write_text(json.dumps({"_class_name": type(self).__name__,
                                                    "_datencoder_version": __version__,
                                                    "encoder": self.config.model_dump(), "shape": shape}, indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path, base: FrozenBase | None = None) -> TuningEncoder:
        path = Path(path)
        try:
            saved = json.loads((path / CONFIG_NAME).read_text())
            weights = load_file(str(path / WEIGHTS_NAME))
        except (OSError, ValueError, SafetensorError) as e:  # missing, unparsable, truncated or corrupt
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot load encoder from {path}: {reason}; "
                            f"the weights are corrupt or incomplete: train them again or restore them") from None
        encoder = cls(EncoderConfig.model_validate(saved["encoder"]), EncoderShape.from_dict(saved["shape"]))
        try:
            encoder.load_state_dict(weights)
        except RuntimeError as e:  # tensors missing or of another shape than config.json describes
            raise UserError(f"cannot load encoder from {path}: its weights do not match its config.json "
                            f"({str(e).splitlines()[0]})") from None
        return encoder.attach(base) if base is not None else encoder
