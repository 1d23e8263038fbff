"""Visual questions about procedural scenes, with exactly checkable answers and a difficulty level.

Families (``FAMILIES``), each at levels 1 (easy) .. 3 (hard, compound questions over spatial relations):

* ``colour_of``: "what colour is the circle?" (1), "... the shape at the top left?" (2), "... the shape left of
  the red star?" (3) -> a colour name.
* ``shape_at``: "what shape is at the top left?" over occupied cells (1) or any cell (2, "nothing" when empty),
  "what shape is below the blue ring?" (3) -> a shape name or "nothing".
* ``count``: "how many shapes are there?" (1), "how many red shapes / circles are there?" (2), "how many shapes
  are not red?" (3) -> a number word ("zero" .. "four"; ``check_answer`` also takes digits).
* ``exists``: "is there a star?" (1), "is there a blue star?" (2), "is there a blue star at the top left?" (3)
  -> "yes" / "no".
* ``unanswerable``: questions about an object that is not in the scene -> "unknown" (the hallucination metric of
  LLaVA-MoD counts any other answer).

A level that a scene cannot pose (no object with a unique shape, no related pair) falls back to the nearest
level it can (lower levels first); ``QA.level`` is the level actually asked, and a family no level of which
the scene can pose (unanswerable questions when every object exists) is left out. ``instance`` draws a fresh
scene for one family at exactly one level (CoMD's augmentor). ``write_vqa_folder`` writes a folder of PNG scenes
and ``records.jsonl`` that the VLM and CLIP train on; ``text_record`` gives the same question with the scene as
text ("Scene: <caption>"), so a plain language model learns the same task.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from stillroom.config.scenes import QA_FAMILIES, ScenesConfig, VqaDataConfig
from stillroom.domains.vision.shapes import SPLITS
from stillroom.domains.vision.shapes import BACKGROUNDS
from stillroom.domains.vl.scenes import (
    CELLS, SceneObject, caption, colour_names, generate_scenes, random_objects, shape_names,
)
from stillroom.domains.vl.scenes import render as render_scenes  # [N, 3, S, S] of N object lists
from stillroom.files import write_atomic

FAMILIES: tuple[str, ...] = QA_FAMILIES
LEVELS = (1, 2, 3)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
"""Spatial relation -> (row, column) step from the reference object's cell to the asked cell."""
QUESTION_STREAM = 101
"""Extra entry of the question generator's seed, so questions never reuse the scene stream."""


@dataclass(frozen=True)
class QA:
    """One question about one scene: its exact answer, family (``FAMILIES``) and the level actually asked."""

    question: str
    answer: str
    family: str
    level: int


Posed = tuple[str, str] | None
"""(question, answer), or None when the scene cannot pose that level."""


def questions(objects: list[SceneObject], cfg: ScenesConfig, rng: np.random.Generator,
              families: Sequence[str] | None = None, level: int | None = None) -> list[QA]:
    """One question per family of ``families`` (default all) about the scene ``objects``, at ``level`` (default:
    drawn uniformly per question), falling back to the nearest level the scene can pose (lower first)."""
    chosen = list(FAMILIES if families is None else families)
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown question families {unknown}; choose from {list(FAMILIES)}")
    if level is not None and level not in LEVELS:
        raise ValueError(f"question level must be one of {list(LEVELS)}, got {level}")
    out = []
    for family in chosen:
        want = int(rng.integers(1, 4)) if level is None else level
        for lvl in [*range(want, 0, -1), *range(want + 1, len(LEVELS) + 1)]:  # lower levels first
            posed = _GENERATORS[family][lvl - 1](objects, cfg, rng)
            if posed is not None:
                out.append(QA(posed[0], posed[1], family, lvl))
                break
    return out


def instance(cfg: ScenesConfig, rng: np.random.Generator, family: str, level: int,
             attempts: int = 50) -> tuple[str, QA]:
    """A fresh scene and one question of ``family`` at exactly ``level``: ``(caption, qa)``. Harder levels draw
    fuller scenes (level 3: ``max_objects``), and scenes that cannot pose the level are drawn again (relations
    need two objects in a row or column), so CoMD's augmentor asks what it means to ask."""
    objects, qa = _posed_scene(cfg, rng, family, level, attempts)
    return caption(objects), qa


