"""A remote VLM teacher (``teacher.source: remote`` in a run with a ``vlm`` section): token ids *and* the image.

Each row goes to the server as the student's token ids (their ``<image>`` placeholders already expanded to the
model's image-token count, so ``prompt_logprobs`` align 1:1 with the student's positions, by the rules of
:mod:`stillroom.teachers.remote`) plus the row's image file, as an OpenAI ``image_url`` part in the request field
``images`` (:mod:`stillroom.teachers.remote_images`: stillroom's extension, answered by ``stillroom serve-teacher``
serving a LLaVA folder). The server must say in ``/v1/models`` that it takes that field (``image_input``);
anything else (vLLM, a text server) is refused before step 0, so no row is answered without its image.

A batch carries pixels, not files: the image of each row is found by its uid among the run's training examples
(every VLM example names its image file). The resume cache key hashes the image bytes with the token ids, so a
changed image is asked again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stillroom.data.batch import Batch, Example
from stillroom.teachers.http import RemoteError
from stillroom.teachers.remote import RemoteTeacher, RowExtra, remote_cache_path
from stillroom.teachers.remote_images import IMAGES_FIELD, image_digest, image_part
from stillroom.teachers.signal import Fingerprint

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

NO_IMAGE_INPUT = ("does not say it takes images with token-id prompts (no `image_input` in its /v1/models entry). "
                  "A VLM row must reach the teacher with its image: serve the LLaVA folder with `stillroom "
                  "serve-teacher FOLDER` (it reads the request field `images`, stillroom's extension), or write a "
                  "store with `stillroom cache-teacher` and use teacher.source: store. vLLM's completions endpoint "
                  "takes token ids but no images (docs/TEACHERS.md, 'Teachers that read images')")


def image_files(examples: Sequence[Example]) -> dict[str, str]:
    """``uid -> image file`` of the examples that have an image; one uid naming two files is an error."""
    out: dict[str, str] = {}
    for ex in examples:
        if ex.image is None:
            continue
        seen = out.setdefault(ex.uid, ex.image.path)
        if seen != ex.image.path:
            raise ValueError(f"example uid {ex.uid} names two images ({seen} and {ex.image.path}); a remote VLM "
                             "teacher finds a row's image by its uid: give each record its own uid")
    return out


class RemoteVlmTeacher(RemoteTeacher):
    """:class:`RemoteTeacher` whose rows also send their image (module docstring).

    ``images``: ``uid -> image file`` (:func:`image_files` of the run's examples); ``tokens_per_image``: the
    local VLM's image-token count, checked against the server's (None: not checked). Other arguments: the base
    class's.
    """

    def __init__(self, cfg, *, images: Mapping[str, str], tokens_per_image: int | None = None, **kw) -> None:
        super().__init__(cfg, **kw)
        self.images = dict(images)
        self.tokens_per_image = tokens_per_image

    def check_server(self) -> dict | None:
        """The server takes images (``image_input``: checked first, the reason a text server cannot serve here)
        and fills as many image tokens per image as the student's rows hold; then the base check (model served,
        same tokenizer)."""
        entry = self.client.check_server(None)
        spec = entry.get("image_input") if isinstance(entry, dict) else None
        if not isinstance(spec, dict) or spec.get("field") != IMAGES_FIELD:
            raise RemoteError(f"{self.client.shown_base}: the server {NO_IMAGE_INPUT}")
        theirs = spec.get("tokens_per_image")
        if self.tokens_per_image is not None and theirs != self.tokens_per_image:
            raise RemoteError(f"{self.client.shown_base}: the served VLM fills {theirs} image tokens per image but the "
                              f"student's rows hold {self.tokens_per_image}; serve the run's teacher folder (same "
                              "vision tower and image size)")
        if self.fingerprint is not None:
            entry = self.client.check_server(self.fingerprint.tokenizer_hash)
        self._checked = True
        return entry

    def row_extras(self, batch: Batch) -> list[RowExtra | None]:
        """Each row's image as an ``images`` part, its bytes' digest keying the cache (read from disk now)."""
        out: list[RowExtra | None] = []
        for b, uid in enumerate(batch.uids):
            path = self.images.get(uid)
            if path is None:
                if batch.pixel_values is None:
                    out.append(None)
                    continue
                raise ValueError(f"row {b} (uid {uid}) has pixels but no known image file; a remote VLM teacher "
                                 "sends the image files of the run's training examples (this batch was built "
                                 "elsewhere: use teacher.source online or store for it)")
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise ValueError(f"row {b} (uid {uid}): image file {path} cannot be read ({err}); it was there "
                                 "when the data was built: restore it") from None
            out.append(RowExtra(payload={IMAGES_FIELD: [image_part(data, f"image file {path}")], "max_tokens": 0},
                                digest=image_digest(data)))
        return out


def tokens_per_image(model) -> int | None:
    """The image-token count of the run's local VLM (what the student's rows hold per image), or None."""
    from stillroom.domains.vl.vlm_model import image_token_count, is_vlm

    return image_token_count(model.config) if is_vlm(model) else None


def check_vlm_member(model, path: str | None, examples: Sequence[Example], where: str) -> None:
    """An online member of a VLM run's ensemble other than the run's teacher must read images (a LLaVA-style
    model) and read the batch's pixels as they are: the same image size and mean/std as the run's examples."""
    from stillroom.teachers.remote_images import image_input

    folder = str(Path(path).expanduser()) if path is not None else None
    spec = image_input(model, folder)
    if spec is None:
        raise ValueError(f"{where}: {type(model).__name__} is a text model, but this is a VLM run: every member "
                         "must read the rows' images (a LLaVA folder, a store written by the VLM teacher, or a "
                         "remote VLM); remove the member or run it on text records")
    ref = next((ex.image for ex in examples if ex.image is not None), None)
    if ref is not None and (spec.size, spec.mean, spec.std) != (ref.size, tuple(ref.mean), tuple(ref.std)):
        raise ValueError(f"{where}: this VLM reads {spec.size}-pixel images normalised by mean {list(spec.mean)}, "
                         f"std {list(spec.std)}, but the run's pixels are made for the run's teacher ({ref.size} "
                         f"pixels, mean {list(ref.mean)}, std {list(ref.std)}); members of a VLM ensemble share the "
                         "teacher's image settings (preprocessor_config.json and vision image size)")


def remote_vlm_from_run(cfg: "RunConfig", *, vocab_size: int, fingerprint: Fingerprint | None,
                        examples: Sequence[Example], tokens_per_image: int | None = None) -> RemoteVlmTeacher:
    """The remote teacher of a VLM run (``teacher.source: remote`` with ``vlm``), checked before step 0: the
    settings and cache of :func:`stillroom.teachers.remote.remote_from_run`, the images of ``examples``."""
    from stillroom.teachers.remote import check_remote_temperature, checked_server, resume_hint

    check_remote_temperature(cfg)
    images = image_files(examples)
    if not images:
        raise ValueError("teacher.source=remote in a VLM run: the training examples carry no image; a VLM run's "
                         "records name an image each (vlm.image_field)")
    cache = remote_cache_path(cfg)
    teacher = RemoteVlmTeacher(cfg.teacher.remote, images=images, tokens_per_image=tokens_per_image,
                               vocab_size=vocab_size, fingerprint=fingerprint, cache=cache,
                               resume_hint=resume_hint(cache))
    return checked_server(teacher)
