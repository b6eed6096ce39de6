"""One-shot personalisation (issue 6): input checks, tuning, the concept cache, export to stock diffusers,
the CLI, the pyfunc model and the registry gate. Smoke-sized random-weight models built per module."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from smoke_models import isolated_store, smoke_setup, solid_png

from components.data.images import read_image
from components.errors import UserError
from components.inference.engine import Personalizer, check_value
from components.inference.tuning import Concept, draw_timesteps


BLUE_ON_RED = solid_png((220, 40, 40), shape_rgb=(40, 80, 220))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(config file, config, encoder dir) for random-weight smoke models."""
    return smoke_setup(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="module")
def personalizer(smoke):
    _, cfg, encoder = smoke
    return Personalizer(cfg.engine, encoder)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def state_hash(*modules) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def visible(concept: Concept, seed: int = 0) -> Concept:
    """The concept with a clearly non-zero LoRA and a shifted v*, so that exports have something to show."""
    g = torch.Generator().manual_seed(seed)
    return Concept(concept.v_star + 0.5 * torch.randn(concept.v_star.shape, generator=g),
                   {k: (a, 0.3 * torch.randn(b.shape, generator=g)) for k, (a, b) in concept.factors.items()},
                   concept.scale)


# --- input checks ---------------------------------------------------------------------------------
def test_read_image_rejects_bad_bytes_with_a_reason():
    photo = Image.new("RGB", (40, 30), (10, 200, 30))
    cases = {
        b"": "empty",
        b"definitely not an image": "not an image",
        png_bytes(photo)[:-40]: "truncated or corrupt",
        png_bytes(photo, "JPEG")[:200]: "truncated or corrupt",
        png_bytes(Image.new("1", (5000, 4500))): "22.5 megapixels; the limit is 20",
    }
    for data, reason in cases.items():
        with pytest.raises(UserError, match=reason):
            read_image(data, max_pixels=20_000_000)
    assert read_image(png_bytes(photo), 20_000_000).getpixel((3, 3)) == (10, 200, 30)
    # transparency shows as white, not as whatever the hidden colour channels hold
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert read_image(png_bytes(clear), 20_000_000).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("tuning_steps", -1, "between 0 and 100"), ("tuning_steps", 101, "between 0 and 100"),
    ("num_images", 0, "between 1 and 16"), ("num_images", 17, "between 1 and 16"),
    ("seed", 1.5, "must be an integer"), ("seed", "7", "must be a number"), ("seed", True, "must be a number"),
    ("alpha_blend", 1.5, "between 0 and 1"), ("tuning_step", 3, "unknown parameter 'tuning_step'"),
])
def test_request_parameters_are_checked(name, value, message):
    with pytest.raises(UserError, match=message):
        check_value(name, value)


def test_prompts_need_the_placeholder_and_fit(personalizer):
    settings = personalizer.settings(tuning_steps=0, num_inference_steps=1)
    with pytest.raises(UserError, match="no placeholder S"):
        personalizer.run(BLUE_ON_RED, ["a red circle"], settings)
    with pytest.raises(UserError, match="too long"):
        personalizer.run(BLUE_ON_RED, ["word " * 40 + "S*"], settings)
    assert personalizer.cache.misses == 0  # refused before any tuning


# --- tuning and the cache -------------------------------------------------------------------------
def test_tuning_starts_from_the_encoder_and_the_l2_pull_holds_it(smoke, personalizer):
    from components.data.images import to_pixels
    from components.inference.tuning import TuningRecipe, predict_concept, tune

    _, cfg, _ = smoke
    pixels = to_pixels(read_image(BLUE_ON_RED, 10**8), personalizer.side)
    start = predict_concept(personalizer.encoder, personalizer.pipe.vae, pixels, 500, torch.Generator().manual_seed(0))
    ids = personalizer.tuning_ids

    def run(steps: int, l2_weight: float) -> Concept:
        return tune(personalizer.base, personalizer.pipe.vae, start, pixels, ids,
                    TuningRecipe(steps, 2e-3, l2_weight, views=2, alpha=0.5),
                    torch.Generator().manual_seed(1))

    def drift(c: Concept) -> float:
        return sum((x - y).pow(2).sum().item() for x, y in zip(c.tensors(), start.tensors()))

    assert drift(run(0, 1.0)) == 0
    free, held = run(4, 0.0), run(4, 1e4)
    assert all(b.abs().max() == 0 for _, b in start.factors.values())  # zero-initialised B ...
    assert all(b.abs().max() > 0 for _, b in free.factors.values())  # ... is tuned
    assert (free.v_star - start.v_star).abs().max() > 0
    assert drift(held) < 0.5 * drift(free)
    # weight 1 acts under the summed L2 (the per-tensor mean left weights 1 and 0 tuned alike: issue 22)
    assert drift(run(4, 1.0)) < 0.9 * drift(free)


