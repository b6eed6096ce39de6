"""One typed configuration schema with presets.

A config is built as: defaults <- preset overrides <- config file (params.yaml) <- environment
(DATENCODER_<SECTION>__<KEY>) <- explicit overrides, then validated. Unknown keys and wrong types fail at
load with a message naming the key, because a typo in params.yaml silently training with defaults is the
worst kind of wrong.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from components import home
from components.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClipConfig(Section):
    """An open_clip model: a registered name plus a checkpoint file or pretrained tag."""

    model_name: str
    pretrained: str
    config_path: str | None = None  # open_clip config JSON to register first (toy CLIPs)


# the words of the toy base's training captions: the only rows of its text encoder that training moved (the others
# are byte and BPE rows at their random initialisation, "object" and "photo" among them)
TOY_VOCABULARY = [
    "a", "an", "on", "at", "the", "of", "two", "small", "large", "striped", "dotted", "checkered", "sketch", "pixel",
    "art", "top", "bottom", "left", "right", "background", "beach", "grass", "night",
    "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "black", "gray", "brown",
    "circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond", "hexagon", "crescent", "arrow",
    "pentagon", "circles", "squares", "triangles", "stars", "hearts", "crosses", "rings", "diamonds", "hexagons",
    "crescents", "arrows", "pentagons"]


class BaseConfig(Section):
    kind: Literal["toy", "sd15"] = "toy"
    pretrained: str = "models/toy-base"  # diffusers pipeline directory or hub id
    revision: str | None = None
    # the real words of the base's text encoder: the nearest-word candidates of the embedding regulariser and of the
    # dual path's hard prompt; None: every row but the special tokens (SD 1.5's CLIP was trained on all of them)
    vocabulary: list[str] | None = Field(default_factory=lambda: list(TOY_VOCABULARY))
    # recompute the frozen UNet's activations in backward: less GPU memory for more time a tuning step
    # (the sd15 default; docs/personalize.md "Speed and memory")
    gradient_checkpointing: bool = False
    backbone_clip: ClipConfig = ClipConfig(
        model_name="datencoder-toy-backbone",
        pretrained="models/toy-clip/backbone/open_clip_model.safetensors",
        config_path="models/toy-clip/backbone/datencoder-toy-backbone.json")
    metrics_clip: ClipConfig = ClipConfig(
        model_name="datencoder-toy-metrics",
        pretrained="models/toy-clip/metrics/open_clip_model.safetensors",
        config_path="models/toy-clip/metrics/datencoder-toy-metrics.json")


class RuntimeConfig(Section):
    """Where the base model runs and in what precision (components/runtime.py resolves it; docs/gpu.md)."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: CUDA when present, else the CPU
    # the frozen base's weights (and so sampling); auto: float32 on the CPU, bfloat16 (else float16) on a GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class ToyWorldConfig(Section):
    out: str = "data/raw/toy-world"
    n: int = Field(4000, gt=0)
    seed: int = 0
    scene_fraction: float = Field(0.25, ge=0, le=1)
    resolution: int = Field(64, gt=0)
    # shapes kept out of encoder pre-training: the unseen domains of the paper's claim
    encoder_holdout_shapes: list[str] = ["crescent", "arrow"]
    # (shape, colour, background colour) combos the base model never sees; check-base uses them
    base_holdout_fraction: float = Field(0.1, ge=0, lt=1)


