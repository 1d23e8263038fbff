"""Images over the remote-teacher protocol: how a VLM row's image travels with its token ids, on both sides.

The request (``POST /v1/completions``, stillroom's extension of vLLM's token-id prompts)::

    {"prompt": [ids ...], "prompt_logprobs": k, "max_tokens": 0,
     "images": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}

Each entry of ``images`` is an OpenAI chat ``image_url`` content part (the shape vLLM's chat endpoint documents)
holding the image file's bytes as a base64 ``data:`` URL; image ``i`` fills the ``i``-th run of image
placeholder ids in ``prompt``. A run is either already expanded to the model's ``N`` image tokens (what the
student's rows hold: ``[BOS] <image>*N prompt ...``, so the answer's ``prompt_logprobs`` align 1:1 with the
student's positions) or a single placeholder, which the server expands to ``N`` (as a LLaVA processor does;
the answer then covers the expanded prompt). A server that takes this field says so in its ``/v1/models``
entry (``image_input``, :func:`listing`); the client refuses a server that does not (vLLM's completions
endpoint takes token ids but no images, and would ignore the field).

The server turns the bytes into pixels exactly as the online teacher reads the image file
(:func:`pixels_from_bytes` = :func:`stillroom.data.images.load_pixels` on the same bytes), so a remote VLM
teacher at ``top_k = V`` gives the online teacher's distribution.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from typing import Any

import torch

IMAGES_FIELD = "images"
"""The request field carrying a row's images (stillroom's extension; see the module docstring)."""
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}


class ImageRequestError(ValueError):
    """An ``images`` entry that cannot be used; the message names the request field and the fix."""


def image_digest(data: bytes) -> str:
    """SHA-256 of an image's bytes (keys the remote cache: a changed image is asked again)."""
    return hashlib.sha256(data).hexdigest()


def image_part(data: bytes, where: str = "image") -> dict:
    """The OpenAI ``image_url`` content part of an image file's bytes (a base64 ``data:`` URL of its own format).

    ``where`` names the file in the error for bytes PIL cannot read as an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "PNG"
    except (UnidentifiedImageError, OSError) as err:
        raise ImageRequestError(f"{where} cannot be read as an image ({type(err).__name__}: {err}); replace it "
                                "with a PNG or JPEG") from None
    mime = MIME.get(fmt, f"image/{fmt.lower()}")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"}}


def part_bytes(part: Any, where: str) -> bytes:
    """The image bytes of one ``images`` entry (``where``: its field, e.g. ``images[0]``, named in errors).

    Accepts ``{"type": "image_url", "image_url": {"url": "data:...;base64,..."}}`` or a bare ``data:`` URL string;
    http(s) URLs are refused (the server reads no network: send the bytes)."""
    url = part
    if isinstance(part, dict):
        if part.get("type", "image_url") != "image_url":
            raise ImageRequestError(f"{where}.type is {part.get('type')!r}; only 'image_url' parts are read")
        inner = part.get("image_url")
        url = inner.get("url") if isinstance(inner, dict) else inner
    if not isinstance(url, str):
        raise ImageRequestError(f"{where}.image_url.url is missing; send a data:image/...;base64,... URL")
    if not url.startswith("data:"):
        raise ImageRequestError(f"{where}.image_url.url starts with {url[:16]!r}: this server reads images sent "
                                "inline only; send the file's bytes as data:image/png;base64,...")
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        raise ImageRequestError(f"{where}.image_url.url is a data URL without ';base64': send base64 bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageRequestError(f"{where}.image_url.url holds invalid base64 ({err})") from None


@dataclass(frozen=True)
class ImageInput:
    """How a served VLM reads images: ``size`` pixels square, ``(x - mean) / std`` per channel, and its prompt
    placeholders (``image_token_id`` repeated ``tokens_per_image`` times per image)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_token_id: int
    tokens_per_image: int

    def listing(self) -> dict:
        """The ``image_input`` entry of ``/v1/models``: what a client checks before sending images."""
        return {"field": IMAGES_FIELD, "image_token_id": self.image_token_id,
                "tokens_per_image": self.tokens_per_image, "image_size": self.size}


