"""Data preparation: ImageNet class folders and Open Images largest-object crops become one set of
square images at one resolution, with a manifest of what was kept and a list of what was not.

    class folders, box CSV + images (local folder or S3)  ->  candidates
    -> thread pool: read (S3: retried with backoff) -> decode safely -> square crop -> resize -> JPEG
    -> exact duplicates kept once, hash-based train/val split
    -> out/: images/<sha256[:2]>/<sha256>.jpg, manifest.parquet, rejected.parquet, summary.json

Bad input never stops the run: every rejected input is one row of rejected.parquet with a `reason`
(a fixed phrase, counted in the summary) and a `detail` (the specifics). A store that cannot be read
does: when fewer than `min_read_fraction` of the requested inputs were read, or no read of a source
succeeded, the run fails with one line (S3 403: a credentials problem) and the previous output stays.
The output is written to a sibling `.partial` folder and renamed at the end, so a crash never leaves a
dataset that looks complete. Outputs are a pure function of the inputs and the config (same bytes on every run).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections import Counter
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ThreadPoolExecutor,
    as_completed,
    wait,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pandas as pd
from PIL import ExifTags, Image

from components.config import PrepareConfig, S3Config
from components.data.images import BadImage, load_rgb, open_image
from components.errors import UserError
from components.progress import Progress


log = logging.getLogger(__name__)

JPEG_QUALITY = 95  # prepared images: near-lossless, and fast to encode and decode at any size
RETRY_BACKOFF_S = 0.25  # S3 retries wait 0.25 s, 0.5 s, 1 s, ...
IMAGE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\Z")  # a file name, never a path or '..'
BOX_COLUMNS = ["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf", "IsDepiction"]
MANIFEST_COLUMNS = ["path", "source", "source_id", "label", "label_id", "sha256", "width", "height", "split",
                    "template"]
TEMPLATE_COLUMNS = ["source", "source_id", "template"]
REJECTED_COLUMNS = ["source", "source_id", "file", "reason", "detail"]
HELD_OUT = "excluded label (held out)"


class Rejected(Exception):
    """An input that cannot be used. `reason` is a fixed phrase (counted); `detail` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class ReadFailed(Rejected):
    """An input whose bytes could not be read (missing, unreadable, S3 error): counts against min_read_fraction."""


ACCESS_DENIED = "S3 access denied"


@dataclass(frozen=True)
class Candidate:
    """One input image and what to take from it."""

    source: str  # "imagenet" | "openimages"
    source_id: str  # ImageNet: <wnid>/<file name>; Open Images: the ImageID
    label: str  # words ("tench"); the id itself when no mapping is given
    label_id: str  # synset id or Open Images MID
    location: str  # local path or s3:// URI
    box: tuple[float, float, float, float] | None = None  # normalised (x0, y0, x1, y1); None: whole image
    shows: frozenset[str] = frozenset()  # every label name and id in the image (held-out check)

    def rejection(self, reason: str, detail: str = "") -> dict:
        return rejection(self.source, self.source_id, self.location, reason, detail)


def rejection(source: str, source_id: str, file: str, reason: str, detail: str = "") -> dict:
    """One row of rejected.parquet."""
    return {"source": source, "source_id": source_id, "file": file, "reason": reason, "detail": detail}


@dataclass(frozen=True)
class Prepared:
    candidate: Candidate
    sha256: str  # of the prepared JPEG, which is stored under this name
    width: int  # of the original, as displayed (after EXIF orientation)
    height: int


