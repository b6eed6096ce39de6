"""Encoder pre-training, one worker's view (nanoGPT style: read it top to bottom).

Every Ray Train worker runs `worker_loop`; `components/training/pretrain.py` launches them. Per worker:

    setup    load the frozen base, build the encoder (same seed everywhere), wrap it in DDP with Ray
             Train's `prepare_model`, AdamW + linear warm-up / cosine decay; resume from Ray's latest
             checkpoint if there is one
    step     for each micro-batch of this worker's manifest shard: VAE latents, losses (the
             contrastive negatives are all_gathered across workers inside the encoder), backward
             (DDP all-reduces on the last micro-batch only); clip the global gradient norm; step
    log      every log_every steps: loss terms averaged over workers, lr, grad norm -> MLflow (rank 0)
    eval     every eval_every steps: held-out denoising loss and a sample grid (rank 0)
    save     every checkpoint_every steps and at the end: encoder safetensors, optimiser, schedule,
             step (rank 0), each rank's RNG state; ray.train.report is a barrier for all ranks

The data order, the prompts and (through the saved RNG states) the noise and timesteps are pure
functions of the seed and the step, so a resumed run computes what an uninterrupted one would. That
is why the data is a `Shard` and not a DataLoader behind Ray's `prepare_data_loader`: a
DistributedSampler's position is loader state that a checkpoint would have to carry, and a
Shard's batch at a step is computed from the step alone.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn

from components import tracking
from components.config import EncoderConfig, PretrainConfig, TrainingConfig
from components.data.images import to_arrays
from components.errors import UserError
from components.memory import peak_mb
from components.model.base import load_pipeline
from components.model.dual_path import condition
from components.model.encoder import FrozenBase, TuningEncoder
from components.model.placeholder import PLACEHOLDER
from components.progress import Progress
from components.toy import reader
from components.toy import world as tw


log = logging.getLogger(__name__)

ENCODER_DIR = "encoder"  # inside a checkpoint: TuningEncoder.save_pretrained
TRAINER_STATE = "trainer.pt"  # step, optimiser, schedule (torch.load(weights_only=True))
HELDOUT_TIMESTEPS = 4  # held-out loss: each image at this many evenly spaced noise levels


# --- data -----------------------------------------------------------------------------------------
def train_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[manifest["split"] == "train"].sort_values("path", ignore_index=True)


def model_pixels(images: np.ndarray) -> Tensor:
    """uint8 images (N, H, W, 3) -> (N, 3, H, W) float in [-1, 1], the VAE's input."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_pixels(paths: list[Path]) -> Tensor:
    """Image files -> (N, 3, H, W) in [-1, 1]."""
    return model_pixels(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))


class Prompts:
    """Each training image's prompt (PretrainConfig): its caption template from the manifest with S* where the object
    goes; else, with `describe_scene`, the toy reader's template of its pixels; else one of the generic prompts, drawn
    by `g` (with `label_prompts`: "S* <label>" in their place)."""

    def __init__(self, p: PretrainConfig):
        self.p = p

    def __call__(self, pixels: Tensor, rows: pd.DataFrame, g: torch.Generator) -> list[str]:
        images = to_arrays(pixels)
        drawn = torch.randint(len(self.p.prompts), (len(rows),), generator=g).tolist()
        return [self.one(image, row, k) for image, row, k in zip(images, rows.itertuples(), drawn)]

    def one(self, image: np.ndarray, row, k: int = 0) -> str:
        template = getattr(row, "template", "") if self.p.templates else ""
        template = template if isinstance(template, str) else ""  # a manifest prepared without caption templates
        if not template and self.p.describe_scene:
            template = reader.describe(image) or ""
        if template:
            return template.replace("{}", PLACEHOLDER)
        prompt = self.p.prompts[k]
        return prompt.replace(PLACEHOLDER, f"{PLACEHOLDER} {row.label}") if self.p.label_prompts else prompt


