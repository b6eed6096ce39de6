"""Bootstrap the embedded default: a tiny but trained text-to-image base model and two tiny CLIPs.

Stands in for Stable Diffusion 1.5 / ViT-H-14 / ViT-B-16 on machines that cannot download weights.
Everything is saved in the real formats (a diffusers pipeline directory; open_clip config +
safetensors checkpoint) so the loading code in components/model/base.py serves both presets.

Recipe (docs/bootstrap.md has the reasoning): render captioned toy scenes, holding out some
(shape, colour, background colour) combos; train a VAE 64x64x3 -> 16x16x4 and cache unit-variance
latents; train text encoder + UNet jointly with v-prediction on a zero-terminal-SNR cosine schedule
(so the sampler can set global colour, which eps-prediction with nonzero terminal SNR washes out),
condition dropout for classifier-free guidance, and an EMA of the weights; then train two CLIPs
contrastively on separate renders and seeds.

Three parts, each a DVC stage with its own outputs (`bootstrap --part vae|unet|clips`): the VAE
(models/toy-base/vae), the text encoder + UNet on that VAE's latents (the rest of models/toy-base) and
the CLIPs (models/toy-clip). Each part seeds its own initialisation, so training one alone gives the
same bytes as training all three in one call.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from components.config import BootstrapConfig, Config
from components.errors import UserError
from components.progress import Progress
from components.toy import world as tw
from components.toy.tokenizer import save_toy_tokenizer


log = logging.getLogger(__name__)


# --- data -----------------------------------------------------------------------------------------
def render_dataset(scenes: list[tw.Scene], seed: int) -> torch.Tensor:
    """uint8 renders -> float tensor (N, 3, 64, 64) in [-1, 1]."""
    images = tw.render_batch(scenes, 64, seed)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def caption_variant(scene: tw.Scene, rng: random.Random) -> str:
    """Captions of varying detail, so CLIP scores partial prompts (e.g. 'on a beach') sensibly."""
    r = rng.random()
    if r < 0.6:
        return scene.caption()
    if r < 0.8:
        return scene.concept.phrase(scene.size, scene.count)
    if r < 0.9:
        return tw.background_phrase(scene.background, scene.background_colour)
    return scene.caption(subject="an object") if scene.count == 1 else scene.caption()


def attribute_swaps(scene: tw.Scene, rng: random.Random) -> list[tw.Scene]:
    """The scene and three near-misses (another shape, colour, pattern or background colour): in one
    contrastive batch they force the CLIP to see exactly the attributes identity depends on."""
    c = scene.concept
    def other(options, current):
        return rng.choice([o for o in options if o != current])
    return [scene,
            replace(scene, concept=replace(c, shape=other(tw.SHAPES, c.shape))),
            replace(scene, concept=replace(c, colour=other([k for k in tw.COLOURS if k != scene.background_colour],
                                                           c.colour))),
            replace(scene, concept=replace(c, pattern=other(tw.PATTERNS, c.pattern))) if rng.random() < 0.5
            else replace(scene, background="plain", background_colour=other(
                [k for k in tw.COLOURS if k not in (c.colour, c.pattern_colour)], scene.background_colour))]


# --- VAE ------------------------------------------------------------------------------------------
def make_vae(channels: tuple[int, ...] = (16, 32, 32)):
    from diffusers import AutoencoderKL  # diffusers: only when this part trains (start-up time)

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, norm_num_groups=8)


def train_vae(images: torch.Tensor, b: BootstrapConfig):
    vae = make_vae(tuple(b.vae_channels)).to(b.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=b.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(b.seed)
    progress = Progress("vae", b.vae_steps)
    for step in range(b.vae_steps):
        batch = images[torch.randint(len(images), (b.vae_batch,), generator=gen)].to(b.device)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec_loss = F.mse_loss(recon, batch) + 0.5 * F.l1_loss(recon, batch)
        loss = rec_loss + b.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay keeps the last steps from bouncing
            group["lr"] = b.vae_lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / b.vae_steps))
        progress.update(step + 1, loss=rec_loss.item())
    vae.eval()
    return vae


def finetune_decoder(vae, images: torch.Tensor, b: BootstrapConfig):
    """Sharpen the decoder with the encoder frozen (as SD's ft-MSE VAE did): the latent space, and so
    the UNet trained on it, stays exactly the same while reconstructions lose their blur."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=b.vae_lr / 2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(b.seed + 3)
    progress = Progress("vae-decoder", b.vae_decoder_steps)
    vae.train()
    for step in range(b.vae_decoder_steps):
        batch = images[torch.randint(len(images), (b.vae_batch,), generator=gen)].to(b.device)
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.mean
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, batch) + 0.5 * F.l1_loss(recon, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = b.vae_lr / 2 * 0.5 * (1 + math.cos(math.pi * (step + 1) / b.vae_decoder_steps))
        progress.update(step + 1, loss=loss.item())
    vae.requires_grad_(True)
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(images[i:i + batch].to(device)).latent_dist.mean.cpu()
                      for i in range(0, len(images), batch)])