class BootstrapConfig(Section):
    """Recipe for the tiny base model and CLIPs (see docs/bootstrap.md for why each choice)."""

    out_dir: str = "models"
    seed: int = 0
    threads: int = Field(2, gt=0)
    # "cuda" trains the same recipe on a GPU (used to search recipes; the committed models run on CPU)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    train_images: int = Field(20000, gt=0)
    # VAE 64x64x3 -> 16x16x4
    vae_channels: list[int] = [16, 32, 32]
    vae_steps: int = Field(6000, ge=0)
    vae_batch: int = Field(16, gt=0)
    vae_lr: float = Field(1e-3, gt=0)
    vae_kl_weight: float = Field(1e-6, ge=0)
    vae_decoder_steps: int = Field(0, ge=0)  # optional decoder-only fine-tune, encoder frozen
    # text encoder + UNet (trained jointly on cached latents)
    unet_steps: int = Field(5000, ge=0)
    unet_batch: int = Field(64, gt=0)
    unet_lr: float = Field(8e-4, gt=0)
    unet_channels: list[int] = [32, 64, 64]
    text_width: int = Field(64, gt=0)
    text_layers: int = Field(2, gt=0)
    warmup_steps: int = Field(200, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    cond_dropout: float = Field(0.1, ge=0, lt=1)
    min_snr_gamma: float = Field(5.0, gt=0)
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    zero_terminal_snr: bool = True
    # open_clip CLIPs (backbone and metrics: separate seeds and data so the judge is not the student)
    clip_steps: int = Field(4000, ge=0)  # backbone CLIP
    # the backbone's vision tower: open_clip's ModifiedResNet (its last stage is the encoder's feature map) or a ViT
    # (its patch tokens); attribute-swap groups of 4 in its batches make it see shape: without them colour alone
    # solves a toy batch (docs/bootstrap.md "The CLIPs" has the probes behind the choice)
    backbone_vision: Literal["resnet", "vit"] = "resnet"
    backbone_width: int = Field(16, gt=0)  # ModifiedResNet stem width
    backbone_hard_groups: int = Field(4000, ge=0)
    metrics_clip_steps: int = Field(7000, ge=0)
    clip_hard_groups: int = Field(4000, gt=0)  # attribute-swap groups of 4 for the metrics CLIP
    metrics_clip_width: int = Field(16, gt=0)  # ModifiedResNet stem width of the judge
    clip_batch: int = Field(128, gt=0)
    clip_lr: float = Field(1e-3, gt=0)


class CheckBaseConfig(Section):
    prompts: int = Field(48, gt=0)
    fresh_renders: int = Field(480, gt=0)
    guidance_scale: float = Field(4.0, ge=1)
    # diffusers' `guidance_rescale` (Lin et al. 2023 sec. 3.4), 0 = plain guidance: undoes what plain guidance
    # does to a zero-terminal-SNR base, over-exposed colours (docs/bootstrap.md "Sampling: guidance rescale")
    guidance_rescale: float = Field(1.0, ge=0, le=1)
    num_inference_steps: int = Field(25, gt=0)
    seed: int = 0


class S3Config(Section):
    """Where Open Images files are read from when `openimages_images` is an s3:// URI."""

    endpoint_url: str | None = None  # S3-compatible store; unset: AWS, or AWS_ENDPOINT_URL if set
    unsigned: bool = False  # anonymous reads, e.g. the public Open Images bucket
    region: str | None = None
    timeout_s: float = Field(30.0, gt=0)  # connect and read timeout of one attempt


class PrepareConfig(Section):
    """Data preparation: ImageNet class folders + Open Images largest-object crops (toy world here)."""

    out: str = "data/prepared"  # the prepared set (manifest.parquet + images): pre-training and evaluation read it
    imagenet: str | None = "data/raw/toy-world/imagenet"  # class folders (under train/ if present)
    imagenet_synsets: str | None = None  # LOC_synset_mapping.txt; default: <imagenet>/LOC_synset_mapping.txt
    openimages_boxes: str | None = "data/raw/toy-world/openimages/oidv6-train-annotations-bbox.csv"
    openimages_classes: str | None = "data/raw/toy-world/openimages/oidv7-class-descriptions.csv"
    # a folder, s3://bucket/prefix, or a {ImageID} template
    openimages_images: str | None = "data/raw/toy-world/openimages/train"
    # caption templates, a CSV with columns source, source_id, template ('a large {} on grass': `{}` where the
    # object goes): each prepared image's template becomes its pre-training prompt with S* there (docs/prepare.md)
    captions: str | None = "data/raw/toy-world/captions.csv"
    resolution: int = Field(64, gt=0)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    max_pixels: int = Field(50_000_000, gt=0)  # larger is a decompression bomb, not a photo
    skip_group_of: bool = True
    skip_depiction: bool = True
    threads: int = Field(8, gt=0)  # PIL and S3 reads release the GIL
    retries: int = Field(3, ge=0)  # extra attempts for S3 timeouts and 5xx
    s3: S3Config = S3Config()
    # fewer inputs read than this fraction of those requested (or no read of a source at all) fails the run
    # and keeps the previous output: a store that is down or refuses the credentials is not an empty dataset
    min_read_fraction: float = Field(0.9, ge=0, le=1)
    # labels (names or ids) kept out of the prepared set; the toy preset holds out the toy world's
    # encoder_holdout_shapes so pre-training never sees them (the paper's unseen-domain claim)
    exclude_labels: list[str] = Field(default_factory=lambda: list(ToyWorldConfig().encoder_holdout_shapes))


class EncoderConfig(Section):
    """The tuning encoder and its losses (docs/model_core.md). `ablate` measures the blend, the regulariser
    and the hypernetwork against these defaults (docs/evaluation.md "Ablations")."""

    rank: int = Field(4, gt=0)  # LoRA rank r of every predicted offset
    lora_scale: float = Field(1.0, gt=0)  # constant s in W + s * A @ B
    trunk_channels: int = Field(128, gt=0)
    trunk_blocks: int = Field(2, ge=0)
    token_hidden: int = Field(256, gt=0)
    # v* starts at this word's embedding (several words: their mean); why "object" on the toy base, whose text
    # encoder never saw it in a caption: docs/personalize.md "Concept fidelity"
    token_init_word: str = "object"
    token_init_spread: float = Field(0.1, ge=0)  # initial per-image spread, x mean token-embedding norm
    use_hypernetwork: bool = True  # False: embedding only (ablation)
    hyper_hidden: int = Field(256, gt=0)
    hyper_basis: int = Field(32, gt=0)  # k: per-dimension bases are Din x k and k x Dout
    regulariser: Literal["none", "l2", "nn-cosine", "contrastive"] = "contrastive"
    neighbours: int = Field(8, gt=0)  # K nearest real tokens as positives (Eq. 3)
    temperature: float = Field(0.07, gt=0)  # tau
    contrastive_weight: float = Field(0.01, ge=0)
    l2_embedding_weight: float = Field(0.01, ge=0)
    l2_offsets_weight: float = Field(0.01, ge=0)
    dual_path: bool = True  # False: alpha = 1 (plain LoRA + embedding) in every phase
    alpha_blend_train: float = Field(0.5, ge=0, le=1)
    alpha_blend_tune: float = Field(0.5, ge=0, le=1)

    def alpha(self, phase: Literal["train", "tune"]) -> float:
        """Eq. 5's blend for a phase (the one home of this rule); without the dual path, 1: the hard prompt alone."""
        if not self.dual_path:
            return 1.0
        return self.alpha_blend_train if phase == "train" else self.alpha_blend_tune


class PretrainConfig(Section):
    """Distributed encoder pre-training (docs/pretrain.md). Batch sizes are global (all workers together)."""

    # it reads prepare.out (on a filesystem every worker sees) and writes the encoder to personalize.encoder
    storage: str = "checkpoints"  # Ray Train storage for checkpoints: a local path or s3://bucket/prefix
    s3: S3Config = S3Config()  # endpoint/region for s3:// storage; credentials only from the environment
    workers: int = Field(2, gt=0)
    cpus_per_worker: int = Field(1, gt=0)  # Ray CPUs per worker, also its torch threads
    use_gpu: bool | None = None  # None: use GPUs when the cluster has one per worker
    max_steps: int = Field(1000, gt=0)  # optimiser steps; the cosine decay ends here
    batch_size: int = Field(32, gt=0)  # samples per optimiser step, split over workers and micro-batches
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimiser step
    # AdamW, linear warm-up then cosine decay to 0; the paper's 1e-4 (sd15) leaves the toy encoder at chance after
    # 1000 steps, 5e-4 does not (docs/pretrain.md "Recipe")
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)  # max global gradient norm
    seed: int = 0
    # an image with a caption template in the manifest (prepare.captions) is prompted with it, S* where the object
    # goes and everything else named (size, count, position, style, background), so S* carries the object alone
    templates: bool = True
    # an image without one: the toy world's reading of its scene where it can (components/toy/scene_reader.py), else
    # one of `prompts` at random, or with `label_prompts` the prepared label after S* ("a photo of S* tench")
    describe_scene: bool = True
    prompts: list[str] = ["a photo of S*"]  # each must contain S*
    label_prompts: bool = False
    # diffusion timesteps of a training sample: uniform, or high-noise (density rising linearly with t, where the
    # object's colour and shape are decided); docs/pretrain.md "What a step is"
    timestep_sampling: Literal["uniform", "high-noise"] = "uniform"
    # what the encoder reads: the latent noised at the loss's timestep (matched, the paper's), or at
    # personalize.encoder_timestep with noise of its own (fixed: what personalisation does, one prediction for every
    # sampling step); docs/pretrain.md "What a step is"
    encoder_noise: Literal["matched", "fixed"] = "fixed"
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(3, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)
    experiment: str = "datencoder-pretrain"  # MLflow experiment (a parent run's experiment wins)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(250, gt=0)  # held-out loss and a sample grid
    heldout_images: int = Field(32, gt=0)  # per held-out set: the val split, the unseen shapes (toy)
    sample_concepts: int = Field(4, gt=0)  # grid rows
    sample_prompts: list[str] = ["a photo of S*", "S* on a beach"]  # grid columns after the input
    sample_num_inference_steps: int = Field(25, gt=0)
    sample_guidance_scale: float = Field(4.0, ge=1)
    system_metrics_s: float = Field(10.0, gt=0)  # MLflow system-metrics sampling interval