class Shard:
    """This worker's rows of the train split (row i goes to worker i % world), read as an endless
    stream: epoch e visits the rows in a permutation seeded by (seed, rank, e). `batch(position, n)` is
    a pure function of its arguments, so resuming at a step needs no data-loader state."""

    def __init__(self, root: Path, manifest: pd.DataFrame, rank: int, world: int, prompts: Prompts, seed: int):
        self.rows = train_rows(manifest).iloc[rank::world].reset_index(drop=True)
        self.root, self.prompts, self.seed, self.rank = root, prompts, seed, rank
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.rows)

    def _row(self, position: int) -> int:
        epoch, i = divmod(position, len(self.rows))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(hash((self.seed, self.rank, epoch)) % 2**63)
            self._epoch, self._order = epoch, torch.randperm(len(self.rows), generator=g)
        return int(self._order[i])

    def batch(self, position: int, n: int) -> tuple[Tensor, list[str]]:
        """Pixels of stream positions [position, position + n) and each one's prompt."""
        rows = self.rows.iloc[[self._row(p) for p in range(position, position + n)]]
        pixels = load_pixels([self.root / path for path in rows["path"]])
        g = torch.Generator().manual_seed(hash((self.seed, self.rank, position)) % 2**63)
        return pixels, self.prompts(pixels, rows, g)


def training_timesteps(n: int, steps: int, sampling: str, device) -> Tensor:
    """n diffusion timesteps in [0, steps): uniform, or high-noise (density rising linearly with t:
    t = steps * sqrt(u))."""
    if sampling == "uniform":
        return torch.randint(0, steps, (n,), device=device)
    if sampling == "high-noise":
        return (torch.rand(n, device=device).sqrt() * steps).long().clamp(max=steps - 1)
    raise ValueError(f"unknown timestep sampling {sampling!r}; choose uniform or high-noise")


# --- optimisation ---------------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total` (paper's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def initial_encoder(encoder: EncoderConfig, seed: int, base: FrozenBase) -> TuningEncoder:
    """The encoder at step 0 (pretrain.seed): identical on every worker, and reproducible as the untrained
    baseline."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TuningEncoder.for_base(encoder, base)


def autocast(device: torch.device):
    """bf16 on GPUs (the UNet and the heads run in bf16, losses and the optimiser in fp32); fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass
