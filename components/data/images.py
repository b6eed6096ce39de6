"""Reading images: the one decoder for photos given to personalise (CLI, pyfunc, baselines, evaluation)
and for the images `prepare` turns into a dataset, so both see the same pixels.

    image = load_rgb(open_image(data, max_pixels))   # 8-bit RGB PIL image, EXIF orientation applied

The header is checked before any pixel is decoded (a decompression bomb is refused from its size alone),
and every failure is a `BadImage`: a UserError whose message says what is wrong and whose `reason` is the
short category `prepare` records in rejected.parquet.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from components.errors import UserError


class BadImage(UserError):
    """An image we refuse; `reason` is its category (the same for every file with that fault)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """PIL reports broken data as OSError, ValueError, SyntaxError, struct.error...: all one fault here."""
    try:
        yield
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not a decodable image",
                       "the image bytes are not an image in a format we read (PNG, JPEG, WebP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too many pixels (decompression bomb)", f"the image is too large ({e})") from None
    except Exception as e:
        raise BadImage("corrupt or truncated image", f"the image data is truncated or corrupt "
                                                     f"({type(e).__name__}: {e})") from None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, checked: not empty, a format PIL reads, at most `max_pixels`. Pixels not decoded
    yet (a caller may still `draft` a smaller JPEG decode)."""
    if not data:
        raise BadImage("empty file", "the image is empty (0 bytes)")
    with _decoding():
        image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage("too many pixels (decompression bomb)",
                       f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                       f"the limit is {max_pixels / 1e6:g}")
    if width == 0 or height == 0:
        raise BadImage("no pixels", "the image has no pixels")
    return image


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image to 8-bit RGB, upright as displayed (EXIF orientation applied)."""
    with _decoding():
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled (not clipped) to 8 bits, float images read as [0, 1] when
    they stay within it (else as 0-255), CMYK and palettes converted, transparency composited over white
    (as the image shows on a page)."""
    if image.mode.startswith("I") and image.mode != "I;8":
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.nan_to_num(values) * scale, 0, 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode in ("P", "L", "RGB")
                                                           and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded image bytes -> checked 8-bit RGB PIL image (BadImage says what is wrong)."""
    return load_rgb(open_image(data, max_pixels))


def read_bytes(path: str | Path) -> bytes:
    """A local image file's bytes; a missing or unreadable file is a UserError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror}") from None


def read_file(path: str | Path, max_pixels: int) -> bytes:
    """A local image file's bytes, checked to decode as `read_image` decodes them: a command checks its
    photos before it loads any model. Every error names the file."""
    data = read_bytes(path)
    try:
        read_image(data, max_pixels)
    except BadImage as e:
        raise BadImage(e.reason, f"{path}: {e}") from None
    return data


def to_pixels(image: Image.Image, side: int) -> torch.Tensor:
    """Centre square crop, resized to the base's resolution: (1, 3, side, side) in [-1, 1]."""
    square = ImageOps.fit(image, (side, side), method=Image.Resampling.BICUBIC)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def to_arrays(pixels: torch.Tensor) -> np.ndarray:
    """Model pixels (N, 3, H, W) in [-1, 1] back to uint8 images (N, H, W, 3), for readers of pixel values."""
    return ((pixels.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
