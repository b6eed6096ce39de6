"""Prepare throughput next to PIL decode-only throughput, measured in the same run on the same files.

    .venv/bin/python benchmarks/prepare_throughput.py [--n 120] [--threads 2]

Cases: 64 px from 256x256 PNGs (toy scale), 512 px from 1024x768 JPEGs (Open Images' 1024 px
downloads) and from 2048x1536 JPEGs (larger originals, where JPEG's reduced-scale decoding pays off
in prepare but not in decode-only, which decodes every pixel). Decode-only is the same thread pool
reading each file and running Image.open(...).load(); prepare adds the square crop, resize, JPEG encode,
hashing, writing and the manifest. Goal: prepare >= 70% of decode-only images/s. Each is timed twice, the
faster one counts.
"""

from __future__ import annotations

import io
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness
import numpy as np
from PIL import Image

from components.config import PrepareConfig
from components.data.prepare import prepare


CASES = [  # (name, source size, source format, output resolution)
    ("64px-from-png", (256, 256), "PNG", 64),
    ("512px-from-1024x768-jpeg", (1024, 768), "JPEG", 512),
    ("512px-from-2048x1536-jpeg", (2048, 1536), "JPEG", 512),
]


def photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour gradients plus grain: compresses like a photo, unlike flat colour or pure noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0 : h // 4, 0 : w // 4].astype(np.float32)  # gradients at 1/4 scale, then upsampled
    channels = [127 + 100 * np.sin(x / rng.uniform(5, 25) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(5, 25))
                for _ in range(3)]
    smooth = Image.fromarray(np.stack(channels, -1).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(smooth, np.int16) + rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_sources(root: Path, n: int, size: tuple[int, int], fmt: str) -> list[Path]:
    folder = root / "imagenet" / "n00000001"
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        buffer = io.BytesIO()
        photo_like(size, i).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(folder / f"img_{i:05d}.{fmt.lower()}")
        paths[-1].write_bytes(buffer.getvalue())
    return paths


def decode_only(paths: list[Path], threads: int) -> float:
    def decode(path: Path) -> None:
        Image.open(io.BytesIO(path.read_bytes())).load()

    with harness.timed() as t, ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, paths))
    return len(paths) / t.seconds


def prepare_rate(root: Path, resolution: int, threads: int, n: int, run: int) -> float:
    # the generated ImageNet-layout folder only: no Open Images, no caption templates (data/raw is not needed)
    config = PrepareConfig(out=str(root / f"prepared-{run}"), imagenet=str(root / "imagenet"), openimages_boxes=None,
                           openimages_classes=None, openimages_images=None, captions=None, resolution=resolution,
                           threads=threads, exclude_labels=[])
    with harness.timed() as t:
        summary = prepare(config)
    assert summary["accepted"] == n, summary
    return n / t.seconds


def main() -> None:
    parser = harness.parser(__doc__, __file__, config=False)
    parser.add_argument("--n", type=int, default=120, help="images per case")
    parser.add_argument("--threads", type=int, default=2, help="for both prepare and decode-only")
    args = parser.parse_args()
    results = {}
    for name, size, fmt, resolution in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_sources(Path(tmp), args.n, size, fmt)
            decode_only(paths, args.threads)  # warm the page cache and the thread pool
            decode = max(decode_only(paths, args.threads) for _ in range(2))
            prepared = max(prepare_rate(Path(tmp), resolution, args.threads, args.n, run) for run in range(2))
        results[name] = {"decode_only_img_s": round(decode, 1), "prepare_img_s": round(prepared, 1),
                         "ratio": round(prepared / decode, 3)}
        harness.log(f"{name}: decode-only {decode:.1f} img/s, prepare {prepared:.1f} img/s, "
                    f"ratio {prepared / decode:.2f} (goal >= 0.70)")
    harness.report({"n": args.n, "threads": args.threads, **results}, args)


if __name__ == "__main__":
    main()