class PersonalizeConfig(Section):
    """One-shot personalisation (docs/personalize.md): encoder forward, a short tuning run, generation."""

    tuning_steps: int = Field(12, ge=0, le=100)  # tuning steps of v* and the LoRA factors (paper: at most 12)
    # 5x the paper's 2e-3: the toy encoder's start is near chance (identity_stages: "encoder 0"), and a dozen steps
    # of 2e-3 barely leave it; 1e-2 raises the CLIP shape reading 47% -> 88% on evaluation concepts, 47% -> 75% on
    # fresh looks (docs/personalize.md "Concept fidelity", "Identity stage by stage")
    lr: float = Field(1e-2, gt=0)
    # pull toward the encoder's initial prediction; measured 0 / 0.1 / 1 at lr 1e-2: every positive weight holds the
    # concept nearer that weak start (shape 88% / 56% / 19%), backgrounds follow the prompt in all (same section)
    l2_weight: float = Field(0.0, ge=0)
    # how the pull adds up (components.inference.tuning.tune): "sum", the squared L2 distance over every tuned entry;
    # "mean", the mean over tensors of each one's mean (the earlier rule: inert, weights 1 and 0 tuned alike)
    l2_reduction: Literal["sum", "mean"] = "sum"
    # augmented views of the single image per tuning step (the batch): more views fit the concept better and
    # cost adaptation time (docs/personalize.md "Concept fidelity", "Speed and memory")
    views: int = Field(4, gt=0)
    tune_parts: Literal["all", "embedding", "weights"] = "all"  # what tuning moves (the last two: ablations)
    # how tuning draws timesteps (components.inference.tuning.draw_timesteps): stratified spreads each step's views
    # and the run over the noise range, uniform draws each independently (docs/personalize.md "Concept fidelity")
    timestep_sampling: Literal["stratified", "uniform"] = "stratified"
    prompts: list[str] = ["a photo of S*"]  # tuning prompts (the pre-training prompts), each with S*
    describe_scene: bool = True  # as pretrain's: an input whose scene the toy reader reads tunes on that template
    encoder_timestep: int = Field(500, ge=0)  # noise level of the latent the encoder sees
    # the hypernetwork's predicted offsets in tuning's start, scaled (B x this): 1 is the paper's, 0 starts from v*
    # alone with B = 0 (LoRA's own start) and tuning learns the offsets; chosen by identity_stages' ablation
    predicted_offsets: float = Field(1.0, ge=0, le=1)
    alpha_blend: float | None = Field(None, ge=0, le=1)  # generation blend; None: encoder.alpha_blend_tune
    num_images: int = Field(1, ge=1, le=16)
    seed: int = 0
    # classifier-free guidance; toy 1.5, sd15 4 (why: docs/personalize.md "Concept fidelity")
    guidance_scale: float = Field(1.5, ge=1)
    # as check_base.guidance_rescale; 0 = plain guidance, whose overshoot is what shows a personalised concept's
    # weak colour (docs/personalize.md "Concept fidelity")
    guidance_rescale: float = Field(0.0, ge=0, le=1)
    num_inference_steps: int = Field(25, gt=0, le=1000)
    scheduler: Literal["ddim", "dpm"] = "ddim"  # DDIM or DPM-Solver++ on the base pipeline's config
    cache_size: int = Field(32, ge=0)  # tuned concepts kept in memory (LRU); 0 disables the cache
    max_pixels: int = Field(20_000_000, gt=0)  # larger input images are refused
    # the encoder (config.json + model.safetensors): pretrain writes it; personalize uses it when the registry has no
    # champion; evaluate, ablate and register read it
    encoder: str = "models/toy-encoder"
    out: str = "outputs/personalize"  # where the CLI writes images


