"""The Stable Diffusion 1.5 path end to end on a GPU, from pre-training to a served request, in one run.

    .venv/bin/python benchmarks/gpu_e2e.py            # a CUDA machine: SD 1.5 shapes, 512 px (under 8 minutes)
    .venv/bin/python benchmarks/gpu_e2e.py --tiny     # the same phases at tiny shapes on the CPU (a rehearsal)

SD 1.5-shaped models with random weights, built from the bundled configs (components/model/sd15.py: UNet,
text encoder, VAE; an open_clip ViT-H-14 backbone), are written as a diffusers directory and a checkpoint
file, so every phase loads them the way it loads a real SD checkout; nothing is downloaded. Time and memory
do not depend on the weights. Phases, each timed with its peak GPU memory:

  pretrain   20 steps of `pretrain` on Ray Train, one worker per visible GPU (bf16 autocast), on a small
             prepared set of toy-world renders at 512 px
  register   the encoder logged as the MLflow pyfunc and registered as datencoder-<preset>@champion in a private
             MLflow store (a temporary directory); the registry gate is not run: it scores with a metrics
             CLIP, and a random one's score means nothing
  load       `mlflow.pyfunc.load_model` of the champion: the pyfunc picks this machine's device
  adapt      one 512 px image: encoder forward + 12 tuning steps at 16 views (the sd15 preset's defaults)
  serve      one warm request through the pyfunc's predict: a new image, 12 tuning steps, 4 images at 25
             sampling steps
  export     the concept as a diffusers LoRA + embedding + kohya keys
  stock      the export loaded into a stock diffusers StableDiffusionPipeline, one image drawn
  lora, ti   LoRA and Textual Inversion from scratch on the same image and device (components/evaluation/
             baselines.py, as the evaluation runs them): 30 steps timed after warm-up, the per-step time
             extrapolated to 500 and 3000 steps (the output says so)

It prints one JSON object: seconds and peak GPU memory per phase, and each goal with its measured value and
ratio (adaptation <= 5 s and <= 16 GB; >= 30x faster than LoRA-500 and >= 100x than TI-3000; a served
request <= 12 s warm). `--tiny` shrinks shapes and counts so the whole script runs on a CPU in minutes;
its numbers are a rehearsal, not a measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch


GOALS = {"adaptation_s": 5.0, "adaptation_peak_gb": 16.0, "over_lora_500": 30.0, "over_ti_3000": 100.0,
         "served_request_s": 12.0}
PROMPT = "S* on a beach"
# --tiny: SD 1.5's structure (four UNet levels, cross-attention, an 8x VAE, a ViT backbone) at toy widths
TINY_UNET = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "cross_attention_dim": 32,
             "norm_num_groups": 8, "attention_head_dim": 4, "sample_size": 8}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "projection_dim": 32}
TINY_VAE = {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "sample_size": 64}
TINY_CLIP = "datencoder-e2e-tiny-vit"
TINY_ENCODER = {"trunk_channels": 32, "trunk_blocks": 1, "token_hidden": 32, "hyper_hidden": 32, "hyper_basis": 8}


class Phases:
    """Seconds and peak GPU memory of each phase (GPU work is synchronised at both ends)."""

    def __init__(self, cuda: bool):
        self.cuda, self.results = cuda, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        extra: dict = {}
        yield extra
        if self.cuda:
            torch.cuda.synchronize()
        seconds = round(time.perf_counter() - started, 3)
        peak_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None
        self.results[name] = {"seconds": seconds, "peak_gpu_gb": peak_gb, **extra}
        print(f"gpu_e2e: {name} {self.results[name]}", file=sys.stderr)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def concept_image(side: int, colour: str, shape: str):
    from components.toy import world as tw

    return tw.render(tw.canonical(tw.ToyConcept(shape, colour, "striped", "white")), side, seed=0)


def write_base(out: Path, tiny: bool, device: torch.device) -> dict:
    """SD 1.5-shaped random weights as a diffusers directory and an open_clip checkpoint; config overrides."""
    import open_clip
    from safetensors.torch import save_file

    from components.model import sd15
    from components.toy.tokenizer import save_toy_tokenizer

    torch.manual_seed(0)
    tokenizer = save_toy_tokenizer(out / "tokenizer", max_length=77)
    unet, text, vae = ({**sd15.unet_config(), **TINY_UNET}, {**sd15.text_encoder_config(), **TINY_TEXT},
                       {**sd15.VAE_CONFIG, **TINY_VAE}) if tiny else (None, None, None)
    pipe = sd15.random_pipeline(tokenizer, unet, text, vae, device=device)
    # half-size files: every loader casts to the dtype it runs in
    pipe.to(torch.float16).save_pretrained(out / "base", safe_serialization=True)
    del pipe
    clip_name, clip_config = "ViT-H-14", None
    if tiny:
        from components.toy.bootstrap import clip_model_config

        clip_name, clip_config = TINY_CLIP, out / f"{TINY_CLIP}.json"
        clip_config.write_text(json.dumps(clip_model_config(width=32, layers=1)))
        open_clip.add_model_config(clip_config)
    clip = open_clip.create_model(clip_name, device=device)
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()}, str(out / "backbone.safetensors"))
    del clip
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"base": {"pretrained": str(out / "base"),
                     "backbone_clip": {"model_name": clip_name, "pretrained": str(out / "backbone.safetensors"),
                                       "config_path": str(clip_config) if clip_config else None}}}


def write_prepared(out: Path, side: int, train: int, val: int) -> None:
    """A prepared data set (components/data/prepare.py's layout): toy-world renders, manifest.parquet."""
    import random

    import pandas as pd

    from components.data.prepare import MANIFEST_COLUMNS, image_path
    from components.toy import world as tw

    rng = random.Random(0)
    rows = []
    for i in range(train + val):
        image = tw.render(tw.sample_scene(rng), side, seed=i)
        data = io.BytesIO()
        image.save(data, format="JPEG", quality=95)
        sha = hashlib.sha256(data.getvalue()).hexdigest()
        path = image_path(out, sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.getvalue())
        rows.append({"path": str(path.relative_to(out)), "source": "toy-world", "source_id": str(i), "label": "toy",
                     "label_id": "toy", "sha256": sha, "width": side, "height": side,
                     "split": "train" if i < train else "val"})
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("path").to_parquet(out / "manifest.parquet", index=False)


def private_store(root: Path) -> str:
    """A sqlite MLflow store under `root` whose experiments keep their artifacts there too."""
    from mlflow import MlflowClient

    from components.serving.registry import EXPERIMENT

    uri = f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    client = MlflowClient(uri)
    for name in (EXPERIMENT, "datencoder-e2e-pretrain"):
        client.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())
    return uri