def image_instance(cfg: ScenesConfig, rng: np.random.Generator, family: str, level: int,
                   attempts: int = 50) -> tuple[np.ndarray, str, QA]:
    """:func:`instance` with the scene rendered as :func:`generate_scenes` renders it: ``(image [3, S, S] float32
    in [0, 1], caption, qa)``; the background and the pixels are drawn from ``rng`` after the question."""
    objects, qa = _posed_scene(cfg, rng, family, level, attempts)
    background = int(rng.integers(len(BACKGROUNDS)))
    return render_scenes(cfg, [objects], [background], rng)[0], caption(objects), qa


def save_png(image_3hw: np.ndarray, path: Path) -> Path:
    """Write ``image_3hw`` (``[3, S, S]`` in [0, 1]) as an RGB PNG at ``path`` atomically (temporary file + rename,
    so a file that exists is whole: a resumed run reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}.png"
    Image.fromarray(_to_uint8(image_3hw)).save(tmp)
    os.replace(tmp, path)
    return path


def _posed_scene(cfg: ScenesConfig, rng: np.random.Generator, family: str, level: int,
                 attempts: int) -> tuple[list[SceneObject], QA]:
    low = min(cfg.max_objects, cfg.min_objects + level - 1)
    for _ in range(attempts):
        objects = random_objects(cfg, rng, int(rng.integers(low, cfg.max_objects + 1)))
        asked = questions(objects, cfg, rng, [family], level)
        if asked and asked[0].level == level:
            return objects, asked[0]
    raise ValueError(f"scenes with scenes.max_objects={cfg.max_objects} cannot pose {family} questions at level "
                     f"{level} ({attempts} scenes tried); raise scenes.max_objects")


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or final full stop."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def check_answer(qa: QA, text: str) -> bool:
    """True when ``text`` is ``qa.answer`` up to case, whitespace and a final full stop (counts: digits too)."""
    got = normalise(text)
    if qa.family == "count" and got.isdigit() and int(got) < len(NUMBER_WORDS):
        got = NUMBER_WORDS[int(got)]
    return got == normalise(qa.answer)


def text_record(caption: str, qa: QA) -> dict:
    """The text-only form of a question: the scene as its caption, so a plain LM learns the same QA."""
    return {"prompt": f"Scene: {caption}\nQuestion: {qa.question}\nAnswer:", "completion": f" {qa.answer}",
            "family": qa.family, "level": qa.level}


def question_rng(seed: int, split: str) -> np.random.Generator:
    """The question stream of ``split``: independent of the scene stream of the same seed."""
    return np.random.default_rng([seed, SPLITS[split], QUESTION_STREAM])


def write_vqa_folder(cfg: ScenesConfig, folder: Path, n_images: int, split: str, seed: int, per_image: int) -> Path:
    """Write ``n_images`` scenes as ``folder/images/<id>.png`` (uint8 RGB) and ``folder/records.jsonl``:
    ``per_image`` questions per scene (families cycled from a random start, levels drawn), or with
    ``per_image=0`` one caption record per image (the CLIP's image-text pairs). Written under a temporary name
    and renamed, so a folder that exists is complete; an existing ``folder`` is refused."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; delete it or choose another folder for the VQA data")
    if n_images < 1 or per_image < 0:
        raise ValueError(f"need n_images >= 1 and per_image >= 0 (got {n_images}, {per_image})")
    scenes = generate_scenes(cfg, split, n_images, seed)
    rng = question_rng(seed, split)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    lines = []
    for i, (image, objs, text) in enumerate(zip(scenes.images, scenes.objects, scenes.captions)):
        image_id = f"{split}-{i:06d}"
        Image.fromarray(_to_uint8(image)).save(tmp / "images" / f"{image_id}.png")
        base = {"image": f"images/{image_id}.png", "caption": text}
        if per_image == 0:
            lines.append({"id": image_id, **base})
        for j, qa in enumerate(_image_questions(objs, cfg, rng, per_image)):
            lines.append({"id": f"{image_id}-{j}", **base, "prompt": qa.question, "completion": qa.answer,
                          "family": qa.family, "level": qa.level})
    (tmp / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    os.replace(tmp, folder)
    return folder


def write_text_qa(cfg: ScenesConfig, path: Path, n_scenes: int, split: str, seed: int, per_image: int) -> Path:
    """Write ``per_image`` text-only questions (:func:`text_record` + ``id`` and ``caption``) about each of
    ``n_scenes`` scenes of ``split`` as JSONL at ``path`` (temporary file + rename; an existing file is refused).
    The same arguments give the same questions as :func:`write_vqa_folder`."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; delete it or choose another file for the text QA data")
    scenes = generate_scenes(cfg, split, n_scenes, seed)
    rng = question_rng(seed, split)
    lines = []
    for i, (objs, text) in enumerate(zip(scenes.objects, scenes.captions)):
        for j, qa in enumerate(_image_questions(objs, cfg, rng, per_image)):
            lines.append({"id": f"{split}-{i:06d}-{j}", **text_record(text, qa), "caption": text})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in lines))
    return path


def write_vqa_data(cfg: VqaDataConfig) -> Path:
    """``stillroom vqa-data``: the folder or text file ``cfg`` asks for; prints what it wrote."""
    scenes, out = cfg.scenes(), Path(cfg.out)
    if cfg.format == "text":
        written = write_text_qa(scenes, out, cfg.images, cfg.split, cfg.seed, cfg.per_image)
    else:
        written = write_vqa_folder(scenes, out, cfg.images, cfg.split, cfg.seed, cfg.per_image)
    what = "caption pairs" if cfg.per_image == 0 else f"{cfg.images * cfg.per_image} questions"
    print(f"wrote {cfg.images} scenes ({what}) to {written}")
    return written


def _image_questions(objects: list[SceneObject], cfg: ScenesConfig, rng: np.random.Generator,
                     per_image: int) -> list[QA]:
    start = int(rng.integers(len(FAMILIES)))
    families = [FAMILIES[(start + k) % len(FAMILIES)] for k in range(per_image)]
    return questions(objects, cfg, rng, families)


def _to_uint8(image_3hw: np.ndarray) -> np.ndarray:
    """``[3, S, S]`` float in [0, 1] -> ``[S, S, 3]`` uint8 (PNG order)."""
    return np.round(np.clip(image_3hw, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


# --- question generators: (objects, cfg, rng) -> (question, answer) or None --------------------------------------

def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def _related(objects: list[SceneObject]) -> list[tuple[str, SceneObject, str]]:
    """Every (relation, reference object, asked cell) whose asked cell lies inside the 2 x 2 grid."""
    out = []
    for ref in objects:
        row, col = divmod(CELLS.index(ref.cell), 2)
        for name, (dr, dc) in RELATIONS.items():
            if 0 <= row + dr < 2 and 0 <= col + dc < 2:
                out.append((name, ref, CELLS[(row + dr) * 2 + col + dc]))
    return out


def _at(objects: list[SceneObject], cell: str) -> SceneObject | None:
    return next((o for o in objects if o.cell == cell), None)


def _colour_of_1(objects, cfg, rng) -> Posed:
    unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if not unique:
        return None
    obj = _pick(rng, unique)
    return f"what colour is the {obj.shape}?", obj.colour


def _colour_of_2(objects, cfg, rng) -> Posed:
    obj = _pick(rng, objects)
    return f"what colour is the shape at the {obj.cell}?", obj.colour


def _colour_of_3(objects, cfg, rng) -> Posed:
    pairs = [(rel, ref, _at(objects, cell)) for rel, ref, cell in _related(objects) if _at(objects, cell)]
    if not pairs:
        return None
    rel, ref, obj = _pick(rng, pairs)
    return f"what colour is the shape {rel} the {ref.colour} {ref.shape}?", obj.colour


def _shape_at_1(objects, cfg, rng) -> Posed:
    obj = _pick(rng, objects)
    return f"what shape is at the {obj.cell}?", obj.shape


def _shape_at_2(objects, cfg, rng) -> Posed:
    cell = _pick(rng, CELLS)
    obj = _at(objects, cell)
    return f"what shape is at the {cell}?", obj.shape if obj else "nothing"


def _shape_at_3(objects, cfg, rng) -> Posed:
    related = _related(objects)
    if not related:
        return None
    rel, ref, cell = _pick(rng, related)
    obj = _at(objects, cell)
    return f"what shape is {rel} the {ref.colour} {ref.shape}?", obj.shape if obj else "nothing"


def _count_1(objects, cfg, rng) -> Posed:
    return "how many shapes are there?", NUMBER_WORDS[len(objects)]


def _count_2(objects, cfg, rng) -> Posed:
    if rng.random() < 0.5:
        colour = _pick(rng, colour_names(cfg))
        return f"how many {colour} shapes are there?", NUMBER_WORDS[sum(o.colour == colour for o in objects)]
    shape = _pick(rng, shape_names(cfg))
    return f"how many {_plural(shape)} are there?", NUMBER_WORDS[sum(o.shape == shape for o in objects)]


def _count_3(objects, cfg, rng) -> Posed:
    colour = _pick(rng, [o.colour for o in objects] + colour_names(cfg))
    return f"how many shapes are not {colour}?", NUMBER_WORDS[sum(o.colour != colour for o in objects)]


def _exists_1(objects, cfg, rng) -> Posed:
    shape = _pick(rng, shape_names(cfg))
    return f"is there a {shape}?", _yes(any(o.shape == shape for o in objects))


def _exists_2(objects, cfg, rng) -> Posed:
    obj = _pick(rng, objects)
    colour = obj.colour if rng.random() < 0.5 else _pick(rng, colour_names(cfg))  # half the time a true one
    return f"is there {_a(colour)} {colour} {obj.shape}?", _yes(any(o.shape == obj.shape and o.colour == colour
                                                                    for o in objects))


def _exists_3(objects, cfg, rng) -> Posed:
    obj = _pick(rng, objects)
    cell = obj.cell if rng.random() < 0.5 else _pick(rng, CELLS)  # a present object, at its cell or maybe not
    return f"is there {_a(obj.colour)} {obj.colour} {obj.shape} at the {cell}?", _yes(cell == obj.cell)


def _unanswerable_1(objects, cfg, rng) -> Posed:
    absent = [s for s in shape_names(cfg) if all(o.shape != s for o in objects)]
    return (f"what colour is the {_pick(rng, absent)}?", "unknown") if absent else None


def _unanswerable_2(objects, cfg, rng) -> Posed:
    absent = [c for c in colour_names(cfg) if all(o.colour != c for o in objects)]
    return (f"what shape is the {_pick(rng, absent)} one?", "unknown") if absent else None


def _unanswerable_3(objects, cfg, rng) -> Posed:
    present = {(o.shape, o.colour) for o in objects}
    absent = [(s, c) for s in shape_names(cfg) for c in colour_names(cfg) if (s, c) not in present]
    if not absent:
        return None
    shape, colour = _pick(rng, absent)
    rel = _pick(rng, list(RELATIONS))
    return f"what colour is the shape {rel} the {colour} {shape}?", "unknown"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


Generator = Callable[[list[SceneObject], ScenesConfig, np.random.Generator], Posed]
_GENERATORS: dict[str, tuple[Generator, Generator, Generator]] = {
    "colour_of": (_colour_of_1, _colour_of_2, _colour_of_3),
    "shape_at": (_shape_at_1, _shape_at_2, _shape_at_3),
    "count": (_count_1, _count_2, _count_3),
    "exists": (_exists_1, _exists_2, _exists_3),
    "unanswerable": (_unanswerable_1, _unanswerable_2, _unanswerable_3),
}