class ServeConfig(Section):
    """Serving (docs/personalize.md "Serving"): what one request may ask for and how much work runs at once. The
    model applies the budget, the compute slots and the deadline itself wherever it is served
    (components/serving/limits.py); `datencoder serve` adds the body cap and a queue answered with Retry-After."""

    max_body_mb: float = Field(32.0, gt=0)  # request body; larger is refused 413 before it is read (servers only)
    max_images: int = Field(32, gt=0)  # generated images per request: rows with a prompt x num_images
    # tuning + sampling steps per request: concepts x tuning_steps + generated images x num_inference_steps
    max_steps: int = Field(1200, gt=0)
    max_input_images: int = Field(16, gt=0)  # distinct input images per request (each is read and encoded)
    max_image_mb: float = Field(10.0, gt=0)  # one input image's bytes
    max_concurrent: int = Field(1, gt=0)  # requests computing at once, per model copy (one uses every core on a CPU)
    max_queue: int = Field(8, ge=0)  # requests waiting for a slot; beyond it: 503 (with Retry-After from a server)
    retry_after_s: int = Field(10, gt=0)
    # from arrival to answer; a request over it is answered 504 and its work stops at the next UNet call.
    # CPU generation of 16 images takes minutes
    request_timeout_s: int = Field(900, gt=0)
    # where `datencoder serve` runs the model: uvicorn (one process, --workers copies) or Ray Serve replicas
    backend: Literal["uvicorn", "ray"] = "uvicorn"
    replicas: int = Field(1, gt=0)  # ray: model replicas (the autoscaler's minimum when max_replicas is set)
    max_replicas: int | None = Field(None, gt=0)  # ray: autoscale between replicas and this; None: fixed
    replica_cpus: float = Field(1.0, gt=0)  # ray: CPUs per replica (its torch threads)
    replica_gpus: float = Field(0.0, ge=0)  # ray: GPUs per replica (1: the replica runs on its own GPU)