class Training:
    """Everything one worker trains with; `step` is one optimiser step, `save`/`restore` a checkpoint."""

    config: TrainingConfig
    pipe: Any  # the base pipeline: its VAE makes latents, its sampler draws sample grids
    base: FrozenBase  # shares the pipeline's UNet and text encoder
    encoder: TuningEncoder
    model: nn.Module  # the encoder, DDP-wrapped when there are several workers
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    shard: Shard
    device: torch.device
    micro_batch: int

    @classmethod
    def build(cls, config: TrainingConfig, manifest: pd.DataFrame, rank: int, world: int, device: torch.device,
              ) -> Training:
        p = config.pretrain
        pipe = load_pipeline(config.base)
        base = FrozenBase.load(config.base, pipe=pipe)
        pipe.to(device)
        base.to(device)
        encoder = initial_encoder(config.encoder, p.seed, base).to(device)
        model = encoder
        if world > 1:  # frozen base parts are plain attributes: DDP neither syncs nor broadcasts them
            import ray.train.torch  # ray: in a Ray Train worker only

            # Ray Train's DDP wrapping: device_ids and output_device from this worker's GPU, none on CPUs
            model = ray.train.torch.prepare_model(encoder, move_to_device=device)
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, p.warmup_steps, p.max_steps))
        torch.manual_seed(p.seed * 1000 + rank)  # noise and timesteps differ between workers
        base.prompts.tokenize(p.prompts)  # a generic prompt without S* fails before the first step
        shard = Shard(Path(config.data), manifest, rank, world, Prompts(p), p.seed)
        return cls(config, pipe, base, encoder, model, optimizer, schedule, shard, device,
                   p.batch_size // (world * p.grad_accum))

    def encoder_timesteps(self, n: int) -> Tensor | None:
        """What the encoder's input is noised to (PretrainConfig.encoder_noise): None, the loss's own timesteps."""
        if self.config.pretrain.encoder_noise == "matched":
            return None
        return torch.full((n,), self.config.encoder_timestep, device=self.device)

    @torch.no_grad()
    def latents(self, pixels: Tensor) -> Tensor:
        """The base VAE's scaled latents (the mean, as the base model was trained on)."""
        vae = self.pipe.vae
        return vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor

    def step(self, step: int, gradient_norms: bool = False) -> tuple[dict[str, Tensor], dict[str, float]]:
        """One optimiser step (0-based `step`): this worker's loss terms (means over its micro-batches; with
        `gradient_norms` also the two pulls on v*, see TuningEncoder.forward), and the learning rate and global
        gradient norm (before clipping) of the step."""
        p = self.config.pretrain
        accum = p.grad_accum
        totals: dict[str, Tensor] = {}
        for micro in range(accum):
            pixels, prompt = self.shard.batch((step * accum + micro) * self.micro_batch, self.micro_batch)
            pixels = pixels.to(self.device)
            latents = self.latents(pixels)
            timesteps = training_timesteps(len(latents), self.base.noise_scheduler.config.num_train_timesteps,
                                           p.timestep_sampling, latents.device)
            seen_at = self.encoder_timesteps(len(latents))
            last = micro == accum - 1
            # gradients are all-reduced once per optimiser step, on the last micro-batch
            ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
            no_sync = self.model.no_sync() if ddp and not last else nullcontext()
            with no_sync, autocast(self.device):
                losses = self.model(pixels, latents, prompt, timesteps=timesteps, gradient_norms=gradient_norms,
                                    encoder_timesteps=seen_at)
                (losses["total"] / accum).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0) + value.detach().float() / accum
        # the gradient is all-reduced by now, so its norm (and the clipping) is the same on every worker
        grad_norm = nn.utils.clip_grad_norm_(self.encoder.parameters(), self.config.pretrain.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals, {"grad_norm": grad_norm.item(), "lr": lr}

    def save(self, directory: Path, step: int, rank: int) -> None:
        """This rank's part of the checkpoint after `step` steps (Ray merges the ranks' directories)."""
        if rank == 0:
            self.encoder.save_pretrained(directory / ENCODER_DIR)
            torch.save({"step": step, "optimizer": self.optimizer.state_dict(),
                        "schedule": self.schedule.state_dict()}, directory / TRAINER_STATE)
        torch.save(rng_state(), directory / f"rng-{rank}.pt")

    def restore(self, directory: Path, rank: int) -> int:
        """Load a checkpoint; returns its step."""
        self.encoder.load_state_dict(load_file(str(directory / ENCODER_DIR / "model.safetensors")))
        state = torch.load(directory / TRAINER_STATE, weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        step = int(state["step"])
        # the decay ends at this run's max_steps, which may have grown since the checkpoint was written
        p = self.config.pretrain
        for group, base_lr in zip(self.optimizer.param_groups, self.schedule.base_lrs):
            group["lr"] = base_lr * lr_factor(step, p.warmup_steps, p.max_steps)
        rng = directory / f"rng-{rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        else:  # more workers than when it was saved: a fresh stream, still a function of (seed, rank, step)
            torch.manual_seed(hash((p.seed, rank, step)) % 2**63)
        return step


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- held-out evaluation and sample grids (rank 0) -----------------------------------------------
# the identity signal's noise levels (fractions of the schedule): where the object's colour and shape are decided
IDENTITY_LEVELS = (0.725, 0.8, 0.875, 0.95)
IDENTITY_CONDITIONS = ("encoder", "caption", "wrong_colour", "wrong_shape", "object")


@dataclass
class HeldOutSet:
    pixels: Tensor  # (N, 3, H, W) in [-1, 1]
    prompts: list[str]  # each image's prompt with S*, as training would give it
    scenes: list[tw.Scene] | None = None  # toy renders: what they show, for the identity signal


def _swapped(scene: tw.Scene, attribute: str) -> tw.Scene:
    """The scene with the object's colour or shape replaced by the next one in the vocabulary that stays visible."""
    c = scene.concept
    if attribute == "shape":
        return replace(scene, concept=replace(c, shape=tw.SHAPES[(tw.SHAPES.index(c.shape) + 1) % len(tw.SHAPES)]))
    colours = list(tw.COLOURS)
    taken = {c.colour, c.pattern_colour, scene.background_colour}
    other = next(colours[(colours.index(c.colour) + k) % len(colours)] for k in range(1, len(colours) + 1)
                 if colours[(colours.index(c.colour) + k) % len(colours)] not in taken)
    return replace(scene, concept=replace(c, colour=other))


class HeldOut:
    """Images the encoder never trains on, with fixed noise and timesteps: the val split of the manifest and, for
    the toy world, renders of the shapes pre-training saw and of those it never saw (the paper's unseen domains)."""

    def __init__(self, config: TrainingConfig, manifest: pd.DataFrame):
        p = config.pretrain
        prompts = Prompts(p)
        val = manifest[manifest["split"] == "val"].sort_values("path").head(p.heldout_images)
        self.sets: dict[str, HeldOutSet] = {}
        if len(val):
            pixels = load_pixels([Path(config.data) / path for path in val["path"]])
            images = to_arrays(pixels)
            self.sets["val"] = HeldOutSet(pixels, [prompts.one(image, row)
                                                   for image, row in zip(images, val.itertuples())])
        held_out = config.holdout_shapes
        if config.base.kind == "toy" and held_out:
            rng = random.Random(p.seed)
            for name, shapes in (("seen_shapes", [s for s in tw.SHAPES if s not in held_out]),
                                 ("unseen_shapes", held_out)):
                scenes = [tw.sample_scene(rng, shapes=shapes, edits=False) for _ in range(p.heldout_images)]
                pixels = model_pixels(tw.render_batch(scenes, config.resolution, p.seed))
                self.sets[name] = HeldOutSet(pixels, [s.template().replace("{}", PLACEHOLDER) for s in scenes], scenes)
        self.seed = p.seed

    def _noised(self, training: Training, pixels: Tensor, fractions: list[float], chunk: int, seed: int | None = None):
        """Each image at each noise level (image-major): pixels, timesteps, noisy latents and targets, fixed noise."""
        steps = training.base.noise_scheduler.config.num_train_timesteps
        levels = torch.tensor([min(steps - 1, int(f * steps)) for f in fractions])
        pixels = pixels.repeat_interleave(len(levels), 0)
        timesteps = levels.repeat(len(pixels) // len(levels)).to(training.device)
        latents = torch.cat([training.latents(pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)])
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(
            self.seed if seed is None else seed)).to(latents)
        noisy, target = training.base.noised(latents, noise, timesteps)
        return pixels, timesteps, noisy, target

    @torch.no_grad()
    def losses(self, training: Training, encoder: TuningEncoder, chunk: int = 32,
               fractions: list[float] | None = None) -> dict[str, float]:
        """Mean denoising loss (Eq. 1) per held-out set under the encoder's prediction: each image at
        HELDOUT_TIMESTEPS evenly spaced noise levels (or at `fractions` of the schedule)."""
        base, cfg = training.base, encoder.config
        steps = base.noise_scheduler.config.num_train_timesteps
        fractions = fractions or [(k + 0.5) / HELDOUT_TIMESTEPS for k in range(HELDOUT_TIMESTEPS)]
        encoder.eval()
        out = {}
        for name, held in self.sets.items():
            pixels, timesteps, noisy, target = self._noised(training, held.pixels, fractions, chunk)
            seen_at, seen = timesteps, noisy  # what the encoder reads: as training does (encoder_noise)
            fixed = training.encoder_timesteps(len(pixels))
            if fixed is not None:
                seen = self._noised(training, held.pixels, [fixed[0].item() / steps], chunk, self.seed + 1)[2]
                seen_at, seen = fixed, seen.repeat_interleave(len(fractions), 0)
            prompts = [prompt for prompt in held.prompts for _ in fractions]
            total = 0.0
            for i in range(0, len(pixels), chunk):
                rows = slice(i, i + chunk)
                with autocast(training.device):
                    v_star, factors = encoder.predict(pixels[rows].to(training.device), seen[rows], seen_at[rows])
                    ids = base.prompts.tokenize(prompts[rows])
                    pred = base.denoise(noisy[rows], timesteps[rows], ids, v_star, factors, cfg.lora_scale,
                                        cfg.alpha("train"))
                total += F.mse_loss(pred.float(), target[rows].float(), reduction="sum").item()
            out[name] = total / target.numel()
        encoder.train()
        return out

    @torch.no_grad()
    def identity(self, training: Training, encoder: TuningEncoder, chunk: int = 32) -> dict[str, float]:
        """The cheap identity signal: held-out denoising loss at high noise (IDENTITY_LEVELS) of each toy render set
        under the encoder's prediction and, with the vanilla base, under the true caption, a caption with the wrong
        colour, one with the wrong shape and the prompt with the word "object" for S*. Where colour and shape are
        decided, an encoder that carries the object scores below the wrong-colour caption."""
        out = {}
        fractions = list(IDENTITY_LEVELS)
        encoder_losses = self.losses(training, encoder, chunk, fractions)
        base = training.base
        for name, held in self.sets.items():
            if held.scenes is None:
                continue
            _, timesteps, noisy, target = self._noised(training, held.pixels, fractions, chunk)
            texts = {"caption": [s.caption() for s in held.scenes],
                     "wrong_colour": [_swapped(s, "colour").caption() for s in held.scenes],
                     "wrong_shape": [_swapped(s, "shape").caption() for s in held.scenes],
                     "object": [s.template().replace("{}", "object") for s in held.scenes]}
            out[f"{name}/encoder"] = encoder_losses[name]
            for caption_kind, captions in texts.items():
                captions = [c for c in captions for _ in fractions]
                total = 0.0
                for i in range(0, len(captions), chunk):
                    rows = slice(i, i + chunk)
                    context = base.prompts.encode(base.prompts.tokenize(captions[rows], require_placeholder=False))
                    with autocast(training.device):
                        pred = base.unet(noisy[rows], timesteps[rows], encoder_hidden_states=context).sample
                    total += F.mse_loss(pred.float(), target[rows].float(), reduction="sum").item()
                out[f"{name}/{caption_kind}"] = total / target.numel()
        return out

    @torch.no_grad()
    def grid(self, training: Training) -> Image.Image:
        """Rows: held-out concepts; columns: the input, then a generation for each sample prompt from
        the encoder's v* and offsets (predicted once, from the image's latent noised to mid-schedule)."""
        p, base, encoder = training.config.pretrain, training.base, training.encoder
        cfg = encoder.config
        per_set = max(1, p.sample_concepts // max(1, len(self.sets)))
        pixels = torch.cat([held.pixels[:per_set] for held in self.sets.values()])[: p.sample_concepts]
        pixels = pixels.to(training.device)
        n = len(pixels)
        g = torch.Generator().manual_seed(self.seed)
        latents = training.latents(pixels)
        t = torch.full((n,), base.noise_scheduler.config.num_train_timesteps // 2, device=training.device)
        noisy, _ = base.noised(latents, torch.randn(latents.shape, generator=g).to(latents), t)
        encoder.eval()
        v_star, factors = encoder.predict(pixels, noisy, t)
        encoder.train()
        alpha = cfg.alpha("train")
        uncond = base.empty_context(n)
        columns = [(pixels.cpu() + 1) / 2]
        for prompt in p.sample_prompts:
            soft, concept = condition(base.prompts, base.prompts.tokenize([prompt] * n), v_star, factors,
                                      cfg.lora_scale, alpha)
            images = training.pipe(prompt_embeds=soft, negative_prompt_embeds=uncond,
                                   guidance_scale=p.sample_guidance_scale,
                                   cross_attention_kwargs={"concept": concept.with_guidance(uncond)
                                                           if p.sample_guidance_scale > 1 else concept},
                                   num_inference_steps=p.sample_num_inference_steps,
                                   generator=torch.Generator().manual_seed(self.seed),
                                   output_type="pt").images
            columns.append(images.float().cpu())
        tiles = torch.stack(columns, 1)  # (n, columns, 3, H, W)
        sheet = tiles.permute(0, 3, 1, 4, 2).reshape(n * tiles.shape[3], len(columns) * tiles.shape[4], 3)
        return Image.fromarray((sheet.clamp(0, 1) * 255).round().byte().numpy())


# --- the worker -----------------------------------------------------------------------------------
def gather(value: Any) -> list[Any]:
    """Every worker's `value` (a list of one without a process group)."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def mean_over_workers(values: dict[str, Tensor]) -> dict[str, float]:
    stacked = torch.stack([values[k].float() for k in sorted(values)])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(sorted(values), stacked.tolist()))


def restore_newest_readable(training: Training, checkpoint, rank: int) -> tuple[int, str | None]:
    """Restore Ray's latest checkpoint or, when it cannot be read (a truncated file, a crash while it was
    written), the newest earlier one of the run: -> (its step, what was skipped, or None). Every rank
    ends on the same step; none readable is a UserError (`--restart` starts over)."""
    import ray.train  # ray: in a Ray Train worker only

    folder = checkpoint.path.rsplit("/", 1)[0]
    found = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(folder))
    earlier = sorted((f.path for f in found if f.type == pyarrow.fs.FileType.Directory
                      and f.base_name.startswith("step-") and f.path.rstrip("/") != checkpoint.path.rstrip("/")
                      and f.base_name < checkpoint.path.rsplit("/", 1)[-1]), reverse=True)
    candidates = [checkpoint, *(ray.train.Checkpoint(path, checkpoint.filesystem) for path in earlier)]

    def restore(candidate) -> int:
        with candidate.as_directory() as directory:
            return training.restore(Path(directory), rank)

    skipped: list[str] = []
    for candidate in candidates:
        try:
            step = restore(candidate)
        except Exception as e:  # noqa: BLE001 - a corrupt file fails in torch, safetensors or the filesystem
            skipped.append(f"{candidate.path.rsplit('/', 1)[-1]} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            log.warning("checkpoint %s cannot be restored (%s); trying the one before it", candidate.path, skipped[-1])
            continue
        break
    else:
        raise UserError(f"no checkpoint of this run can be restored ({'; '.join(skipped)}): "
                        f"run `datencoder pretrain --restart` to start over")
    steps = gather(step)
    if len(set(steps)) > 1:  # a rank's own file was unreadable: all go back to the oldest step any rank has
        step = restore(next(c for c in candidates if c.path.rstrip("/").endswith(f"step-{min(steps):08d}")))
    if not skipped:
        return step, None
    note = f"resumed from step {step}: unreadable {', '.join(skipped)}"
    log.warning("%s", note)
    return step, note


def worker_loop(job: dict) -> None:
    """Ray Train's train_loop_per_worker. `job`: config (TrainingConfig.model_dump()), project_dir,
    tracking_uri, run_id (MLflow, logged to by rank 0 only), log_level (third-party logs)."""
    # ray: in a Ray Train worker only
    import ray.train
    import ray.train.torch


    os.chdir(job["project_dir"])  # the config's relative paths mean what they meant to the driver
    # Ray Train sets the worker's root logger to INFO (open_clip logs each model load there, Ray Train each report):
    # third-party lines at the CLI's level; our progress keeps INFO on a handler of its own
    logging.getLogger().setLevel(job["log_level"])
    progress_log = logging.getLogger("datencoder")
    if not progress_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        progress_log.addHandler(handler)
        progress_log.propagate = False
    progress_log.setLevel(logging.INFO)
    config = TrainingConfig.model_validate(job["config"])
    p = config.pretrain
    torch.set_num_threads(p.cpus_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    manifest = pd.read_parquet(Path(config.data) / "manifest.parquet")
    training = Training.build(config, manifest, rank, world, device)
    start, fallback = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start, fallback = restore_newest_readable(training, checkpoint, rank)

    mlflow = heldout = progress = None
    if rank == 0:
        # mlflow: rank 0 only (start-up time)
        import mlflow as fluent
        from mlflow import MlflowClient

        mlflow = MlflowClient(job["tracking_uri"])
        # system metrics the public way: the driver's run resumed here with log_system_metrics; MLflow's
        # monitor samples CPU, memory and GPU into it until end_run (this worker process owns no other run)
        fluent.set_tracking_uri(job["tracking_uri"])
        fluent.set_system_metrics_sampling_interval(p.system_metrics_s)
        fluent.start_run(run_id=job["run_id"], log_system_metrics=True)
        # one point per (re)start: a resumed run's history shows where each attempt began
        tracking.log_metrics(mlflow, job["run_id"], {"start_step": start}, step=start)
        if fallback:
            mlflow.set_tag(job["run_id"], "checkpoint_fallback", fallback[:500])
        heldout = HeldOut(config, manifest)
        progress = Progress("pretrain", p.max_steps)

    def report(step: int, metrics: dict[str, Any], save: bool) -> None:
        """A barrier for all ranks; with `save`, every rank contributes its part of the checkpoint."""
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            training.save(Path(directory), step, rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"step-{step:08d}")

    step_seconds: dict[bool, list[float]] = {False: [], True: []}  # steps after the first, by whether logged
    trained, identity = {}, {}
    for step in range(start, p.max_steps):
        t0 = time.perf_counter()
        done = step + 1
        logged = done % p.log_every == 0 or done == p.max_steps
        # the gradient norms cost a backward: logged steps only
        losses, stats = training.step(step, gradient_norms=logged)
        if logged:
            metrics = {k if k.startswith("grad_") else f"loss/{k}": v for k, v in mean_over_workers(losses).items()}
            metrics |= stats
            if rank == 0:
                tracking.log_metrics(mlflow, job["run_id"], metrics, step=done)
                progress.update(done, loss=metrics["loss/total"])
        if step > start:  # the first step pays for warm-up
            step_seconds[logged].append(time.perf_counter() - t0)
        if rank == 0 and (done % p.eval_every == 0 or done == p.max_steps):
            trained = heldout.losses(training, training.encoder)
            identity = heldout.identity(training, training.encoder)
            tracking.log_metrics(mlflow, job["run_id"], {f"heldout/{k}": v for k, v in trained.items()}
                                 | {f"identity/{k}": v for k, v in identity.items()}, step=done)
            mlflow.log_image(job["run_id"], heldout.grid(training), key="samples", step=done)
        if done % p.checkpoint_every == 0 and done < p.max_steps:
            report(done, {"step": done}, save=True)

    if start < p.max_steps:  # the final checkpoint carries the run's summary (the driver's result.metrics)
        final: dict[str, Any] = {
            "step": p.max_steps, "start_step": start,
            # steady state: unlogged steps (a logged one also pays for its gradient norms), else every step timed
            "samples_per_s": (p.batch_size * len(timed) / sum(timed)
                              if (timed := step_seconds[False] or step_seconds[True]) else None),
            "peak_memory_mb": gather(round(peak_mb(device), 1)),
            "nodes": gather(ray.get_runtime_context().get_node_id())}
        if rank == 0:
            untrained = heldout.losses(training, initial_encoder(config.encoder, p.seed, training.base).to(device))
            final["heldout"] = {name: {"untrained": untrained[name], "trained": trained[name]} for name in trained}
            final["identity"] = identity
            tracking.log_metrics(mlflow, job["run_id"], {f"heldout_untrained/{k}": v for k, v in untrained.items()},
                                 step=p.max_steps)
        report(p.max_steps, final, save=True)
    if rank == 0:
        # the driver ends the run (FINISHED or FAILED); this only stops the monitor
        fluent.end_run(status="RUNNING")
