"""Vision-language records through the one data pipeline: the image tokens go in the prompt.

A record (the VQA folder format of :mod:`stillroom.domains.vl.vqa`: ``{"image": "images/<id>.png", "prompt",
"completion", "family", "level", "caption"}``) is encoded by the plain record formats
(:func:`stillroom.data.formats.encode_record`), then :class:`VlmEncoder` inserts the image tokens right after
BOS, as prompt (never learned). So ``prompt_completion`` gives ``[BOS] <image>*N prompt completion [EOS]``
(answers learned) and ``text`` (e.g. ``text_field: caption``) gives ``[BOS] <image>*N caption [EOS]``
(captioning). The image file is checked here, while the data is built: a missing or unreadable image is a
bad record naming the file (``data.on_bad_record`` applies), so it stops the run before training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal

from stillroom.config.core import DataSource
from stillroom.config.vlm import VlmDataConfig
from stillroom.data.encoders import RecordViews
from stillroom.data.errors import BadRecord
from stillroom.data.formats import Encoded, Format, TextEncoder, encode_record, string_field
from stillroom.data.images import ImageError, ImageRef, check_image
from stillroom.models.cached import settings_key

ImageRefOf = Callable[[str], ImageRef]
REPORT_FIELDS = ("family", "level", "prompt", "completion", "caption")
"""Record fields kept on each example (``Example.meta``) for the report's per-family accuracy."""


class VlmEncoder:
    """The record formats with the image tokens of the record's image in the prompt (module docstring)."""

    roles: tuple[str | None, ...] = (None,)
    on_too_long: Literal["truncate", "drop"] = "drop"  # a cut answer would teach a wrong answer
    packs_text = False  # every sequence has its own image
    views_differ = False

    def __init__(self, image_token_id: int, n_image_tokens: int, image_field: str, ref_of: ImageRefOf) -> None:
        self.image_ids = [image_token_id] * n_image_tokens
        self.image_field = image_field
        self.ref_of = ref_of
        self.counts: dict[str, int] = {}

    def encode(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder, key: str) -> RecordViews | None:
        enc = encode_record(fields, fmt, src, text)
        if enc is None:
            return None
        relative = string_field(fields, self.image_field, "set vlm.image_field to the record's image field")
        path = image_path(src, relative)
        try:
            check_image(path)
        except ImageError as err:
            raise BadRecord(f"field {self.image_field!r}: {err}") from None
        head = len(text.bos_prefix)
        ids = enc.input_ids[:head] + self.image_ids + enc.input_ids[head:]
        target = enc.target[:head] + [False] * len(self.image_ids) + enc.target[head:]
        meta = {k: fields[k] for k in REPORT_FIELDS if k in fields}
        seq = Encoded(ids, target, image=self.ref_of(path), meta={**meta, "image_path": path})
        return RecordViews([seq], seq, seq)


def image_path(src: DataSource, relative: str) -> str:
    """The image file of a record: relative paths are relative to the records file's folder."""
    p = Path(relative).expanduser()
    if not p.is_absolute() and src.path is not None:
        p = Path(src.path).expanduser().parent / p
    return str(p)


def generated_folder(cfg: VlmDataConfig, cache: Path) -> Path:
    """The scene questions of ``cfg``, written once into ``cache/vqa/<key>`` (``records.jsonl`` + ``images/``).

    The key hashes the settings, so a change makes a new folder; the folder is written atomically by
    :func:`stillroom.domains.vl.vqa.write_vqa_folder` (a temporary folder renamed into place).
    """
    from stillroom.domains.vl.vqa import write_vqa_folder

    key = settings_key(cfg.model_dump(mode="json"))
    folder = cache / "vqa" / key
    if not (folder / "records.jsonl").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_vqa_folder(cfg.scenes, folder, n_images=cfg.images, split="train", seed=cfg.seed,
                         per_image=cfg.per_image)
    return folder


def record_texts(records_file: Path, limit: int = 20000) -> list[str]:
    """The prompt, completion and caption texts of the first ``limit`` records (a tokenizer's training text)."""
    texts: list[str] = []
    with open(records_file, encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if i >= limit:
                break
            if line.strip():
                fields = json.loads(line)
                texts += [fields[k] for k in ("prompt", "completion", "caption", "text") if isinstance(fields.get(k), str)]
    return texts


def image_prompts(records_file: str, n: int, model, tokenizer, model_folder: str | None,
                  image_field: str = "image") -> tuple[list[list[int]], list]:
    """The first ``n`` records of a VQA records file as image prompts for ``model``: token ids
    (``[BOS] <image>*N prompt``) and pixels ``[1, 3, S, S]`` each (``stillroom spec-eval`` of a VLM target).
    A record without its image or prompt is an error naming ``file:line``."""
    from stillroom.data.images import load_pixels
    from stillroom.domains.vl.vlm_model import image_ref, image_token_count

    src = DataSource(path=records_file)
    text = TextEncoder(tokenizer, add_eos=False)
    image_ids = [int(model.config.image_token_index)] * image_token_count(model.config)
    ids, pixels = [], []
    with open(Path(records_file).expanduser(), encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if len(ids) >= n:
                break
            if not line.strip():
                continue
            fields = json.loads(line)
            try:
                prompt = string_field(fields, "prompt", "give VQA records (prompt, completion, image)")
                path = image_path(src, string_field(fields, image_field, "give each record its image"))
                check_image(path)
            except (BadRecord, ImageError) as err:
                raise ValueError(f"{records_file}:{line_no}: {err}") from None
            ids.append(text.bos_prefix + image_ids + text.encode(prompt))
            pixels.append(load_pixels(image_ref(model, path, model_folder))[None])
    if not ids:
        raise ValueError(f"{records_file}: no records to prompt with")
    return ids, pixels