def test_stratified_timesteps_cover_every_range_once():
    steps, views, train_steps = 10, 4, 1000  # sub-ranges of 25 timesteps: whole numbers, exact bins
    t = draw_timesteps(steps, views, train_steps, torch.Generator().manual_seed(0))
    assert t.shape == (steps, views) and t.dtype == torch.long
    # view i of every step in the i-th quarter; over the run, each tenth of that quarter exactly once
    bins = t * views * steps // train_steps  # which of the views * steps sub-ranges
    for i in range(views):
        assert sorted(bins[:, i].tolist()) == list(range(i * steps, (i + 1) * steps))
    again = draw_timesteps(steps, views, train_steps, torch.Generator().manual_seed(0))
    assert torch.equal(t, again) and not torch.equal(t, draw_timesteps(steps, views, train_steps,
                                                                        torch.Generator().manual_seed(1)))
    uniform = draw_timesteps(steps, views, train_steps, torch.Generator().manual_seed(0), "uniform")
    assert uniform.shape == (steps, views) and 0 <= int(uniform.min()) and int(uniform.max()) < train_steps
    with pytest.raises(ValueError, match="timestep sampling"):
        draw_timesteps(steps, views, train_steps, torch.Generator(), "sobol")


def test_a_photo_tunes_on_what_it_shows_besides_the_object(personalizer):
    """describe_scene: the toy reader's template of the photo, S* in the object's place; a photo it cannot read
    (and every photo with the option off) tunes on the configured prompts."""
    from components.data.images import to_pixels
    from components.toy import world as tw

    on_red = to_pixels(read_image(BLUE_ON_RED, 10**8), personalizer.side)  # a large blue square on red
    caption = personalizer.base.prompts.tokenize(["a large S* on a red background"])
    assert torch.equal(personalizer.tuning_prompt_ids(on_red)[0], caption)
    scene = tw.Scene(tw.ToyConcept("star", "yellow"), background="beach", position="top right", size="small")
    beach = to_pixels(tw.render(scene, personalizer.side), personalizer.side)
    noise = torch.rand(on_red.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    described = personalizer.tuning_prompt_ids(torch.cat([beach, noise]))
    assert torch.equal(described[0], personalizer.base.prompts.tokenize(["a small S* at the top right on a beach"]))
    assert torch.equal(described[1], personalizer.tuning_ids)  # "a photo of S*"
    cfg = personalizer.config
    off = personalizer.variant(cfg.model_copy(update={
        "personalize": cfg.personalize.model_copy(update={"describe_scene": False})}))
    assert torch.equal(off.tuning_prompt_ids(on_red)[0], off.tuning_ids)


def test_gradient_checkpointing_saves_memory_without_changing_the_result(smoke, personalizer):
    """base.gradient_checkpointing (the sd15 default; benchmarks/gpu_check.py measures the memory) only
    recomputes activations: the tuned concept is the same."""
    from components.data.images import to_pixels
    from components.inference.tuning import TuningRecipe, predict_concept, tune

    _, cfg, encoder = smoke
    checkpointing = cfg.model_copy(update={"base": cfg.base.model_copy(update={"gradient_checkpointing": True})})
    checkpointed = Personalizer(checkpointing.engine, encoder)
    assert checkpointed.pipe.unet.is_gradient_checkpointing and not personalizer.pipe.unet.is_gradient_checkpointing
    pixels = to_pixels(read_image(BLUE_ON_RED, 10**8), personalizer.side)

    def tuned(p: Personalizer) -> Concept:
        start = predict_concept(p.encoder, p.pipe.vae, pixels, 500, torch.Generator().manual_seed(0))
        return tune(p.base, p.pipe.vae, start, pixels, p.tuning_ids, TuningRecipe(3, 2e-3, 1.0, views=2, alpha=0.5),
                    torch.Generator().manual_seed(1))

    for x, y in zip(tuned(personalizer).tensors(), tuned(checkpointed).tensors()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_second_request_skips_tuning_and_base_weights_are_never_written(personalizer):
    base = personalizer.base
    before = state_hash(base.unet, base.text_encoder, personalizer.pipe.vae)
    settings = personalizer.settings(tuning_steps=2, num_images=2, seed=3, num_inference_steps=2)
    first = personalizer.run(BLUE_ON_RED, ["S* on a beach"], settings)
    again = personalizer.run(BLUE_ON_RED, ["S* on a beach"], settings)
    other_seed = personalizer.run(BLUE_ON_RED, ["S* on a beach"], personalizer.settings(
        tuning_steps=2, num_images=1, seed=9, num_inference_steps=2))
    assert not first.cached and first.timings["tune_s"] > 0
    assert again.cached and again.timings["tune_s"] == 0 and again.timings["encoder_s"] == 0
    assert other_seed.cached
    assert [g.seed for g in first.images] == [3, 4]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(first.images, again.images))
    assert not np.array_equal(first.images[0].pixels, first.images[1].pixels)  # seeds 3 and 4 differ
    assert first.images[0].pixels.shape == (64, 64, 3)
    assert state_hash(base.unet, base.text_encoder, personalizer.pipe.vae) == before
    # different tuning settings are a different concept
    retuned = personalizer.run(BLUE_ON_RED, ["S* on a beach"], personalizer.settings(
        tuning_steps=3, num_inference_steps=2))
    assert not retuned.cached


def test_dpm_solver_and_blend_change_the_samples(personalizer):
    # guidance 4 (not the toy default 1.5) amplifies a 1-step random-weight concept enough for a changed blend to show
    kw = {"tuning_steps": 1, "num_inference_steps": 3, "seed": 0, "guidance_scale": 4.0}
    ddim = personalizer.run(BLUE_ON_RED, ["S* on grass"], personalizer.settings(**kw, alpha_blend=1.0))
    dpm = personalizer.run(BLUE_ON_RED, ["S* on grass"], personalizer.settings(scheduler="dpm", **kw, alpha_blend=1.0))
    blended = personalizer.run(BLUE_ON_RED, ["S* on grass"], personalizer.settings(**kw, alpha_blend=0.0))
    for other in (dpm, blended):
        assert np.abs(other.images[0].pixels.astype(int) - ddim.images[0].pixels.astype(int)).mean() > 0.5


# --- export ---------------------------------------------------------------------------------------
def test_export_is_reproduced_by_stock_diffusers(smoke, personalizer, tmp_path):
    """The kohya file through diffusers' own kohya loader, the diffusers file, and the A1111-style embedding
    (named after its token) through load_textual_inversion reproduce our image."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from components.inference.export import export_concept
    from components.inference.generate import Sampling, generate

    _, cfg, _ = smoke
    settings = personalizer.settings(tuning_steps=1, num_inference_steps=3)
    concept = visible(personalizer.run(BLUE_ON_RED, ["S* on a beach"], settings).concept)
    rescale = 0.7  # a sampler setting stock diffusers has too (check-base uses it; personalize.guidance_rescale)
    ours = generate(personalizer.pipe, personalizer.base.prompts, concept, ["S* on a beach"], [11],
                    Sampling(4.0, 3, "ddim", 1.0, guidance_rescale=rescale))[0]
    token = "concept_test"
    info = export_concept(concept, tmp_path / "export", token=token)
    assert info["token"] == token and info["rank"] == cfg.encoder.rank
    assert info["files"] == [f"{token}.safetensors", f"{token}-kohya.safetensors", f"{token}-diffusers.safetensors"]

    lora = load_file(str(tmp_path / "export" / f"{token}-diffusers.safetensors"))
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert lora[f"unet.{target}.lora_A.weight"].shape[0] == cfg.encoder.rank
    assert len(lora) == 2 * len(concept.factors)
    kohya = load_file(str(tmp_path / "export" / f"{token}-kohya.safetensors"))
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert {f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha"} <= set(kohya)
    assert kohya[f"{prefix}.alpha"].item() == cfg.encoder.rank
    assert list(load_file(str(tmp_path / "export" / f"{token}.safetensors"))) == ["emb_params"]

    def stock(lora_file: str | None):
        pipe = StableDiffusionPipeline.from_pretrained(cfg.base.pretrained, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        if lora_file:
            pipe.load_lora_weights(str(tmp_path / "export"), weight_name=lora_file)
        # the trigger word is the file name (A1111 / ComfyUI); diffusers is told the same word
        pipe.load_textual_inversion(str(tmp_path / "export" / f"{token}.safetensors"), token=token)
        image = pipe(f"{token} on a beach", num_inference_steps=3, guidance_scale=4.0, guidance_rescale=rescale,
                     generator=torch.Generator().manual_seed(11), output_type="np").images[0]
        return np.round(image * 255).astype(np.uint8)

    for lora_file in (f"{token}-kohya.safetensors", f"{token}-diffusers.safetensors"):
        theirs = stock(lora_file)
        assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1, lora_file  # within rounding
    assert np.abs(stock(None).astype(int) - ours.astype(int)).mean() > 1  # and the LoRA matters


def test_exports_of_two_concepts_share_a_folder_and_a_clash_is_refused(personalizer, tmp_path):
    from components.inference.export import export_concept

    settings = personalizer.settings(tuning_steps=0, num_inference_steps=1)
    first = personalizer.run(BLUE_ON_RED, ["S*"], settings).concept
    second = personalizer.run(solid_png((40, 200, 40), shape_rgb=(200, 40, 200)), ["S*"], settings).concept
    folder = tmp_path / "exports"
    export_concept(first, folder, token="concept_one")
    export_concept(second, folder, token="concept_two")
    assert len(list(folder.iterdir())) == 6
    export_concept(first, folder, token="concept_one")  # the same concept again: fine
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserError, match="already holds a different concept with the token concept_one"):
        export_concept(second, folder, token="concept_one")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing overwritten
    for bad in ("<concept-1a2b>", "has space", "x"):
        with pytest.raises(UserError, match="not usable as a trigger word"):
            export_concept(first, folder, token=bad)


# --- CLI ------------------------------------------------------------------------------------------
def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "components.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_cli_personalize_json_and_export(smoke, tmp_path):
    config_file, cfg, encoder = smoke
    image = tmp_path / "concept.png"
    image.write_bytes(BLUE_ON_RED)
    common = ["personalize", "--config", str(config_file), "--image", str(image), "--model", str(encoder)]
    r = run_cli(*common, "--prompt", "S* on a beach", "--prompt", "a sketch of S*", "--num-images", "2",
                "--seed", "5", "--alpha-blend", "1", "--tuning-steps", "2", "--out", str(tmp_path / "out"),
                "--export", str(tmp_path / "export"), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert [(i["prompt"], i["seed"]) for i in report["images"]] == [
        ("S* on a beach", 5), ("S* on a beach", 6), ("a sketch of S*", 5), ("a sketch of S*", 6)]
    assert all(Image.open(i["path"]).size == (64, 64) for i in report["images"])
    assert report["seed"] == 5
    assert report["generation"] == {"num_inference_steps": cfg.personalize.num_inference_steps,
                                    "guidance_scale": cfg.personalize.guidance_scale,
                                    "guidance_rescale": cfg.personalize.guidance_rescale,
                                    "scheduler": "DDIMScheduler", "alpha_blend": 1.0}
    assert set(report["timings"]) == {"encoder_s", "tune_s", "sample_s", "total_s"}
    assert report["timings"]["total_s"] >= report["timings"]["tune_s"] > 0
    assert report["peak_rss_mb"] > 100
    token = report["export"]["token"]
    assert token.startswith("concept_") and (tmp_path / "export" / f"{token}.safetensors").is_file()
    assert (tmp_path / "export" / f"{token}-kohya.safetensors").is_file()
    assert "tune 2/2" in r.stderr  # progress on stderr


# --- several photos of one concept -------------------------------------------------------------------
def test_mean_concept_holds_the_mean_offset_exactly():
    from components.inference.engine import mean_concept

    g = torch.Generator().manual_seed(0)
    concepts = [Concept(torch.randn(1, 8, generator=g), {"m": (torch.randn(1, 5, 2, generator=g),
                                                               torch.randn(1, 2, 6, generator=g))}, 0.5)
                for _ in range(3)]
    mean = mean_concept(concepts)
    torch.testing.assert_close(mean.v_star, torch.stack([c.v_star for c in concepts]).mean(0))
    a, b = mean.factors["m"]
    assert a.shape == (1, 5, 6) and b.shape == (1, 6, 6)  # rank 3 x 2
    torch.testing.assert_close(a @ b, torch.stack([c.factors["m"][0] @ c.factors["m"][1] for c in concepts]).mean(0))
    assert mean_concept(concepts[:1]) is concepts[0]  # one photo: the encoder's prediction as it is


def test_several_photos_of_any_size_and_mode_make_one_concept(personalizer):
    settings = personalizer.settings(tuning_steps=2, num_inference_steps=2)
    small_rgba = png_bytes(Image.new("RGBA", (23, 41), (220, 40, 40, 255)))
    large_grey = png_bytes(Image.new("L", (900, 300), 90), "JPEG")
    one = personalizer.run(BLUE_ON_RED, ["S* on grass"], settings)
    several = personalizer.run([BLUE_ON_RED, small_rgba, large_grey], ["S* on grass"], settings)
    assert several.image_sha256 != one.image_sha256 and len(several.images) == settings.num_images
    a, _ = next(iter(several.concept.factors.values()))
    assert a.shape[-1] == 3 * next(iter(one.concept.factors.values()))[0].shape[-1]  # the three predictions
    # a list of one photo is the one-photo path
    assert personalizer.run([BLUE_ON_RED], ["S* on grass"], settings).image_sha256 == one.image_sha256
    with pytest.raises(UserError, match="not an image"):
        personalizer.run([BLUE_ON_RED, b"junk"], ["S*"], settings)


def test_cli_several_images_and_progress_bars_only_on_a_terminal(smoke, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    config_file, _, encoder = smoke
    paths = []
    for i, data in enumerate((BLUE_ON_RED, solid_png((220, 40, 40), side=97, shape_rgb=(40, 80, 220)))):
        paths += ["--image", str(tmp_path / f"photo{i}.png")]
        (tmp_path / f"photo{i}.png").write_bytes(data)
    argv = [sys.executable, "-m", "components.cli", "personalize", "--config", str(config_file), "--model",
            str(encoder), *paths, "--prompt", "S* on grass", "--tuning-steps", "2", "--out", str(tmp_path / "out")]

    def on_a_terminal(*extra: str) -> tuple[subprocess.CompletedProcess, str]:
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
        chunks = []

        def read() -> None:  # drain the terminal while the command runs (a full pty would block it)
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                chunks.append(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        done = subprocess.run([*argv, *extra], stdout=subprocess.PIPE, stderr=follower, text=True, timeout=600)
        os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
        return done, b"".join(chunks).decode(errors="replace")

    done, terminal = on_a_terminal()
    assert done.returncode == 0, terminal[-3000:]
    assert "photos: 2" in done.stdout
    # tqdm bars (drawn from 0%; how far they are redrawn depends on speed, and they clear when done)
    assert re.search(r"tune: +\d+%\|", terminal) and re.search(r"sample: +\d+%\|", terminal), terminal[-3000:]
    done, terminal = on_a_terminal("--json")
    assert done.returncode == 0 and json.loads(done.stdout)["photos"] == 2
    assert "%|" not in terminal  # --json: no bars, log lines only
    assert "tune 2/2" in terminal


def test_cli_bad_input_is_one_line(smoke, tmp_path, capsys):
    from components.cli import main

    config_file, _, encoder = smoke
    image = tmp_path / "concept.png"
    image.write_bytes(BLUE_ON_RED)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    common = ["personalize", "--config", str(config_file), "--model", str(encoder)]
    cases = [(["--image", str(image), "--prompt", "on a beach"], "no placeholder S*"),
             (["--image", str(image), "--prompt", "S* " + "very " * 40], "too long"),
             (["--image", str(tmp_path / "junk.png"), "--prompt", "S*"], "not an image"),
             (["--image", str(tmp_path / "missing.png"), "--prompt", "S*"], "cannot read image"),
             (["--image", str(image), "--prompt", "S*", "--tuning-steps", "101"],
              "tuning_steps must be between 0 and 100"),
             (["--image", str(image), "--prompt", "S*", "--num-images", "0"], "num_images must be between 1 and 16")]
    for args, reason in cases:
        code = main([*common, *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and reason in err[-1] and err[-1].startswith("datencoder personalize: error:"), (args, err)


def test_cli_without_any_model_says_to_run_the_pipeline(smoke, tmp_path, capsys, monkeypatch):
    from components.cli import main

    config_file, _, _ = smoke
    config = yaml.safe_load(config_file.read_text())
    config["personalize"] = {"encoder": str(tmp_path / "no-encoder")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "concept.png").write_bytes(BLUE_ON_RED)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")
    code = main(["personalize", "--config", str(tmp_path / "c.yaml"), "--image", str(tmp_path / "concept.png"),
                 "--prompt", "S*"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "run the pipeline" in err[0]
    assert not (tmp_path / "none.db").exists()  # looking does not create a store


@pytest.mark.parametrize("part, keep", [("encoder", -200), ("base unet", -200), ("backbone clip", -200)])
def test_cli_truncated_weights_are_one_line_and_exit_2(smoke, tmp_path, capsys, part, keep):
    """A truncated model.safetensors (the last 200 bytes missing: a copy that stopped) of the encoder, the
    base's UNet or the backbone CLIP: one line, exit 2, no traceback."""
    import shutil

    from components.cli import main

    config_file, _, encoder = smoke
    config = yaml.safe_load(config_file.read_text())
    broken_encoder = shutil.copytree(encoder, tmp_path / "encoder")
    base = shutil.copytree(config["base"]["pretrained"], tmp_path / "toy-base")
    clip = shutil.copy(config["base"]["backbone_clip"]["pretrained"], tmp_path / "clip.safetensors")
    config["base"]["pretrained"], config["base"]["backbone_clip"]["pretrained"] = str(base), str(clip)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    victim = {"encoder": broken_encoder / "model.safetensors",
              "base unet": base / "unet" / "diffusion_pytorch_model.safetensors",
              "backbone clip": tmp_path / "clip.safetensors"}[part]
    data = victim.read_bytes()
    victim.write_bytes(data[:keep])
    (tmp_path / "concept.png").write_bytes(BLUE_ON_RED)
    code = main(["personalize", "--config", str(tmp_path / "c.yaml"), "--model", str(broken_encoder),
                 "--image", str(tmp_path / "concept.png"), "--prompt", "S*", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err  # before the error: the loaders' progress bars
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("datencoder personalize: error: cannot load") and "Traceback" not in err, err


# --- registry and pyfunc --------------------------------------------------------------------------
def test_register_gates_the_challenger_promote_moves_the_champion_and_pyfunc_tunes_each_image_once(
        smoke, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file

    from components.config import variant_config
    from components.serving import registry

    _, cfg, encoder = smoke
    monkeypatch.setenv("MLFLOW_TRACKING_URI", isolated_store(tmp_path))
    # a second encoder with large random LoRA offsets (B != 0): the gate tells the two apart
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((encoder / "config.json").read_text())
    weights = load_file(str(encoder / "model.safetensors"))
    weights["hypernetwork.to_b.weight"] = torch.randn(weights["hypernetwork.to_b.weight"].shape,
                                                      generator=torch.Generator().manual_seed(0))
    save_file(weights, str(other / "model.safetensors"))
    scores = {d: float(f"{registry.gate_score(Personalizer(cfg.engine, d), cfg.evaluate, cfg.registry)['score']:.6g}")
              for d in (encoder, other)}
    worse_dir, better_dir = sorted(scores, key=scores.get)  # higher is better
    assert scores[worse_dir] < scores[better_dir]
    cfg = variant_config(cfg, registry={"margin": (scores[better_dir] - scores[worse_dir]) / 2})

    first = registry.register(cfg, str(worse_dir))
    better = registry.register(cfg, str(better_dir))
    worse = registry.register(cfg, str(worse_dir))
    name = "datencoder-smoke"  # the preset's own model
    assert first["model"] == better["model"] == name
    assert first["alias"] == "champion" and first["promoted"] and first["gate"]["champion_version"] is None
    assert better["gate"]["score"] == scores[better_dir] and better["alias"] == "challenger" and not better["promoted"]
    assert worse["alias"] is None and worse["gate"]["champion_version"] == first["version"]
    assert worse["gate"]["challenger_version"] == better["version"]
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(name, "champion").version) == first["version"]  # never moved here
    tags = client.get_model_version(name, str(worse["version"])).tags
    assert {"data_version", "git_commit", "gate", "gate_size", "preset", registry.score_tag(cfg.registry)} <= set(tags)
    assert float(tags[registry.score_tag(cfg.registry)]) == worse["gate"]["score"] and tags["preset"] == "smoke"
    promoted = registry.promote(cfg)  # the challenger
    assert (promoted["version"], promoted["previous"]) == (better["version"], first["version"])
    assert int(client.get_model_version_by_alias(name, "champion").version) == better["version"]
    assert "challenger" not in client.get_registered_model(name).aliases
    assert registry.champion_uri(cfg.registry, cfg.preset) == f"models:/{name}@champion"

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    params = model.metadata.get_params_schema().to_dict()
    assert {p["name"] for p in params} == {"tuning_steps", "num_images", "seed", "guidance_scale",
                                           "num_inference_steps", "alpha_blend"}
    assert model.metadata.get_input_schema().input_names() == ["image", "prompt", "concept"]
    other = solid_png((40, 170, 70), shape_rgb=(240, 215, 40))
    import pandas as pd

    rows = pd.DataFrame({"image": [BLUE_ON_RED, other, BLUE_ON_RED],
                         "prompt": ["S* on a beach", "S* on grass", "a sketch of S*"]})
    out = model.predict(rows, params={"tuning_steps": 1, "num_images": 2, "num_inference_steps": 1, "seed": 4})
    assert list(out.columns) == ["image", "prompt", "seed"]
    assert list(out["prompt"]) == ["S* on a beach"] * 2 + ["S* on grass"] * 2 + ["a sketch of S*"] * 2
    assert list(out["seed"]) == [4, 5] * 3
    assert all(Image.open(io.BytesIO(png)).size == (64, 64) for png in out["image"])
    cache = model.unwrap_python_model().personalizer.cache
    assert (cache.misses, cache.hits) == (2, 0)  # three rows, two distinct images, each tuned once
    # a param the signature does not declare is dropped by MLflow's ParamSchema check (public rule)
    typo = model.predict(rows.iloc[:1], params={"tuning_stepz": 1, "tuning_steps": 1, "num_images": 2,
                                                "num_inference_steps": 1, "seed": 4})
    assert list(typo["image"]) == list(out["image"][:2])
    # several photos of one concept: rows with the same `concept` label, a row without a prompt only adds a photo
    photos = pd.DataFrame({"image": [BLUE_ON_RED, other], "prompt": ["S* on a beach", ""], "concept": ["c", "c"]})
    several = model.predict(photos, params={"tuning_steps": 1, "num_images": 1, "num_inference_steps": 1, "seed": 4})
    assert list(several["prompt"]) == ["S* on a beach"]
    p = model.unwrap_python_model().personalizer
    alone = p.run([BLUE_ON_RED, other], ["S* on a beach"], p.settings(tuning_steps=1, num_images=1,
                                                                       num_inference_steps=1, seed=4))
    assert alone.cached and several["image"][0] == alone.images[0].png()


@pytest.mark.slow
def test_identity_stages_writes_one_table_per_stage_and_concept_set(root, tmp_path):
    """benchmarks/identity_stages.py --quick (committed toy models): every stage has both concept sets (shapes
    pre-training saw and did not) and every reading, with intervals; the readers read the toy world's own renders'
    shapes and backgrounds right; no concept is an evaluation concept."""
    out = tmp_path / "stages"
    done = subprocess.run([sys.executable, "benchmarks/identity_stages.py", "--quick", "--rows",
                           "renders,ceiling,encoder 0", "--out", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["out"] == str(out)  # one JSON object on stdout
    result = json.loads((out / "identity_stages.json").read_text())
    assert list(result["rows"]) == ["renders", "ceiling", "encoder 0"]
    images = 2 * 4  # 2 concepts x 4 prompts per set
    for by_set in result["rows"].values():
        assert set(by_set) == {"seen", "unseen"}
        for cell in by_set.values():
            assert cell["images"] == images
            for reading in ("colour_pixel", "colour_clip", "shape_pixel", "shape_clip", "background_pixel"):
                low, high = cell[reading + "_ci"]
                assert 0 <= low <= cell[reading] <= high <= 1
            # every image's pixel colour is accounted for, the right ones as the colour reading counts them
            read_as = cell["colour_read_as"]
            assert sum(read_as.values()) == images and read_as.get("right", 0) == round(images * cell["colour_pixel"])
    renders = result["rows"]["renders"]
    assert all(renders[s]["shape_pixel"] == 1 and renders[s]["background_pixel"] == 1 for s in renders)
    from components.config import load_config

    concepts = [c for names in result["concepts"].values() for c in names]
    assert concepts and not set(concepts) & set(load_config("toy").evaluate.concepts)
    assert "| encoder 0 |" in (out / "identity_stages.md").read_text()
