"""One image reader: `prepare` and `personalize` (the engine) see the same pixels for the awkward formats:
16-bit PNG, float TIFF, CMYK JPEG and a palette PNG with a transparent index. PIL's plain
`convert("RGB")` gets each of these wrong (clips 16 bits to white, floats to black, ...)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from components.data import prepare as prep
from components.inference import engine  # personalize decodes with the engine's reader


SIDE = 32


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("P", (SIDE, SIDE), 1)  # index 1: green; the left half index 0: transparent
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.paste(0, (0, 0, SIDE // 2, SIDE))
    return encode(image, "PNG", transparency=0)


# (file bytes, the expected 8-bit RGB of the left and the right half)
CASES = {
    "16-bit PNG": (encode(Image.fromarray(np.full((SIDE, SIDE), 40000, np.uint16)), "PNG"),
                   (156, 156, 156), (156, 156, 156)),  # 40000 / 256, not clipped to 255
    "float TIFF": (encode(Image.fromarray(np.full((SIDE, SIDE), 0.25, np.float32)), "TIFF"),
                   (64, 64, 64), (64, 64, 64)),  # [0, 1] floats scaled to 0-255, not read as 0
    "CMYK JPEG": (encode(Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)), "JPEG", quality=100),
                  (255, 0, 0), (255, 0, 0)),  # no cyan, no black: red
    "palette + transparency": (palette_with_transparency(), (255, 255, 255), (10, 200, 10)),  # over white
}


def halves(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the left and right halves, away from the edge between them."""
    w = rgb.shape[1]
    return rgb[:, : w // 2 - 3].reshape(-1, 3).mean(0), rgb[:, w // 2 + 3:].reshape(-1, 3).mean(0)


@pytest.mark.parametrize("name", CASES)
def test_prepare_and_personalize_read_the_same_pixels(name):
    data, left, right = CASES[name]
    # personalize: the engine's reader and its model-input pixels, back to 0-255
    personalize_rgb = (engine.to_pixels(engine.read_image(data, 10**6), SIDE)[0].permute(1, 2, 0).numpy() + 1) * 127.5
    # prepare: the prepared JPEG of the whole image at the same side
    jpeg, width, height = prep.prepare_image(data, None, SIDE, 10**6)
    prepare_rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)
    assert (width, height) == (SIDE, SIDE)
    for got in (personalize_rgb, prepare_rgb):
        for half, expected in zip(halves(got), (left, right)):
            assert np.abs(half - np.array(expected)).max() <= 3, (name, half, expected)
    assert np.abs(personalize_rgb - prepare_rgb).mean() <= 2  # and the same as each other, pixel by pixel
