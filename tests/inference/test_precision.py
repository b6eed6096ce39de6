"""The base in bfloat16 on the CPU (`--dtype bfloat16`): personalisation completes, sampling runs in bf16 while
the tuned tensors stay float32. Smoke-sized random-weight models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from smoke_models import smoke_setup, solid_png

from components.config import variant_config
from components.inference.engine import Personalizer


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return smoke_setup(tmp_path_factory.mktemp("smoke"))


def test_cli_personalize_in_bfloat16_on_the_cpu_completes(smoke, tmp_path, capsys):
    from components.cli import main

    config_file, _, encoder = smoke
    image = tmp_path / "concept.png"
    image.write_bytes(solid_png((220, 40, 40), shape_rgb=(40, 80, 220)))
    code = main(["personalize", "--config", str(config_file), "--image", str(image), "--model", str(encoder),
                 "--prompt", "S* on a beach", "--tuning-steps", "2", "--num-inference-steps", "2", "--device", "cpu",
                 "--dtype", "bfloat16", "--out", str(tmp_path / "out"), "--export", str(tmp_path / "export"),
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report["runtime"] == {"device": "cpu", "dtype": "bfloat16"}
    pixels = np.asarray(Image.open(report["images"][0]["path"]))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0  # a drawn image, not a blank from NaNs
    files = report["export"]["files"]
    assert files and all((tmp_path / "export" / name).is_file() for name in files)


def test_bfloat16_base_tunes_float32_tensors(smoke):
    _, cfg, encoder = smoke
    personalizer = Personalizer(variant_config(cfg, runtime={"dtype": "bfloat16"}).engine, encoder)
    assert {m.dtype for m in (personalizer.pipe.unet, personalizer.pipe.vae, personalizer.pipe.text_encoder)} == {
        torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in personalizer.encoder.parameters())
    result = personalizer.run(solid_png((40, 170, 70)), ["S* on grass"],
                              personalizer.settings(tuning_steps=1, num_inference_steps=1))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in result.concept.tensors())
