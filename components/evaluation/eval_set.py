"""The evaluation set: concept images (one for one-shot methods, 3-5 for few-shot ones) and prompts with S*.

- toy: `evaluate.concepts` names toy-world concepts held out of encoder pre-training: shapes it never saw
  (`toy_world.encoder_holdout_shapes`, excluded from the prepared set) and instances of seen shapes whose
  look (shape, colour, pattern, pattern colour) no pre-training image has. The one-shot image is the
  canonical view; the few-shot images add views at other positions and sizes (other render seeds).
- sd15: `evaluate.concept_dir` holds one image per concept (few-shot methods then reuse it) or one folder
  per concept with 3-5 images (the first, by name, is the one-shot image); prompts come from
  `evaluate.prompts_file` (one per line) or `evaluate.prompts`.

`pretraining_looks` reads what pre-training saw from the prepared manifest (joined to the toy world's
captions), so `check_held_out` and the tests verify the claim on the data actually used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from PIL import Image

from components.config import EvaluateConfig
from components.data.images import read_image
from components.errors import UserError
from components.model.placeholder import PLACEHOLDER
from components.toy import world as tw


log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# few-shot views beyond the canonical one: (position, size); distinct framings of the same object
FEW_SHOT_FRAMINGS = [("left", "medium"), ("top right", "small"), ("bottom", "large"), ("right", "small")]


@dataclass
class EvalConcept:
    name: str
    images: list[Image.Image]  # images[0]: the single input image; all of them: the few-shot set

    @property
    def image(self) -> Image.Image:
        return self.images[0]


@dataclass
class EvalSet:
    concepts: list[EvalConcept]
    prompts: list[str]


def parse_concept(key: str) -> tw.ToyConcept:
    """'colour-pattern-patterncolour-shape' (ToyConcept.key) -> ToyConcept, or a UserError naming it."""
    parts = key.split("-")
    if len(parts) != 4:
        raise UserError(f"evaluate.concepts: {key!r} is not colour-pattern-patterncolour-shape")
    colour, pattern, pattern_colour, shape = parts
    for value, known, what in ((colour, tw.COLOURS, "colour"), (pattern, tw.PATTERNS, "pattern"),
                               (pattern_colour, tw.COLOURS, "colour"), (shape, tw.SHAPES, "shape")):
        if value not in known:
            raise UserError(f"evaluate.concepts: {key!r} has unknown {what} {value!r}; known: {', '.join(known)}")
    return tw.ToyConcept(shape, colour, pattern, pattern_colour)


def look(concept: tw.ToyConcept) -> tuple[str, str, str, str]:
    """What an image of the concept shows: the pattern colour is invisible on a solid object."""
    return (concept.shape, concept.colour, concept.pattern,
            concept.pattern_colour if concept.pattern != "solid" else "")


def background_for(concept: tw.ToyConcept) -> str:
    """A plain background colour the object stands out from."""
    return next(c for c in ("gray", "white", "black", "blue") if c not in (concept.colour, concept.pattern_colour))


def toy_views(concept: tw.ToyConcept, n: int, side: int = 64) -> list[Image.Image]:
    background = background_for(concept)
    first = tw.canonical(concept, background)
    scenes = [first] + [replace(first, position=pos, size=size) for pos, size in FEW_SHOT_FRAMINGS[:n - 1]]
    return [tw.render(scene, side, seed=i) for i, scene in enumerate(scenes)]


def read_prompts(e: EvaluateConfig) -> list[str]:
    prompts = e.prompts
    if e.prompts_file:
        try:
            prompts = [line.strip() for line in Path(e.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as err:
            raise UserError(f"cannot read evaluate.prompts_file {e.prompts_file}: {err.strerror}") from None
    if not prompts:
        raise UserError("the evaluation needs at least one prompt (evaluate.prompts or evaluate.prompts_file)")
    missing = [p for p in prompts if PLACEHOLDER not in p]
    if missing:
        raise UserError(f"evaluation prompt {missing[0]!r} has no placeholder {PLACEHOLDER}")
    return prompts


def folder_concepts(folder: str, few_shot: int) -> list[EvalConcept]:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"evaluate.concept_dir {folder} is not a folder: put the concept images there (one image "
                        f"per concept, or one folder of 3-5 images per concept) or set evaluate.concept_dir")

    def load(path: Path) -> Image.Image:
        try:
            return read_image(path.read_bytes(), 50_000_000)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None

    concepts = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:few_shot]
            if files:
                concepts.append(EvalConcept(entry.name, [load(p) for p in files]))
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            concepts.append(EvalConcept(entry.stem, [load(entry)]))
    if not concepts:
        raise UserError(f"evaluate.concept_dir {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return concepts


def load_eval_set(e: EvaluateConfig, base_kind: str) -> EvalSet:
    """The concepts and prompts `e` names: its concept_dir, or on the toy base (`base_kind`) its toy concepts."""
    if e.concept_dir:
        concepts = folder_concepts(e.concept_dir, e.few_shot_images)
    elif base_kind == "toy":
        concepts = [EvalConcept(key, toy_views(parse_concept(key), e.few_shot_images)) for key in e.concepts]
    else:
        raise UserError("the sd15 evaluation needs evaluate.concept_dir: a folder of concept images (the paper used "
                        "17 from the Textual Inversion, Custom Diffusion and DreamBooth sets)")
    if not concepts:
        raise UserError("the evaluation needs at least one concept (evaluate.concepts)")
    return EvalSet(concepts, read_prompts(e))


# --- held out of pre-training ----------------------------------------------------------------------
@dataclass
class PretrainingLooks:
    labels: set[str]  # shape labels of the prepared rows
    looks: set[tuple[str, str, str, str]]  # single-object (ImageNet-layout) images: exact looks
    phrases: str  # multi-object scene captions (pattern colour unrecorded: matched by phrase)

    def contains(self, concept: tw.ToyConcept) -> bool:
        # no shape name is a prefix of another, so a phrase match is a whole-object match
        return concept.shape in self.labels and (look(concept) in self.looks or concept.phrase() in self.phrases)


def pretraining_looks(prepared: str | Path, raw: str | Path) -> PretrainingLooks:
    """What encoder pre-training saw: the prepared manifest's rows joined to the raw toy world's captions."""
    manifest_path, captions_path = Path(prepared) / "manifest.parquet", Path(raw) / "captions.csv"
    try:
        manifest = pd.read_parquet(manifest_path)
        captions = pd.read_csv(captions_path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the pre-training data ({manifest_path}, {captions_path}): {e}") from None
    imagenet = captions[captions.path.isin("imagenet/train/" + manifest.loc[manifest.source == "imagenet",
                                                                          "source_id"])]
    scenes = captions[captions.path.isin("openimages/train/" + manifest.loc[manifest.source == "openimages",
                                                                              "source_id"] + ".jpg")]
    looks = {look(tw.ToyConcept(r.shape, r.colour, r.pattern, r.pattern_colour)) for r in imagenet.itertuples()}
    return PretrainingLooks(set(manifest["label"]), looks, " and ".join(scenes["caption"]))


def check_held_out(e: EvaluateConfig, base_kind: str, prepared: str | Path, raw: str | Path) -> dict:
    """Raise when a toy evaluation concept was in the pre-training data (`prepared`, from the raw toy world `raw`);
    returns what was checked."""
    if base_kind != "toy" or e.concept_dir:
        return {"checked": False, "reason": "not a toy-world evaluation set"}
    prepared, raw = Path(prepared), Path(raw)
    if not (prepared / "manifest.parquet").is_file() or not (raw / "captions.csv").is_file():
        log.warning("cannot check the evaluation concepts against pre-training data: %s or %s is missing",
                    prepared / "manifest.parquet", raw / "captions.csv")
        return {"checked": False, "reason": "no prepared data"}
    seen = pretraining_looks(prepared, raw)
    leaked = [key for key in e.concepts if seen.contains(parse_concept(key))]
    if leaked:
        raise UserError(f"evaluation concepts {', '.join(leaked)} appear in the pre-training data ({prepared}); "
                        f"choose others in evaluate.concepts")
    return {"checked": True, "concepts": len(e.concepts), "unseen_shapes": sorted(
        {parse_concept(k).shape for k in e.concepts} - seen.labels)}