class EvaluateConfig(Section):
    """The evaluation harness (docs/evaluation.md): CLIP metrics of ours, its variants and the baselines.

    The defaults size the toy grid to fit the pipeline's time budget on 2 CPU cores; `full: true` runs the
    whole grid (every concept for every method, `full_seeds`, `full_retrain_steps`; docs/evaluation.md
    "Sizes and time")."""

    # toy: concept keys colour-pattern-patterncolour-shape (components.toy.world.ToyConcept.key), all held out
    # of encoder pre-training (the first eight are shapes it never saw; the rest are unseen instances)
    concepts: list[str] = [
        "green-solid-pink-crescent", "green-dotted-orange-crescent", "green-checkered-black-crescent",
        "purple-dotted-white-arrow", "pink-solid-gray-crescent", "purple-solid-green-crescent",
        "brown-solid-purple-arrow", "purple-dotted-brown-arrow", "green-dotted-red-diamond",
        "yellow-checkered-red-triangle", "yellow-checkered-cyan-triangle", "pink-striped-white-cross",
        "gray-striped-red-square", "purple-striped-green-heart", "blue-checkered-cyan-diamond",
        "red-checkered-brown-square", "black-striped-yellow-star"]
    concept_dir: str | None = None  # sd15: one image per concept, or one folder of 3-5 images per concept
    prompts: list[str] = [
        "S* on a beach", "S* on grass", "S* at night", "S* on a blue background",
        "S* at the top left on a gray background", "S* at the bottom right on grass", "two S* on a gray background",
        "two S* on a beach", "a sketch of S* on a white background", "pixel art of S* at night"]
    prompts_file: str | None = None  # one prompt with S* per line; replaces `prompts` (the sd15 set)
    seeds: list[int] = [0]
    max_concepts: int | None = Field(10, gt=0)  # ours and its variants: the first N concepts (None: all)
    # the optimisation baselines: the first N concepts (ours is compared with them on those, paired); None: the same
    # concepts as ours (max_concepts). 5: half the baselines stage's time (all 10 take about 2 h on 2 CPU cores)
    baseline_concepts: int | None = Field(5, gt=0)
    few_shot_images: int = Field(4, ge=3, le=5)  # images of the concept for the few-shot baselines
    ti_steps: int = Field(3000, gt=0)
    ti_lr: float = Field(5e-3, gt=0)  # diffusers textual_inversion.py
    lora_steps: int = Field(500, gt=0)
    lora_lr: float = Field(1e-4, gt=0)  # diffusers train_dreambooth_lora.py
    dreambooth_steps: int = Field(400, gt=0)
    dreambooth_lr: float = Field(5e-6, gt=0)  # diffusers train_dreambooth.py
    dreambooth_prior_images: int = Field(0, ge=0)  # class images for prior preservation (0: off)
    # pre-training length of the re-trained variants (and their reference, the default recipe as long): a quarter
    # of the main encoder's 1000, long enough that a variant measures its recipe, not its warm-up; trained once by
    # the `variants` stage and kept as its DVC output (docs/evaluation.md "Re-trained variants")
    retrain_steps: int = Field(250, gt=0)
    # the time-to-identity curve (docs/evaluation.md): one-shot LoRA and TI after each of these step counts (one run
    # per concept, scored on the way), on the baselines' concepts, beside ours at 0 and tuning_steps, against time
    time_to_identity: bool = True
    time_to_identity_steps: list[PositiveInt] = Field([50, 100, 250, 500, 1000, 2000], min_length=1)
    full: bool = False
    full_retrain_steps: int = Field(1000, gt=0)
    full_seeds: list[int] = [0, 1, 2]
    # re-trained encoders, keyed by their config (the `variants` stage's output)
    cache: str = "models/ablation-encoders"
    # stored scores of what does not depend on the encoder under test (committed; docs/evaluation.md "Stored results"):
    # the `baselines` stage's and the `variants` stage's
    baseline_results: str = "outputs/baselines"
    variant_results: str = "outputs/variants"
    out: str = "outputs/evaluate"  # reports and sample grids (also logged to MLflow)
    experiment: str = "datencoder-evaluate"


class AblateConfig(Section):
    """The ablation grid (docs/evaluation.md); re-training variants share evaluate.retrain_steps."""

    max_concepts: int = Field(4, gt=0)  # the first N evaluation concepts (evaluate.concepts names them)
    regularisers: list[Literal["none", "l2", "nn-cosine", "contrastive"]] = ["none", "l2", "nn-cosine", "contrastive"]
    alpha_blends: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]  # the tuning/generation blend sweep
    out: str = "outputs/ablate"
    experiment: str = "datencoder-ablate"


class RegistryConfig(Section):
    """The MLflow model registry (docs/personalize.md "MLflow model and registry"): the model's name, the gate a
    new version is scored on and the margin it must beat the champion by to become `@challenger`. `@champion`
    moves only by `datencoder promote`. The margin should exceed the gate's noise at its size
    (benchmarks/gate_noise.py, docs/personalize.md "The gate's noise")."""

    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # None: datencoder-<preset>
    gate_concepts: int = Field(8, gt=0)  # the gate: the first N held-out evaluation concepts ...
    gate_prompts: int = Field(5, gt=0)  # ... x the first N evaluation prompts, seed 0
    margin: float = Field(0.01, ge=0)  # a challenger's gate score must exceed the champion's by more than this
    lock_timeout_s: float = Field(120.0, gt=0)  # wait for another registration's alias lock at most this long


STAGES = ("prepare_data", "pretrain", "baselines", "variants", "evaluate", "ablate", "register")