def baseline_per_step(train, pipe, pixels, warmup: int, timed: int) -> float:
    train(pipe, pixels, warmup)
    return train(pipe, pixels, timed).seconds_per_step


def main() -> int:
    parser = harness.parser(__doc__, __file__, config=False)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and counts on the CPU: a rehearsal")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="the served model's runtime.dtype (auto: bfloat16 on a GPU)")
    parser.add_argument("--pretrain-steps", type=int, help="default 20 (tiny: 3)")
    parser.add_argument("--batch-per-gpu", type=int,
                        help="pre-training samples per worker and step (default 8, tiny 2)")
    parser.add_argument("--baseline-steps", type=int, help="timed steps of LoRA and TI (default 30, tiny 2)")
    parser.add_argument("--keep", help="write everything under this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("gpu_e2e: no CUDA device here; run this on a machine with an NVIDIA GPU, or rehearse with --tiny",
              file=sys.stderr)
        return 2
    tiny = args.tiny
    side = 64 if tiny else 512
    counts = {"views": 2, "tuning_steps": 2, "num_images": 2, "num_inference_steps": 2} if tiny else \
        {"views": 16, "tuning_steps": 12, "num_images": 4, "num_inference_steps": 25}
    pretrain_steps = args.pretrain_steps or (3 if tiny else 20)
    baseline_steps, warmup = args.baseline_steps or (2 if tiny else 30), 1 if tiny else 3
    workers = torch.cuda.device_count() if cuda else 1
    batch = (args.batch_per_gpu or (2 if tiny else 8)) * workers

    import mlflow
    import pandas as pd

    from components.config import load_config
    from components.data.images import read_image, to_pixels
    from components.inference.export import export_concept, export_files
    from components.serving import registry
    from components.training.baselines import train_lora, train_textual_inversion
    from components.training.pretrain import pretrain

    scratch = None if args.keep else tempfile.TemporaryDirectory(prefix="datencoder-gpu-e2e-")
    root = Path(args.keep or scratch.name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    phases = Phases(cuda)
    device = torch.device("cuda" if cuda else "cpu")

    with phases("build"):
        overrides = write_base(root / "models", tiny, device)
        write_prepared(root / "prepared", side, train=max(16, batch), val=2)
        private_store(root)
    cfg = load_config("sd15", overrides={
        **overrides, "prepare": {"resolution": side, "out": str(root / "prepared")},
        **({"encoder": TINY_ENCODER} if tiny else {}),
        "personalize": {"views": counts["views"], "tuning_steps": counts["tuning_steps"], "cache_size": 4,
                        "encoder": str(root / "encoder")},
        "pretrain": {"storage": str(root / "checkpoints"), "workers": workers, "use_gpu": cuda, "batch_size": batch,
                     "max_steps": pretrain_steps, "warmup_steps": 2, "checkpoint_every": pretrain_steps,
                     "log_every": 5, "eval_every": pretrain_steps, "heldout_images": 2, "sample_concepts": 1,
                     "sample_num_inference_steps": 2, "experiment": "datencoder-e2e-pretrain",
                     "max_failures": 0,  # a failure is a finding here, not something to retry
                     "cpus_per_worker": max(1, min(8, (os.cpu_count() or 2) // workers - 1))}})

    with phases("pretrain") as extra:
        report = pretrain(cfg)
        # the workers' own peaks (this process does not train): GPU memory on GPU workers, RSS on CPU ones
        extra.update(workers=report["workers"], use_gpu=report["use_gpu"], steps=report["end_step"],
                     samples_per_s=report["samples_per_s"],
                     worker_peak_memory_gb=[round(mb / 1024, 2) for mb in report["peak_memory_mb"]])
    with phases("register") as extra:
        with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(registry.EXPERIMENT).experiment_id):
            info = registry.log_model(cfg, report["out"])
        name = registry.model_name(cfg.registry, cfg.preset)
        version = mlflow.register_model(info.model_uri, name).version
        mlflow.MlflowClient().set_registered_model_alias(name, registry.ALIAS, version)
        extra.update(model_uri=f"models:/{name}@{registry.ALIAS}", version=int(version))
    with phases("load") as extra:
        # the pyfunc runs where it is loaded (auto: this GPU in bfloat16); --dtype reaches it as its model_config
        model = mlflow.pyfunc.load_model(f"models:/{name}@{registry.ALIAS}", model_config={"dtype": args.dtype})
        personalizer = model.unwrap_python_model().personalizer
        extra.update(personalizer.runtime.describe())

    def request(image: bytes, **params) -> pd.DataFrame:
        return model.predict(pd.DataFrame({"image": [image], "prompt": [PROMPT]}), params=params)

    with phases("warm_up"):  # CUDA kernels, cuDNN autotuning, allocator: what a warm server has done already
        request(png(concept_image(side, "green", "heart")), tuning_steps=1, num_images=1, num_inference_steps=1)
    adapt_png = png(concept_image(side, "red", "star"))
    with phases("adapt") as extra:
        concept, _, timings = personalizer.concept(read_image(adapt_png, cfg.personalize.max_pixels),
                                                   hashlib.sha256(adapt_png).hexdigest(), counts["tuning_steps"])
        extra.update({k: round(v, 3) for k, v in timings.items()}, views=counts["views"],
                     tuning_steps=counts["tuning_steps"], side=side)
    with phases("serve") as extra:
        out = request(png(concept_image(side, "blue", "cross")), tuning_steps=counts["tuning_steps"],
                      num_images=counts["num_images"], num_inference_steps=counts["num_inference_steps"])
        extra.update(images=len(out), num_inference_steps=counts["num_inference_steps"],
                     tuning_steps=counts["tuning_steps"])
    token = "concept_e2e"
    with phases("export") as extra:
        extra.update(files=export_concept(concept, root / "export", token=token)["files"])
    with phases("stock") as extra:
        from diffusers import StableDiffusionPipeline

        stock = StableDiffusionPipeline.from_pretrained(cfg.base.pretrained, dtype=personalizer.runtime.dtype,
                                                        safety_checker=None, requires_safety_checker=False)
        stock.to(personalizer.runtime.device).set_progress_bar_config(disable=True)
        stock.load_lora_weights(str(root / "export"), weight_name=export_files(token)["diffusers"])
        stock.load_textual_inversion(str(root / "export" / export_files(token)["embedding"]), token=token)
        images = stock(PROMPT.replace("S*", token), num_inference_steps=counts["num_inference_steps"],
                       generator=torch.Generator().manual_seed(0), output_type="np").images
        extra.update(images=len(images), finite=bool(torch.isfinite(torch.from_numpy(images)).all()))
        del stock

    pixels = to_pixels(read_image(adapt_png, cfg.personalize.max_pixels), personalizer.side)
    per_step = {}
    for name, train in (("lora", train_lora), ("ti", train_textual_inversion)):
        with phases(name) as extra:
            per_step[name] = baseline_per_step(train, personalizer.pipe, pixels, warmup, baseline_steps)
            extra.update(timed_steps=baseline_steps, warmup_steps=warmup, seconds_per_step=round(per_step[name], 4))

    adapt_s = phases.results["adapt"]["seconds"]
    lora_500, ti_3000 = per_step["lora"] * 500, per_step["ti"] * 3000
    measured = {"adaptation_s": adapt_s, "adaptation_peak_gb": phases.results["adapt"]["peak_gpu_gb"],
                "over_lora_500": lora_500 / adapt_s, "over_ti_3000": ti_3000 / adapt_s,
                "served_request_s": phases.results["serve"]["seconds"]}
    at_most = {"adaptation_s", "adaptation_peak_gb", "served_request_s"}
    goals = {}
    for name, goal in GOALS.items():
        value = measured[name]
        goals[name] = {"value": None if value is None else round(value, 3), "goal": goal,
                       "kind": "at most" if name in at_most else "at least",
                       "ratio": None if value is None else round(value / goal, 3),
                       "meets": None if value is None else (value <= goal if name in at_most else value >= goal)}
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "gpus": workers if cuda else 0,
        "tiny": tiny, "side": side, "runtime": personalizer.runtime.describe(), **counts,
        "pretrain_steps": pretrain_steps, "pretrain_batch": batch,
        "phases": phases.results, "goals": goals,
        "baselines": {"lora_500_s": round(lora_500, 2), "ti_3000_s": round(ti_3000, 2), "extrapolated": True},
        "total_s": round(sum(p["seconds"] for p in phases.results.values()), 1),
        "note": (f"LoRA-500 and TI-3000 seconds are EXTRAPOLATED: {baseline_steps} steps timed after {warmup} "
                 f"warm-up steps, times 500 and 3000; ratio = value / goal; random weights (time and memory only)"
                 + ("; --tiny: tiny shapes on the CPU, a rehearsal, not a measurement" if tiny else "")),
    }
    harness.report(result, args)
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