# --- text encoder + UNet --------------------------------------------------------------------------
def make_text_encoder(vocab_size: int, b: BootstrapConfig, bos: int, eos: int, max_length: int):
    # transformers' modelling code: only when this part trains (start-up time)
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=b.text_width, intermediate_size=4 * b.text_width,
        num_hidden_layers=b.text_layers, num_attention_heads=4, max_position_embeddings=max_length,
        projection_dim=b.text_width, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        hidden_act="quick_gelu"))


def make_unet(b: BootstrapConfig):
    from diffusers import UNet2DConditionModel  # diffusers: only when this part trains (start-up time)

    c = tuple(b.unet_channels)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=c,
        down_block_types=("CrossAttnDownBlock2D",) * (len(c) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(c) - 1),
        cross_attention_dim=b.text_width, attention_head_dim=4, norm_num_groups=min(16, c[0]))


def scheduler_config(b: BootstrapConfig) -> dict:
    return {"num_train_timesteps": 1000, "beta_schedule": b.beta_schedule, "prediction_type": b.prediction_type,
            "rescale_betas_zero_snr": b.zero_terminal_snr, "timestep_spacing": "trailing", "clip_sample": False}


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_denoiser(latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor,
                   text_encoder, unet, b: BootstrapConfig) -> dict:
    # diffusers: only when this part trains (start-up time)
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    noise_scheduler = DDPMScheduler(**scheduler_config(b))
    dev = b.device
    unet.to(dev)
    text_encoder.to(dev)
    latents, input_ids, empty_ids = latents.to(dev), input_ids.to(dev), empty_ids.to(dev)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(dev)  # add_noise/get_velocity index it by t
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas).clamp(min=1e-8)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=b.unet_lr, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, b.warmup_steps, max(b.unet_steps, 1))
    ema = EMA([unet, text_encoder], b.ema_decay)
    gen = torch.Generator().manual_seed(b.seed + 7)
    progress = Progress("unet", b.unet_steps)
    unet.train()
    text_encoder.train()
    recent: list[float] = []
    for step in range(b.unet_steps):
        idx = torch.randint(len(latents), (b.unet_batch,), generator=gen).to(dev)
        x0 = latents[idx]
        ids = input_ids[idx].clone()
        drop = (torch.rand(b.unet_batch, generator=gen) < b.cond_dropout).to(dev)
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b.unet_batch,), generator=gen).to(dev)
        xt = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t) if b.prediction_type == "v_prediction" else noise
        cond = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        # min-SNR-style weighting, written so the zero-SNR endpoint (global colour) keeps weight 1
        weight = (snr[t] + 1).clamp(max=b.min_snr_gamma) / (snr[t] + 1)
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        recent = (recent + [loss.item()])[-50:]
        progress.update(step + 1, loss=sum(recent) / len(recent), lr=sched.get_last_lr()[0])
    ema.copy_to_model()
    unet.cpu().eval()
    text_encoder.cpu().eval()
    return {"unet_final_loss": sum(recent) / max(len(recent), 1)}


# --- open_clip CLIPs ------------------------------------------------------------------------------
def clip_model_config(width: int = 96, layers: int = 3, vision: str = "vit", resnet_width: int = 16) -> dict:
    """A tiny open_clip config. The backbone is a ViT (its patch tokens are the encoder's spatial
    features, as with ViT-H-14); the metrics CLIP uses open_clip's ModifiedResNet, whose convolutions
    learn shape from little data where a tiny ViT only learned colour (17-29% zero-shot on shape)."""
    vision_cfg = ({"image_size": 64, "layers": layers, "width": width, "patch_size": 8, "head_width": 32}
                  if vision == "vit"
                  else {"image_size": 64, "layers": [1, 1, 1, 1], "width": resnet_width, "head_width": 32})
    return {
        "embed_dim": 64,
        "vision_cfg": vision_cfg,
        # the standard open_clip BPE vocabulary, so stock get_tokenizer() works; text tower kept narrow
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3},
    }