class PipelineConfig(Section):
    """Orchestration (docs/orchestration.md): the Prefect `retrain` flow, its schedule, retries and locks."""

    stages: list[Literal["prepare_data", "pretrain", "baselines", "variants", "evaluate", "ablate", "register"]] = \
        list(STAGES)
    dvc_stages: list[str] = ["prepare"]  # what prepare_data reproduces (`dvc repro`; upstream stages come along)
    dvc_push: bool = True  # push the DVC outputs after repro (teammates `dvc pull` them)
    dvc_remote: str | None = None  # the remote to push to; None: the workspace's default (core.remote)
    experiment: str = "datencoder-pipeline"  # MLflow experiment of the parent run each stage nests under
    cron: str = "0 3 * * 1"  # scheduled retraining (the Prefect deployment): Mondays 03:00
    timezone: str = "UTC"
    retries: int = Field(3, ge=0)  # extra attempts of a stage after a transient error (S3, MLflow HTTP, network)
    retry_delay_s: float = Field(10.0, ge=0)  # first backoff delay; doubles on each retry
    timeout_s: float = Field(6 * 3600, gt=0)  # per stage
    lock_wait_s: float = Field(0.0, ge=0)  # a second run in the same workspace waits this long, then refuses
    prefect_startup_timeout_s: int = Field(300, gt=0)  # the run's local Prefect server, on a cold machine
    report: str = "outputs/pipeline"  # report.md, metrics.csv and the plot of the last run


class Config(Section):
    preset: Literal["toy", "smoke", "sd15"] = "toy"
    base: BaseConfig = BaseConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    toy_world: ToyWorldConfig = ToyWorldConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    check_base: CheckBaseConfig = CheckBaseConfig()
    prepare: PrepareConfig = PrepareConfig()
    encoder: EncoderConfig = EncoderConfig()
    pretrain: PretrainConfig = PretrainConfig()
    personalize: PersonalizeConfig = PersonalizeConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ablate: AblateConfig = AblateConfig()
    registry: RegistryConfig = RegistryConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @property
    def engine(self) -> EngineConfig:
        """The sections the personalisation engine reads."""
        return EngineConfig(base=self.base, runtime=self.runtime, encoder=self.encoder, personalize=self.personalize)

    @property
    def training(self) -> TrainingConfig:
        """What encoder pre-training reads."""
        return TrainingConfig(preset=self.preset, base=self.base, encoder=self.encoder, pretrain=self.pretrain,
                              data=self.prepare.out, resolution=self.prepare.resolution,
                              holdout_shapes=self.toy_world.encoder_holdout_shapes,
                              encoder_timestep=self.personalize.encoder_timestep, out=self.personalize.encoder)


class TrainingConfig(Section):
    """What encoder pre-training (components/training/pretrain.py and loop.py, on every Ray worker) reads: the base,
    the encoder and its recipe, and the few values of other sections it needs. Entry points build it with
    `Config.training`."""

    preset: Literal["toy", "smoke", "sd15"]
    base: BaseConfig
    encoder: EncoderConfig
    pretrain: PretrainConfig
    data: str  # prepare.out: the prepared set it trains on
    resolution: int  # prepare.resolution: the side of the toy world's held-out renders
    holdout_shapes: list[str]  # toy_world.encoder_holdout_shapes: the unseen shapes' held-out set
    encoder_timestep: int  # personalize.encoder_timestep: what the encoder reads with pretrain.encoder_noise "fixed"
    out: str  # personalize.encoder: where the trained encoder goes


class EngineConfig(Section):
    """What the personalisation engine (components/inference/engine.py) reads: the base model, where it runs, the
    encoder's blend and the personalisation recipe. Entry points build it with `Config.engine`."""

    base: BaseConfig
    runtime: RuntimeConfig
    encoder: EncoderConfig
    personalize: PersonalizeConfig

    @property
    def sampling_alpha(self) -> float:
        """The generation blend: `personalize.alpha_blend` when set, else the tuning blend."""
        given = self.personalize.alpha_blend
        return self.encoder.alpha("tune") if given is None else given