# --- the stage ------------------------------------------------------------------------------------
def prepare(config: PrepareConfig) -> dict:
    """Prepare the configured sources into `config.out`; returns the summary (also summary.json)."""
    candidates, rejected = collect_candidates(config)
    templates = read_templates(config.captions)
    excluded = set(config.exclude_labels)
    rejected += [c.rejection(HELD_OUT, ", ".join(sorted(c.shows & excluded)))
                 for c in candidates if c.shows & excluded]
    candidates = [c for c in candidates if not c.shows & excluded]

    out = Path(config.out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    s3 = s3_client(config.s3, config.threads) if any(c.location.startswith("s3://") for c in candidates) else None

    def read(location: str) -> bytes:
        return read_s3(s3, location, config.retries) if location.startswith("s3://") else read_file(location)

    def work(c: Candidate) -> Prepared:
        jpeg, width, height = prepare_image(read(c.location), c.box, config.resolution, config.max_pixels)
        sha256 = hashlib.sha256(jpeg).hexdigest()
        path = image_path(partial, sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg)  # a duplicate racing here writes the same bytes at the same offsets
        return Prepared(c, sha256, width, height)

    by_content: dict[str, list[Prepared]] = {}
    requested = Counter(c.source for c in candidates)
    unread: Counter = Counter()  # per source
    unread_reasons: Counter = Counter()
    progress = Progress("prepare", len(candidates))
    # PIL warns (instead of raising) for images just over its own pixel limit; make that a rejection.
    # The filter is process-wide while it lasts, so it is set here, around the pool, not per thread.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for done, (candidate, result) in enumerate(imap_bounded(work, candidates, config.threads), 1):
            if isinstance(result, Rejected):
                rejected.append(candidate.rejection(result.reason, result.detail))
                if isinstance(result, ReadFailed):
                    unread[candidate.source] += 1
                    unread_reasons[result.reason] += 1
            else:
                by_content.setdefault(result.sha256, []).append(result)
            progress.update(done)
    try:
        check_reads(requested, unread, unread_reasons, config.min_read_fraction)
    except UserError:
        shutil.rmtree(partial, ignore_errors=True)  # the previous output in `out` is left as it was
        raise

    # which of several identical images is kept must not depend on thread timing: the first by id
    manifest_rows = []
    for group in by_content.values():
        first, *others = sorted(group, key=lambda p: (p.candidate.source, p.candidate.source_id))
        c = first.candidate
        template = templates.get((c.source, c.source_id), "")
        manifest_rows.append(manifest_row(first, config.val_fraction) | {"template": template})
        rejected += [p.candidate.rejection("duplicate image", f"same content as {first.candidate.source}:"
                                           f"{first.candidate.source_id}") for p in others]

    manifest = pd.DataFrame(manifest_rows, columns=MANIFEST_COLUMNS).sort_values("path", ignore_index=True)
    rejects = pd.DataFrame(rejected, columns=REJECTED_COLUMNS).sort_values(
        ["source", "source_id", "reason", "file"], ignore_index=True)
    manifest.to_parquet(partial / "manifest.parquet", index=False)
    rejects.to_parquet(partial / "rejected.parquet", index=False)
    summary = {
        "out": str(out),
        "accepted": len(manifest),
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(rejects["reason"]).items())),
        "splits": dict(sorted(Counter(manifest["split"]).items())),
        "data_version": data_version(partial),
    }
    (partial / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    replace_dir(partial, out)
    log.info("prepared %d images into %s (%d rejected)", summary["accepted"], out, summary["rejected"])
    return summary


def read_templates(path: str | None) -> dict[tuple[str, str], str]:
    """{(source, source_id): caption template} from the captions CSV (none: {}). A template must hold one `{}`."""
    if not path:
        return {}
    try:
        table = pd.read_csv(path, usecols=TEMPLATE_COLUMNS, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read caption templates {path}: {str(e).splitlines()[0]} "
                        f"(a CSV with columns {', '.join(TEMPLATE_COLUMNS)})") from None
    bad = table[(table.template != "") & (table.template.str.count(r"\{\}") != 1)]
    if len(bad):
        raise UserError(f"{path}: template {bad.template.iloc[0]!r} ({bad.source.iloc[0]}:{bad.source_id.iloc[0]}) "
                        f"must contain exactly one {{}} where the object goes")
    return {(r.source, r.source_id): r.template for r in table.itertuples() if r.template}


def check_reads(requested: Counter, unread: Counter, reasons: Counter, min_fraction: float) -> None:
    """A UserError when the sources could not be read: too few inputs read overall, or none of a source."""
    total, failed = sum(requested.values()), sum(unread.values())
    dead = [source for source, n in sorted(requested.items()) if n and unread[source] == n]
    if not failed or (not dead and total - failed >= min_fraction * total):
        return
    what = (f"no {' or '.join(dead)} input could be read" if dead else
            f"only {total - failed} of {total} inputs could be read (prepare.min_read_fraction {min_fraction:g})")
    why = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
    if reasons[ACCESS_DENIED]:
        why += ("; S3 refused the credentials (HTTP 403): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (a "
                "session token may have expired) and that they may read the bucket")
    raise UserError(f"{what} ({why}); the previous prepared data was kept")


def data_version(out_dir: str | os.PathLike, missing: str | None = None) -> str:
    """The manifest's hash as DVC records it (DVC 3: md5 of the file's bytes). The manifest names
    every image by its sha256, so this one hash identifies the whole prepared set. Without prepared
    data: `missing` when given (a tag for a run that does not need the data), else a UserError."""
    digest = hashlib.md5()
    try:
        with open(Path(out_dir) / "manifest.parquet", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        if missing is not None:
            return missing
        raise UserError(f"no prepared data in {out_dir} (manifest.parquet missing): "
                        "run `datencoder prepare`") from None
    return digest.hexdigest()


def image_path(root: Path, sha256: str) -> Path:
    return root / "images" / sha256[:2] / f"{sha256}.jpg"


def manifest_row(p: Prepared, val_fraction: float) -> dict:
    # split by the input's identity, not the output's bytes: an image stays on its side when the
    # resolution or the JPEG encoder changes (duplicates are gone by now, so none straddles the split)
    c = p.candidate
    key = hashlib.sha256(f"{c.source}:{c.source_id}".encode()).digest()
    split = "val" if int.from_bytes(key[:4], "big") < val_fraction * 2**32 else "train"
    return {"path": image_path(Path(), p.sha256).as_posix(), "source": c.source, "source_id": c.source_id,
            "label": c.label, "label_id": c.label_id, "sha256": p.sha256, "width": p.width,
            "height": p.height, "split": split}


def replace_dir(partial: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def imap_bounded(fn: Callable[[Candidate], Prepared], items: Iterable[Candidate],
                 workers: int) -> Iterator[tuple[Candidate, Prepared | Rejected]]:
    """(item, fn(item) or its Rejected) as they finish, with a few tasks per worker in flight:
    millions of inputs never become millions of futures, and one slow read never stalls the rest."""
    def attempt(item: Candidate) -> tuple[Candidate, Prepared | Rejected]:
        try:
            return item, fn(item)
        except Rejected as r:
            return item, r

    with ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
        pending: set[Future] = set()
        for item in items:
            if len(pending) >= 4 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
            pending.add(pool.submit(attempt, item))
        yield from (future.result() for future in as_completed(pending))


# --- one image ------------------------------------------------------------------------------------
def prepare_image(data: bytes, box: tuple[float, float, float, float] | None, resolution: int,
                  max_pixels: int) -> tuple[bytes, int, int]:
    """Decode without trusting the file, take the square around the box (None: the whole image),
    resize, encode. -> (JPEG bytes, original width, original height as displayed)."""
    try:
        image = open_image(data, max_pixels)  # the header only: a bomb is refused before its pixels exist
        try:
            swapped = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        except Exception:  # a broken EXIF block: load_rgb reports the image as corrupt
            swapped = False
        width, height = (image.height, image.width) if swapped else image.size
        x0, y0, x1, y1 = square_box(box or (0.0, 0.0, 1.0, 1.0), width, height)
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; ask for the largest that keeps the crop >= N
        scale = resolution / (x1 - x0)
        image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image = load_rgb(image)
    except BadImage as e:
        raise Rejected(e.reason, str(e)) from None
    fx, fy = image.width / width, image.height / height  # draft scale
    crop = (x0 * fx, y0 * fy, x1 * fx, y1 * fy)
    # antialiased bilinear (what torchvision's Resize does); reducing_gap: integer box-reduce first,
    # then resample by at most 2x, which is much faster and looks the same
    square = image.resize((resolution, resolution), Image.Resampling.BILINEAR, box=crop, reducing_gap=2.0)
    buffer = io.BytesIO()
    square.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue(), width, height


def square_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    """The square (in pixels) around a normalised box: its longer side, centred on it, moved (not
    shrunk) to stay inside the image, and shrunk only when the image is narrower than that. For the
    whole image this is the centre crop."""
    bx0, by0, bx1, by1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    side = max(1.0, min(max(bx1 - bx0, by1 - by0), width, height))
    x0 = min(max((bx0 + bx1 - side) / 2, 0.0), width - side)
    y0 = min(max((by0 + by1 - side) / 2, 0.0), height - side)
    return x0, y0, x0 + side, y0 + side


# --- reading bytes --------------------------------------------------------------------------------
def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ReadFailed("image missing", path) from None
    except OSError as e:
        raise ReadFailed("unreadable file", f"{path}: {e.strerror}") from None


def s3_client(s3: S3Config, workers: int):
    # boto3: only for s3:// sources; pretrain and evaluate import this module without it
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig

    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    session = boto3.session.Session()
    if not s3.unsigned and session.get_credentials() is None:
        raise UserError("no AWS credentials for reading from S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                        " (or a profile), or prepare.s3.unsigned: true for a public bucket")
    config = BotoConfig(
        signature_version=UNSIGNED if s3.unsigned else None,
        connect_timeout=s3.timeout_s, read_timeout=s3.timeout_s,
        retries={"total_max_attempts": 1},  # read_s3 retries itself, so that the reason is recorded
        max_pool_connections=workers,
        s3={"addressing_style": "path"} if endpoint else None,  # S3-compatible stores serve paths
    )
    return session.client("s3", endpoint_url=endpoint, region_name=s3.region, config=config)


def read_s3(client, uri: str, retries: int) -> bytes:
    """GET one object; timeouts, connection errors, 429 and 5xx are retried with exponential backoff."""
    from botocore.exceptions import BotoCoreError, ClientError  # botocore: only for s3:// sources

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            error = f"{e.response.get('Error', {}).get('Code', '?')} (HTTP {status})"
            if status == 404:
                raise ReadFailed("image missing", f"{uri}: {error}") from None
            if status == 403:  # expired or wrong keys, or a policy without s3:GetObject: never retried
                raise ReadFailed(ACCESS_DENIED, f"{uri}: {error}") from None
            if status != 429 and status < 500:
                raise ReadFailed("S3 read failed", f"{uri}: {error}") from None
        except (BotoCoreError, OSError) as e:  # timeouts, resets, truncated bodies
            error = f"{type(e).__name__}: {e}"
    raise ReadFailed("S3 read failed after retries", f"{uri}: {error}, {retries + 1} attempts")


# --- sources --------------------------------------------------------------------------------------
def collect_candidates(config: PrepareConfig) -> tuple[list[Candidate], list[dict]]:
    if not (config.imagenet or config.openimages_boxes or config.openimages_images):
        raise UserError("nothing to prepare: give --imagenet and/or --openimages-boxes with --openimages-images")
    candidates: list[Candidate] = []
    rejected: list[dict] = []
    if config.imagenet:
        candidates += imagenet_candidates(Path(config.imagenet), config.imagenet_synsets)
    if config.openimages_boxes or config.openimages_images:
        if not (config.openimages_boxes and config.openimages_images):
            raise UserError("Open Images needs both --openimages-boxes (CSV) and --openimages-images (folder or s3://)")
        found, bad = openimages_candidates(config)
        candidates += found
        rejected += bad
    return candidates, rejected


def imagenet_candidates(root: Path, synsets: str | None) -> list[Candidate]:
    """Every file in every class folder (root/train/<wnid>/ or root/<wnid>/) is a candidate: files
    that are not images are rejected with a reason rather than silently skipped."""
    if not root.is_dir():
        raise UserError(f"ImageNet folder not found: {root}")
    synsets_file = Path(synsets) if synsets else root / "LOC_synset_mapping.txt"
    if synsets and not synsets_file.is_file():
        raise UserError(f"synset mapping not found: {synsets_file}")
    words = read_synsets(synsets_file) if synsets_file.is_file() else {}
    classes = root / "train" if (root / "train").is_dir() else root
    candidates = []
    for folder in sorted(p for p in classes.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = words.get(folder.name, folder.name)
        for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            candidates.append(Candidate("imagenet", f"{folder.name}/{file.name}", label, folder.name, str(file),
                                        shows=frozenset({label, folder.name})))
    return candidates


def read_synsets(path: Path) -> dict[str, str]:
    """LOC_synset_mapping.txt: `n01440764 tench, Tinca tinca` -> {'n01440764': 'tench'}."""
    mapping = {}
    for line in path.read_text(errors="replace").splitlines():
        wnid, _, words = line.strip().partition(" ")
        if wnid:
            mapping[wnid] = words.split(",")[0].strip() or wnid
    return mapping


def read_class_names(path: str | None) -> dict[str, str]:
    """oidv7-class-descriptions.csv (LabelName,DisplayName; older files have no header) -> {MID: name}."""
    if not path:
        return {}
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            return {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2 and row[0] != "LabelName"}
    except OSError as e:
        raise UserError(f"cannot read Open Images classes {path}: {e.strerror}") from None


def image_location(images: str, image_id: str) -> str:
    """`{ImageID}` in a template is replaced; a folder or s3:// prefix gets `/{ImageID}.jpg`."""
    template = images if "{ImageID}" in images else images.rstrip("/") + "/{ImageID}.jpg"
    return template.replace("{ImageID}", image_id)


def openimages_candidates(config: PrepareConfig) -> tuple[list[Candidate], list[dict]]:
    """One candidate per image: its largest usable box. Bad rows are rejected one by one. The
    candidate `shows` the labels of all its boxes: a crop of one object may show its neighbour."""
    images = config.openimages_images
    if not images.startswith("s3://") and not Path(image_location(images, "x")).parent.is_dir():
        raise UserError(f"Open Images image folder not found: {images}")
    names = read_class_names(config.openimages_classes)
    boxes: dict[str, list[tuple[float, str, tuple[float, float, float, float]]]] = {}
    labels_seen: dict[str, set[str]] = {}
    rejected = []
    for line, row in box_rows(config.openimages_boxes):
        try:
            image_id, box = parse_box(row)
        except Rejected as r:
            rejected.append(rejection("openimages", row.get("ImageID", ""), f"{config.openimages_boxes}:{line}",
                                      r.reason, r.detail))
            continue
        labels_seen.setdefault(image_id, set()).add(row["LabelName"])
        boxes.setdefault(image_id, [])
        if not (config.skip_group_of and row["IsGroupOf"] == "1"
                or config.skip_depiction and row["IsDepiction"] == "1"):
            boxes[image_id].append(((box[2] - box[0]) * (box[3] - box[1]), row["LabelName"], box))

    candidates = []
    for image_id, usable in boxes.items():
        location = image_location(images, image_id)
        if not usable:
            rejected.append(rejection("openimages", image_id, location, "no usable box",
                                      "only group-of or depiction boxes"))
            continue
        _, mid, box = max(usable, key=lambda b: b[0])  # the first of equally large boxes
        shows = frozenset(labels_seen[image_id] | {names.get(m, m) for m in labels_seen[image_id]})
        candidates.append(Candidate("openimages", image_id, names.get(mid, mid), mid, location, box, shows))
    return candidates, rejected


def box_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of the box CSV. A row the csv module cannot parse becomes a row without
    columns, which parse_box rejects, so one bad line never hides the rest of the file."""
    try:
        f = open(path, newline="", encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read Open Images boxes {path}: {e.strerror}") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [c for c in BOX_COLUMNS if c not in header]
        if missing:
            raise UserError(f"{path} is not an Open Images box CSV: missing columns {', '.join(missing)}")
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield reader.line_num, {"_error": str(e)}
                continue
            row = dict(zip(header, values)) if len(values) == len(header) else {
                "_error": f"{len(values)} fields, expected {len(header)}", "ImageID": values[0] if values else ""}
            yield reader.line_num, row


def parse_box(row: dict[str, Any]) -> tuple[str, tuple[float, float, float, float]]:
    """-> (ImageID, normalised (x0, y0, x1, y1)) of a well-formed row with a box inside the image."""
    if "_error" in row:
        raise Rejected("malformed CSV row", row["_error"])
    image_id = row["ImageID"]
    if not IMAGE_ID.match(image_id):
        raise Rejected("unsafe or empty ImageID", repr(image_id[:100]))
    try:
        x0, x1, y0, y1 = (float(row[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
    except ValueError as e:
        raise Rejected("malformed CSV row", str(e)) from None
    coords = (x0, x1, y0, y1)
    if not all(0.0 <= v <= 1.0 for v in coords):  # also false for NaN
        raise Rejected("box outside [0, 1]", f"XMin={x0} XMax={x1} YMin={y0} YMax={y1}")
    if x0 > x1 or y0 > y1:
        raise Rejected("box with min > max", f"XMin={x0} XMax={x1} YMin={y0} YMax={y1}")
    if x0 == x1 or y0 == y1:
        raise Rejected("zero-area box", f"XMin={x0} XMax={x1} YMin={y0} YMax={y1}")
    return image_id, (x0, y0, x1, y1)