def image_input(model: torch.nn.Module, folder: str | None) -> ImageInput | None:
    """The :class:`ImageInput` of a LLaVA-style ``model`` (its folder's ``preprocessor_config.json`` mean/std, as
    the online teacher reads them; CLIP's without a folder), or None for a text model."""
    from stillroom.domains.vl.vlm_model import image_ref, image_token_count, is_vlm

    if not is_vlm(model):
        return None
    ref = image_ref(model, "", folder)
    return ImageInput(size=ref.size, mean=tuple(ref.mean), std=tuple(ref.std),
                      image_token_id=int(model.config.image_token_index),
                      tokens_per_image=image_token_count(model.config))


def pixels_from_bytes(data: bytes, spec: ImageInput, where: str) -> torch.Tensor:
    """``[3, size, size]`` float32 pixels of an image's bytes, computed as :func:`stillroom.data.images.load_pixels`
    computes them from the file (RGB, bicubic resize when the size differs, then ``(x / 255 - mean) / std``)."""
    from PIL import Image, UnidentifiedImageError

    from stillroom.data.images import normalised_pixels

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return normalised_pixels(img, spec.size, spec.mean, spec.std)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageRequestError(f"{where}: the bytes are not an image PIL can read ({type(err).__name__}: {err}); "
                                "send a PNG or JPEG") from None


def image_runs(ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """``[(start, length)]`` of the runs of ``image_token_id`` in ``ids``, in order."""
    runs: list[tuple[int, int]] = []
    for t, tok in enumerate(ids):
        if tok != image_token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == t:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((t, 1))
    return runs


def expand_placeholders(ids: list[int], spec: ImageInput, n_images: int) -> list[int]:
    """``ids`` with every run of image placeholders at the model's ``tokens_per_image`` (a single placeholder is
    expanded, as a LLaVA processor does; a full run is kept). The runs must number ``n_images`` (the ``images``
    sent) and each be 1 or ``tokens_per_image`` long; otherwise :class:`ImageRequestError` naming the field."""
    runs = image_runs(ids, spec.image_token_id)
    n = spec.tokens_per_image
    if len(runs) != n_images:
        raise ImageRequestError(f"`prompt` holds {len(runs)} run(s) of the image token {spec.image_token_id} but "
                                f"`{IMAGES_FIELD}` has {n_images} image(s); send one image per run of placeholders")
    bad = [length for _, length in runs if length not in (1, n)]
    if bad:
        raise ImageRequestError(f"`prompt` holds a run of {bad[0]} image tokens; this model fills {n} per image: "
                                f"send {n} (the expanded prompt) or 1 (expanded here)")
    out: list[int] = []
    at = 0
    for start, length in runs:
        out += ids[at:start] + [spec.image_token_id] * n
        at = start + length
    return out + ids[at:]


def request_pixels(spec: ImageInput | None, model_name: str, images: list | None, prompts: list[list[int]],
                   max_tokens: int) -> tuple[list[list[int]], torch.Tensor | None]:
    """``(prompts, pixels [n_images, 3, S, S] or None)`` of a completions request (server side).

    A text model (``spec`` None) refuses ``images``; a VLM refuses placeholder ids without ``images``, several
    prompts with images, and generation with images (``max_tokens`` must be 0: only prompt log-probs read them).
    Errors are :class:`ImageRequestError` naming the request field.
    """
    if spec is None:
        if images:
            raise ImageRequestError(f"`{IMAGES_FIELD}` was sent, but {model_name!r} is a text model that reads no "
                                    "images; send token ids alone, or serve a LLaVA folder (stillroom serve-teacher "
                                    "FOLDER) for a VLM teacher")
        return prompts, None
    if not images:
        for ids in prompts:
            if spec.image_token_id in ids:
                raise ImageRequestError(f"`prompt` holds image tokens (id {spec.image_token_id}) but the request has "
                                        f"no `{IMAGES_FIELD}`; send the row's image as an image_url part")
        return prompts, None
    if len(prompts) != 1:
        raise ImageRequestError(f"`{IMAGES_FIELD}` goes with one token-id prompt; this request has {len(prompts)}: "
                                "send one request per row")
    if max_tokens != 0:
        raise ImageRequestError(f"`{IMAGES_FIELD}` is read for prompt log-probabilities only: send max_tokens: 0 "
                                "(this server does not generate from images)")
    pixels = [pixels_from_bytes(part_bytes(p, f"{IMAGES_FIELD}[{i}]"), spec, f"{IMAGES_FIELD}[{i}]")
              for i, p in enumerate(images)]
    return [expand_placeholders(prompts[0], spec, len(images))], torch.stack(pixels)