PRESETS: dict[str, dict[str, Any]] = {
    "toy": {},
    "smoke": {
        "toy_world": {"n": 64},
        "bootstrap": {"train_images": 256, "vae_steps": 4, "vae_decoder_steps": 2, "vae_batch": 8, "unet_steps": 4,
                      "unet_batch": 8, "unet_channels": [16, 32, 32], "text_width": 32, "text_layers": 1,
                      "warmup_steps": 1, "clip_steps": 4, "metrics_clip_steps": 4, "clip_hard_groups": 8,
                      "backbone_hard_groups": 8,
                      "clip_batch": 16},
        "check_base": {"prompts": 4, "fresh_renders": 24, "num_inference_steps": 4},
        "encoder": {"trunk_channels": 32, "trunk_blocks": 1, "token_hidden": 32, "hyper_hidden": 32,
                    "hyper_basis": 8},
        # its own encoder: a smoke run never replaces the committed toy encoder (models/toy-encoder)
        "pretrain": {"max_steps": 6, "batch_size": 4, "warmup_steps": 2,
                     "checkpoint_every": 3, "log_every": 1, "eval_every": 4, "heldout_images": 4,
                     "sample_concepts": 2, "sample_num_inference_steps": 2, "system_metrics_s": 1.0},
        "personalize": {"tuning_steps": 2, "num_inference_steps": 2, "encoder": "outputs/smoke-encoder"},
        "evaluate": {"prompts": ["S* on a beach", "two S* on grass"], "max_concepts": 2, "baseline_concepts": 1,
                     "few_shot_images": 3, "ti_steps": 2, "lora_steps": 2, "dreambooth_steps": 2, "retrain_steps": 2,
                     "time_to_identity_steps": [1, 2]},
        "ablate": {"max_concepts": 1, "alpha_blends": [0.0, 1.0]},
        "registry": {"gate_concepts": 2, "gate_prompts": 1},
        "pipeline": {"retry_delay_s": 1.0, "timeout_s": 900},
    },
    "sd15": {
        "base": {
            "kind": "sd15",
            "pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "gradient_checkpointing": True,
            "backbone_clip": {"model_name": "ViT-H-14", "pretrained": "laion2b_s32b_b79k", "config_path": None},
            "vocabulary": None,
            "metrics_clip": {"model_name": "ViT-B-16", "pretrained": "openai", "config_path": None},
        },
        # real sources have no toy defaults: pass them on the command line or in the config
        "prepare": {"resolution": 512, "exclude_labels": [], "imagenet": None, "openimages_boxes": None,
                    "captions": None, "openimages_classes": None, "openimages_images": None},
        "encoder": {"trunk_channels": 512, "token_hidden": 512, "hyper_hidden": 512, "hyper_basis": 64},
        # paper: 150k steps for the final model; bf16 on GPUs, so 8 per micro-batch
        "pretrain": {"max_steps": 150_000, "batch_size": 64, "grad_accum": 1,
                     "warmup_steps": 1000, "checkpoint_every": 1000, "log_every": 50, "eval_every": 2000,
                     "describe_scene": False,  # the paper's prompts: the toy reader knows no real photo
                     "lr": 1e-4, "encoder_noise": "matched"},  # the paper's; the toy's were chosen on the toy
        # re-trained variants at a quarter of the main encoder's length (--full: all of it), as on the toy preset
        "evaluate": {"retrain_steps": 37_500, "full_retrain_steps": 150_000},
        # the paper's (E4T's) tuning batch of 16 views (benchmarks/gpu_check.py measures its memory); guidance 4:
        # the toy's 1.5 was chosen on the toy base and says nothing about SD; the paper's tuning recipe (lr 2e-3
        # and the L2 pull): the toy's lr 1e-2 without the pull answers its weak toy encoder (docs/personalize.md
        # "Concept fidelity") and is not measured on SD
        "personalize": {"describe_scene": False, "views": 16, "guidance_scale": 4.0, "lr": 2e-3,
                        "l2_weight": 1.0,
                        "encoder": "models/encoder-sd15"},  # what its pretrain writes, never the toy encoder
    },
}


SectionsT = TypeVar("SectionsT", bound=Section)


def variant_config(cfg: SectionsT, **sections: dict) -> SectionsT:
    """cfg (a Config, or a bundle of its sections such as EngineConfig) with fields of some sections replaced, e.g.
    variant_config(cfg, personalize={"tuning_steps": 0}).
    model_copy validates nothing: a field name that does not exist is an error here, not a silent extra."""
    for name, values in sections.items():
        unknown = set(values) - set(type(getattr(cfg, name)).model_fields)
        if unknown:
            raise ValueError(f"config section {name} has no field {', '.join(sorted(unknown))}")
    return cfg.model_copy(update={name: getattr(cfg, name).model_copy(update=values)
                                  for name, values in sections.items()})


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: true and false only. DVC writes params.yaml as YAML 1.2
    (`dvc exp run -S` rewrites the file), where on, off, yes and no are plain strings and go unquoted; read as YAML
    1.1 the toy vocabulary's word "on" would come back as True."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_yaml(text: str) -> Any:
    """A config's YAML (a params file, an override's or environment variable's value), as YAML 1.2 reads it."""
    return yaml.load(text, Loader=Yaml12Loader)  # a SafeLoader: no arbitrary objects


def parse_overrides(items: list[str]) -> dict:
    """`SECTION.KEY=VALUE` strings (VALUE as YAML) -> {section: {key: value}} for load_config's overrides."""
    overrides: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = read_yaml(value)
    return overrides


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_validation(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{key}: {e['msg']}")
    return f"invalid config ({source}): " + "; ".join(parts)


# old name -> current name of a knob (one name each in config, CLI and request params); still read, with a warning
RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("personalize", "steps"): ("personalize", "tuning_steps"),
    ("pretrain", "caption_plain_backgrounds"): ("pretrain", "describe_scene"),
    ("personalize", "caption_plain_backgrounds"): ("personalize", "describe_scene"),
    # the gate belongs to the registry: its size no longer touches the evaluate stage's params (DVC)
    ("evaluate", "gate_concepts"): ("registry", "gate_concepts"),
    ("evaluate", "gate_prompts"): ("registry", "gate_prompts"),
    # one key per path: the stage that reads a path names it as the stage that writes it
    ("pretrain", "data"): ("prepare", "out"),
    ("pretrain", "out"): ("personalize", "encoder"),
    # diffusers' names for the sampler's settings; threads are not workers (pretrain's and serve's are processes)
    ("pretrain", "sample_steps"): ("pretrain", "sample_num_inference_steps"),
    ("pretrain", "sample_guidance"): ("pretrain", "sample_guidance_scale"),
    ("prepare", "workers"): ("prepare", "threads"),
    ("ablate", "concepts"): ("ablate", "max_concepts"),  # a count, as evaluate.max_concepts
}