def train_clip(name: str, out: Path, scenes: list[tw.Scene], images: torch.Tensor, b: BootstrapConfig,
               seed: int, steps: int, hard: tuple[list[tw.Scene], torch.Tensor] | None = None,
               vision: str = "vit", width: int = 16) -> dict:
    """Train one open_clip CLIP contrastively on (render, caption) pairs and save config + weights.
    `hard`: scenes in consecutive groups of 4 attribute swaps (see attribute_swaps) with their renders;
    each batch then gives half its rows to whole groups, captioned in full."""
    import open_clip  # open_clip: only when the CLIPs train (start-up time)

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{name}.json"
    config_path.write_text(json.dumps(clip_model_config(vision=vision, resnet_width=width), indent=1) + "\n")
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name).to(b.device)
    tokenizer = open_clip.get_tokenizer(name)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=b.device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=b.device).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=b.clip_lr, weight_decay=0.05)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    progress = Progress(f"clip:{name}", steps)
    model.train()
    for step in range(steps):
        n_random = b.clip_batch // 2 if hard else b.clip_batch
        idx = torch.randint(len(scenes), (n_random,), generator=gen)
        batch_images = images[idx]
        captions = [caption_variant(scenes[i], rng) for i in idx.tolist()]
        if hard:
            hard_scenes, hard_images = hard
            groups = torch.randint(len(hard_scenes) // 4, ((b.clip_batch - n_random) // 4,), generator=gen)
            hidx = (groups[:, None] * 4 + torch.arange(4)).flatten()
            batch_images = torch.cat([batch_images, hard_images[hidx]])
            captions += [hard_scenes[i].caption() for i in hidx.tolist()]
        pixels = ((batch_images.to(b.device) + 1) / 2 - mean) / std
        texts = tokenizer(captions).to(b.device)
        img_f, txt_f, scale = model(pixels, texts)[:3]  # normalised features, exp(logit_scale)
        logits = scale * img_f @ txt_f.T
        labels = torch.arange(len(captions), device=b.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / max(1, steps // 20))
            group["lr"] = b.clip_lr * warm * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        progress.update(step + 1, loss=loss.item())
    model.cpu().eval()
    # fp16 on disk halves the size; open_clip loads it into the fp32 model unchanged in meaning
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    return {"params": sum(p.numel() for p in model.parameters()), "final_loss": loss.item()}


def hard_groups(groups: int, seed: int, swap_seed: int) -> tuple[list[tw.Scene], torch.Tensor]:
    """`groups` scenes of the base's distribution, each followed by its three attribute swaps, and their renders."""
    rng = random.Random(swap_seed)
    scenes = [v for s in tw.scenes_for_training(groups, seed) for v in attribute_swaps(s, rng)]
    return scenes, render_dataset(scenes, seed)


def train_backbone_clip(out: Path, scenes: list[tw.Scene], images: torch.Tensor, b: BootstrapConfig) -> dict:
    """The encoder's backbone: half the base's renders, plus attribute-swap groups so its features see shape."""
    seed = b.seed + 1
    hard = hard_groups(b.backbone_hard_groups, b.seed + 4, b.seed + 4) if b.backbone_hard_groups else None
    return train_clip("datencoder-toy-backbone", out, scenes, images, b, seed, b.clip_steps, hard=hard,
                      vision=b.backbone_vision, width=b.backbone_width)


def train_metrics_clip(out: Path, n: int, b: BootstrapConfig) -> dict:
    """The judge: fresh renders and its own seed (never the base's data or generated images), plus
    attribute-swap groups so it separates shapes, not just colours."""
    seed = b.seed + 2
    scenes = tw.scenes_for_training(n, seed)
    return train_clip("datencoder-toy-metrics", out, scenes, render_dataset(scenes, seed), b, seed,
                      b.metrics_clip_steps, hard=hard_groups(b.clip_hard_groups, seed + 1, seed), vision="resnet",
                      width=b.metrics_clip_width)


# --- the stages -----------------------------------------------------------------------------------
# one DVC stage each, so a changed UNet recipe does not retrain the VAE, nor a new backbone recipe the judge
PARTS = ("vae", "unet", "backbone", "metrics")
ALIASES = {"clips": ("backbone", "metrics")}


class _Staged:
    """Write a part's outputs under out/.bootstrap-<part>.partial, then swap them into `out` only once the
    part is complete: an interrupted run never leaves something half-written that looks finished."""

    def __init__(self, out: Path, part: str):
        self.out, self.dir = out, out / f".bootstrap-{part}.partial"
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def commit(self, *relative: str) -> None:
        for rel in relative:
            target = self.out / rel
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.dir / rel).rename(target)
        shutil.rmtree(self.dir)


def bootstrap_vae(out: Path, scenes: list[tw.Scene], images: torch.Tensor, b: BootstrapConfig) -> dict:
    """models/toy-base/vae, with the latent scaling factor that gives the UNet unit-variance latents."""
    staged = _Staged(out, "vae")
    torch.manual_seed(b.seed)
    vae = train_vae(images, b)
    vae.register_to_config(scaling_factor=float(1.0 / encode_latents(vae, images).std()))
    finetune_decoder(vae, images, b)
    vae.cpu().save_pretrained(staged.dir / "toy-base" / "vae", safe_serialization=True)
    staged.commit("toy-base/vae")
    return {"params": {"vae": sum(p.numel() for p in vae.parameters())},
            "latent_scaling_factor": vae.config.scaling_factor}


def bootstrap_unet(out: Path, scenes: list[tw.Scene], images: torch.Tensor, b: BootstrapConfig) -> dict:
    """The rest of models/toy-base (tokenizer, text encoder, UNet, scheduler, model_index.json), trained on
    the latents of the VAE already in models/toy-base/vae."""
    # diffusers: only when this part trains (start-up time)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae_dir = out / "toy-base" / "vae"
    if not (vae_dir / "config.json").is_file():
        raise UserError(f"{vae_dir} is missing: train it first with `datencoder bootstrap --part vae`")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    staged = _Staged(out, "unet")
    latents = encode_latents(vae.to(b.device), images) * vae.config.scaling_factor
    vae.cpu()
    tokenizer = save_toy_tokenizer(staged.dir / "toy-base" / "tokenizer")
    max_length = tokenizer.model_max_length
    def enc(texts):
        return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids
    torch.manual_seed(b.seed + 5)  # the UNet's init does not depend on whether the VAE was trained in this call
    text_encoder = make_text_encoder(len(tokenizer), b, tokenizer.bos_token_id, tokenizer.eos_token_id, max_length)
    unet = make_unet(b)
    losses = train_denoiser(latents, enc([s.caption() for s in scenes]), enc([""])[0], text_encoder, unet, b)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**scheduler_config(b)), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(staged.dir / "toy-base", safe_serialization=True)
    staged.commit(*(f"toy-base/{name}"
                    for name in ("tokenizer", "text_encoder", "unet", "scheduler", "model_index.json")))
    return {"params": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
            "final_loss": {"unet": losses["unet_final_loss"]}}


def bootstrap_backbone(out: Path, scenes: list[tw.Scene], images: torch.Tensor, b: BootstrapConfig) -> dict:
    """models/toy-clip/backbone: the encoder's backbone, on the first half of the base's renders."""
    staged = _Staged(out, "backbone")
    half = len(scenes) // 2
    report = train_backbone_clip(staged.dir / "toy-clip" / "backbone", scenes[:half], images[:half], b)
    staged.commit("toy-clip/backbone")
    return {"params": {"clip_backbone": report["params"]}, "final_loss": {"clip_backbone": report["final_loss"]}}


def bootstrap_metrics(out: Path, scenes: list[tw.Scene], images: torch.Tensor, b: BootstrapConfig) -> dict:
    """models/toy-clip/metrics: the judge, on renders of its own."""
    staged = _Staged(out, "metrics")
    report = train_metrics_clip(staged.dir / "toy-clip" / "metrics", len(scenes) // 2, b)
    staged.commit("toy-clip/metrics")
    return {"params": {"clip_metrics": report["params"]}, "final_loss": {"clip_metrics": report["final_loss"]}}


def bootstrap(cfg: Config, out_dir: str | None = None, parts: tuple[str, ...] = PARTS) -> dict:
    """Train and save the given parts of models/toy-base and models/toy-clip; return a report."""
    b = cfg.bootstrap
    parts = tuple(dict.fromkeys(q for p in parts for q in ALIASES.get(p, (p,))))
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UserError(f"bootstrap parts must be some of {', '.join(PARTS + tuple(ALIASES))}; "
                        f"got {', '.join(parts) or 'none'}")
    if b.device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"bootstrap.device is {b.device!r} but this machine has no CUDA device; use cpu")
    out = Path(out_dir or b.out_dir)
    torch.set_num_threads(b.threads)
    started = time.perf_counter()
    scenes = tw.scenes_for_training(b.train_images, b.seed, cfg.toy_world.base_holdout_fraction)
    images = render_dataset(scenes, b.seed)
    log.info("rendered %d training scenes (held-out combos excluded)", len(scenes))
    timings = {"render_s": round(time.perf_counter() - started, 1)}
    report: dict = {"out": str(out), "parts": list(parts), "params": {}, "final_loss": {}}
    for part, train in (("vae", bootstrap_vae), ("unet", bootstrap_unet), ("backbone", bootstrap_backbone),
                        ("metrics", bootstrap_metrics)):
        if part in parts:
            t = time.perf_counter()
            result = train(out, scenes, images, b)
            timings[f"{part}_s"] = round(time.perf_counter() - t, 1)
            for key in ("params", "final_loss"):
                report[key].update(result.pop(key, {}))
            report.update(result)
    size = sum(f.stat().st_size for d in ("toy-base", "toy-clip") if (out / d).exists()
               for f in (out / d).rglob("*") if f.is_file())
    return {**report, "seconds": round(time.perf_counter() - started, 1), "timings": timings,
            "size_mb": round(size / 2**20, 2)}
