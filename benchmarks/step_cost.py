"""Cost of one encoder pre-training step against a plain UNet training step, same batch, same process.

Toy preset shapes (random weights: cost does not depend on their values), batch 32. The encoder step is
the real one: backbone features, both dual paths (alpha_blend_train strictly between 0 and 1), all
losses, backward, AdamW step on the encoder. The baseline fine-tunes the UNet itself on the same
latents and prompts (text encoding, forward, backward, AdamW step). Also prints trainable and frozen
parameter counts for toy and for sd15 (sd15 from meta-device modules, no weights).

    .venv/bin/python benchmarks/step_cost.py [--threads 1] [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import harness
import torch
import torch.nn.functional as F


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def toy_base(cfg, tmp: Path):
    import open_clip
    from diffusers import DDPMScheduler

    from components.model.backbone import ClipImageTower
    from components.model.encoder import FrozenBase
    from components.toy.bootstrap import clip_model_config, make_text_encoder, make_unet, scheduler_config
    from components.toy.tokenizer import save_toy_tokenizer

    b = cfg.bootstrap
    tokenizer = save_toy_tokenizer(tmp / "tokenizer")
    text_encoder = make_text_encoder(len(tokenizer), b, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                     tokenizer.model_max_length)
    (tmp / "datencoder-bench-backbone.json").write_text(json.dumps(clip_model_config()))
    open_clip.add_model_config(tmp / "datencoder-bench-backbone.json")
    clip = ClipImageTower(open_clip.create_model("datencoder-bench-backbone").visual)
    return FrozenBase(make_unet(b), text_encoder, tokenizer, DDPMScheduler(**scheduler_config(b)), clip)


def toy_report(batch: int, repeats: int) -> dict:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from components.config import load_config
    from components.model.encoder import TuningEncoder

    cfg = load_config("toy")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = toy_base(cfg, Path(tmp))
    encoder = TuningEncoder.for_base(cfg.encoder, base)
    pixels = torch.rand(batch, 3, 64, 64) * 2 - 1
    latents = torch.randn(batch, 4, 16, 16)
    prompts = ["a photo of S* on a beach", "a sketch of S*", "two S* on grass", "S* on a red background"]
    ids = base.prompts.tokenize([prompts[i % len(prompts)] for i in range(batch)])
    plain_ids = base.prompts.hard_ids(ids, torch.full((batch,), 320))  # same prompts with a real word

    enc_opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4)

    def encoder_step():
        enc_opt.zero_grad(set_to_none=True)
        encoder(pixels, latents, ids)["total"].backward()
        enc_opt.step()

    unet = copy.deepcopy(base.unet).train().requires_grad_(True)
    unet.set_attn_processor(AttnProcessor2_0())
    unet_opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def unet_step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        noisy, target = base.noised(latents, noise, t)
        with torch.no_grad():
            context = base.text_encoder(plain_ids)[0]
        unet_opt.zero_grad(set_to_none=True)
        F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, target).backward()
        unet_opt.step()

    plain_s = harness.median_seconds(unet_step, repeats)
    encoder_s = harness.median_seconds(encoder_step, repeats)
    return {
        "batch": batch,
        "alpha_blend_train": cfg.encoder.alpha_blend_train,
        "plain_unet_step_s": round(plain_s, 4),
        "encoder_step_s": round(encoder_s, 4),
        "ratio": round(encoder_s / plain_s, 2),
        "params": {"trainable": count(encoder),
                   "frozen": count(base.unet) + count(base.text_encoder) + count(base.clip),
                   "trainable_by_part": {name: count(m) for name, m in encoder.named_children()}},
    }


def sd15_params() -> dict:
    import open_clip

    from components.config import load_config
    from components.model import sd15
    from components.model.encoder import EncoderShape, TuningEncoder

    cfg = load_config("sd15")
    unet, text_encoder = sd15.meta_unet(), sd15.meta_text_encoder()
    with torch.device("meta"):
        visual = open_clip.create_model(cfg.base.backbone_clip.model_name, pretrained=None, device="meta").visual
        encoder = TuningEncoder(cfg.encoder, EncoderShape.of(unet, text_encoder, visual.transformer.width,
                                                             visual.grid_size))
    return {"trainable": count(encoder), "frozen": count(unet) + count(text_encoder) + count(visual),
            "trainable_by_part": {name: count(m) for name, m in encoder.named_children()},
            "frozen_by_part": {"unet": count(unet), "text_encoder": count(text_encoder), "clip_visual": count(visual)}}


def main() -> None:
    parser = harness.parser(__doc__, __file__, config=False)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "toy": toy_report(args.batch, args.repeats), "sd15": {"params": sd15_params()}}
    report["goal_ratio_at_most"] = 3.0
    harness.report(report, args)


if __name__ == "__main__":
    main()