def _renamed_keys(values: dict, source: str) -> dict:
    """`values` with each old key under its current name; both names given is an error."""
    values = copy.deepcopy(values)
    for (section, old), (new_section, new) in RENAMED.items():
        part = values.get(section)
        if isinstance(part, dict) and old in part:
            target = values.setdefault(new_section, {})
            if not isinstance(target, dict):
                continue  # a wrong type: validation names it
            if new in target:
                raise UserError(f"config {source}: give {new_section}.{new} only ({section}.{old} is its old name)")
            warnings.warn(f"{source}: {section}.{old} is deprecated; use {new_section}.{new}", FutureWarning,
                          stacklevel=3)
            target[new] = part.pop(old)
    return values


# fields naming a read-only input: a default (the schema's or a preset's) that names a committed input is read
# from the project home wherever the command runs (components/home.py); a config file's or an override's value
# keeps its meaning, relative to the working directory
HOME_INPUTS = (("base", "pretrained"),
               ("base", "backbone_clip", "pretrained"), ("base", "backbone_clip", "config_path"),
               ("base", "metrics_clip", "pretrained"), ("base", "metrics_clip", "config_path"),
               ("personalize", "encoder"))


def _given(values: dict, keys: tuple[str, ...]) -> bool:
    for key in keys:
        if not isinstance(values, dict) or key not in values:
            return False
        values = values[key]
    return True


def _inputs_from_home(cfg: Config, sources: list[dict]) -> Config:
    """`cfg` with each default of HOME_INPUTS that names a committed input read from the project home."""
    values, changed = cfg.model_dump(), False
    for keys in HOME_INPUTS:
        if any(_given(source, keys) for source in sources):
            continue
        holder = values
        for key in keys[:-1]:
            holder = holder[key]
        found = home.committed(holder[keys[-1]])
        changed, holder[keys[-1]] = changed or found != holder[keys[-1]], found
    return Config.model_validate(values) if changed else cfg


ENV_PREFIX = "DATENCODER_"  # DATENCODER_<SECTION>__<KEY>=<YAML value> sets section.key (docs/team.md)


def environment_overrides(environ: dict[str, str] | None = None) -> dict:
    """Config values from the environment: `DATENCODER_PRETRAIN__STORAGE=s3://checkpoints/runs` is
    pretrain.storage, so a deployment changes a setting without editing an image's params.yaml. The value is
    YAML (numbers, booleans, lists); only names with `__` count (DATENCODER_DEVICE and the like are not config)."""
    overrides: dict = {}
    for name, text in sorted((os.environ if environ is None else environ).items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        if not section or not key or "__" in key:
            raise UserError(f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        try:
            value = read_yaml(text)
        except yaml.YAMLError as e:
            raise UserError(f"environment variable {name}: cannot parse {text!r} ({str(e).splitlines()[0]})") from None
        overrides.setdefault(section, {})[key] = value
    return overrides


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: dict | None = None) -> Config:
    """Resolve a config. `preset` (if given) wins over the file's `preset:` key. Defaults that name a committed
    input (HOME_INPUTS) are read from the project home."""
    file_values: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            file_values = read_yaml(Path(path).read_text()) or {}
        except OSError as e:
            raise UserError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise UserError(f"cannot parse config {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(file_values, dict):
            raise UserError(f"config {path} must be a mapping of sections, got {type(file_values).__name__}")
    name = preset or file_values.get("preset") or "toy"
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    # over the defaults, so a file may give part of a nested section (base.backbone_clip.pretrained alone)
    file_values = _renamed_keys(file_values, source)
    values = deep_merge(deep_merge(Config().model_dump(), PRESETS[name]), file_values)
    environment = _renamed_keys(environment_overrides(), "environment")
    if environment:
        source += " + environment (" + ", ".join(f"{ENV_PREFIX}{s.upper()}__{k.upper()}" for s in environment
                                                for k in environment[s]) + ")"
        values = deep_merge(values, environment)
    overrides = _renamed_keys(overrides or {}, "overrides")
    values = deep_merge(values, overrides)
    values["preset"] = name
    try:
        cfg = Config.model_validate(values)
    except ValidationError as e:
        raise UserError(_format_validation(e, source)) from None
    return _inputs_from_home(cfg, [file_values, environment, overrides])


def resolved(config: Config) -> dict:
    """Flat {section.key: value} view, for MLflow params and reports."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", config.model_dump())
    return flat
