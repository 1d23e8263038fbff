"""Masked-autoencoder pre-training as a player of the one loop: deterministic masks, the MAE loss, MAE folders.

A ``ViTMAEForPreTraining`` (transformers) encodes the visible patches of an image and its decoder
reconstructs the pixels of the masked ones. Its random mask comes from ``noise`` ``[B, N]`` (the patches
are kept in ``argsort(noise)`` order, the first ``(1 - mask_ratio) N`` of them visible): instead of HF's
internal ``torch.rand`` we draw ``noise`` per image from ``(seed, step, image uid)``
(:func:`mask_noise`), so a resumed run masks every image exactly as the uninterrupted one, and a teacher
given the same ``noise`` keeps the same patches (DMAE).

Images ``[B, C, H, W]`` in ``[0, 1]`` enter as ``pixel_values = (images - 0.5) / 0.5`` like the domain's
transformers classifiers (:class:`~.hf_models.HFClassifier`), so an encoder converted into a
``ViTForImageClassification`` (:mod:`.probe`) sees the same inputs.

:func:`mae_loss` is MAE's: per patch, the mean squared error over its pixels (against per-patch normalised
pixels with ``norm_pix_loss``), averaged over the masked patches. It returns ``(sum, count)`` with one
count per image, the per-image mean summed: with a fixed mask ratio every image has the same number of
masked patches, so ``sum / count`` is HF's batch mean exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.data.seeds import derive_seed
from stillroom.files import write_folder_atomic
from stillroom.domains.vision.hf_models import PIXEL_MEAN, PIXEL_STD, _quiet
from stillroom.losses import LossResult
from stillroom.train.clocked import ClockedObjective, StepClock

ENCODER_PREFIX = "vit."
"""Names of the encoder's weights in a ``ViTMAEForPreTraining`` (the decoder's start with ``decoder.``); a
``ViTForImageClassification`` names its encoder's weights the same."""


def to_pixel_values(images_bchw: torch.Tensor) -> torch.Tensor:
    """Images in ``[0, 1]`` -> the model's ``pixel_values`` in ``[-1, 1]`` (same shape)."""
    return (images_bchw - PIXEL_MEAN) / PIXEL_STD


def num_patches(model: nn.Module) -> int:
    """``N``: patches per image of a ViTMAE."""
    c = model.config
    return (c.image_size // c.patch_size) ** 2


def visible_count(model: nn.Module) -> int:
    """Patches per image the encoder keeps at the model's ``mask_ratio`` (HF's ``int(N * (1 - r))``)."""
    return int(num_patches(model) * (1 - model.config.mask_ratio))


def mask_noise(uids: list[str], seed: int, step: int, n_patches: int) -> torch.Tensor:
    """``[B, N]`` uniform noise, one generator per image seeded from ``(seed, step, uid)``: the same image at
    the same step always gets the same mask, whatever batch or process it lands in."""
    rows = [torch.rand(n_patches, generator=torch.Generator().manual_seed(derive_seed(seed, "mae-mask", step, uid)))
            for uid in uids]
    return torch.stack(rows)


def shift_images(images_bchw: torch.Tensor, uids: list[str], seed: int, step: int, shift: int) -> torch.Tensor:
    """Each image translated by up to ``shift`` pixels each way (zero-filled), the offsets drawn from ``(seed,
    step, uid)`` like the masks; ``shift = 0`` returns ``images_bchw`` itself."""
    if not shift:
        return images_bchw
    b, c, h, w = images_bchw.shape
    padded = F.pad(images_bchw, (shift, shift, shift, shift))
    out = []
    for i, uid in enumerate(uids):
        g = torch.Generator().manual_seed(derive_seed(seed, "mae-shift", step, uid))
        dy, dx = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,), generator=g))
        out.append(padded[i, :, dy:dy + h, dx:dx + w])
    return torch.stack(out)


def mae_loss(model: nn.Module, pixels_bchw: torch.Tensor, pred_bnp: torch.Tensor,
             mask_bn: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum over images of the mean masked-patch MSE, B)``: ``pred_bnp`` the decoder's patches ``[B, N, p*p*C]``,
    ``mask_bn`` 1 where a patch was masked; targets are ``model.patchify(pixels)``, normalised per patch
    (mean 0, variance 1 with ``var + 1e-6``) when ``model.config.norm_pix_loss``."""
    target = model.patchify(pixels_bchw)
    if model.config.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1.0e-6) ** 0.5
    per_patch_bn = ((pred_bnp.float() - target.float()) ** 2).mean(-1)
    per_image_b = (per_patch_bn * mask_bn).sum(-1) / mask_bn.sum(-1)
    return per_image_b.sum(), pred_bnp.shape[0]


@contextmanager
def unmasked(model: nn.Module) -> Iterator[None]:
    """The model's ``mask_ratio`` set to 0 for the forwards inside (every patch visible), then restored."""
    ratio = model.config.mask_ratio
    model.config.mask_ratio = 0.0
    try:
        yield
    finally:
        model.config.mask_ratio = ratio


def encode_unmasked(model: nn.Module, images_bchw: torch.Tensor) -> torch.Tensor:
    """The encoder's final-layernormed tokens ``[B, 1 + N, d]`` ([CLS] first, patches in image order) of the
    whole, unmasked images."""
    return encode_pixels_unmasked(model, to_pixel_values(images_bchw)).last_hidden_state


def encode_pixels_unmasked(model: nn.Module, pixels_bchw: torch.Tensor, **kwargs: Any) -> Any:
    """The encoder's output on unmasked ``pixel_values`` (``.last_hidden_state`` ``[B, 1 + N, d]``; ``kwargs``
    go to the encoder, e.g. ``output_hidden_states``): mask ratio 0 and the noise ``arange``, which keeps the
    patches in image order."""
    noise = unmasked_noise(model, len(pixels_bchw), pixels_bchw.device)
    with unmasked(model):
        return model.vit(pixel_values=pixels_bchw, noise=noise, **kwargs)


def unmasked_noise(model: nn.Module, batch: int, device: torch.device) -> torch.Tensor:
    """``[B, N]`` noise ``0, 1, .., N-1`` per image: with mask ratio 0 every patch is kept, in image order."""
    return torch.arange(num_patches(model), dtype=torch.float32, device=device).expand(batch, -1)


class MaeForward(nn.Module):
    """The player's forward: the batch's images (shifted when ``shift``) masked by :func:`mask_noise` at the
    clock's step; returns ``logits`` ``[B, N, p*p*C]``, ``mask`` ``[B, N]``, ``pixels`` ``[B, C, H, W]`` (the
    reconstruction target) and ``noise`` ``[B, N]`` (for a teacher that must keep the same patches); with
    ``hidden_states`` also ``hidden_states``: the encoder's embeddings then every block's output, each
    ``[B, 1 + V, d]`` on the visible tokens (block ``i`` at index ``i + 1``)."""

    def __init__(self, model: nn.Module, seed: int, shift: int = 0, hidden_states: bool = False):
        super().__init__()
        self.model = model
        self.seed = seed
        self.shift = shift
        self.hidden_states = hidden_states
        self.clock = StepClock()

    def inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel_values [B, C, H, W], noise [B, N])`` of ``batch`` at the clock's step (what a teacher sees)."""
        step = int(self.clock.step)
        pixels = to_pixel_values(shift_images(batch.inputs, batch.uids, self.seed, step, self.shift))
        return pixels, mask_noise(batch.uids, self.seed, step, num_patches(self.model)).to(pixels.device)

    def forward(self, batch: Any) -> dict[str, Any]:
        pixels, noise = self.inputs(batch)
        out = self.model(pixel_values=pixels, noise=noise, output_hidden_states=self.hidden_states)
        extra = {"hidden_states": out.hidden_states} if self.hidden_states else {}
        return {"logits": out.logits, "mask": out.mask, "pixels": pixels, "noise": noise, **extra}


@dataclass
class MaeObjective(ClockedObjective):
    """MAE loss alone (plain pre-training; the baseline of ``dmae`` / ``self_distill_fpt``). ``extra``: more
    objective state (projectors, ...) a method adds; the clock always comes along."""

    forward: MaeForward

    def mae_part(self, outputs: dict) -> tuple[torch.Tensor, int]:
        return mae_loss(self.forward.model, outputs["pixels"], outputs["logits"], outputs["mask"])

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        total, count = self.mae_part(outputs)
        return LossResult(total=total, count=count, parts={"mae": float(total.detach())})


@torch.no_grad()
def heldout_mae_loss(model: nn.Module, examples: list, seed: int, batch_size: int) -> float:
    """Mean MAE loss per held-out image under masks fixed by ``(seed, "eval", uid)`` (eval mode, no shift)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        pixels = to_pixel_values(torch.stack([e.image for e in chunk]).to(device))
        noise = mask_noise([e.uid for e in chunk], seed, -1, num_patches(model)).to(device)
        out = model(pixel_values=pixels, noise=noise)
        s, n = mae_loss(model, pixels, out.logits, out.mask)
        total, count = total + float(s), count + n
    model.train(was)
    return total / max(count, 1)


def save_mae(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` (``config.json`` + ``model.safetensors``) into ``folder``, written beside it and renamed
    into place."""
    def write(tmp: Path) -> None:
        with _quiet():
            model.save_pretrained(tmp, safe_serialization=True)

    write_folder_atomic(folder, write)


def load_mae(folder: Path | str, where: str) -> nn.Module:
    """The ``ViTMAEForPreTraining`` in ``folder`` (float32, CPU, train mode); ``where`` (the config key) names the
    folder in the error when it holds something else."""
    from transformers import ViTMAEForPreTraining

    folder = Path(folder).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{where}={folder}: no config.json there; point it at a ViTMAEForPreTraining folder "
                                "(e.g. a `domain: mae` run's student/)")
    import json

    kind = json.loads(config.read_text()).get("model_type")
    if kind != "vit_mae":
        raise ValueError(f"{where}={folder}: config.json says model_type {kind!r}, not 'vit_mae'; give an MAE folder")
    with _quiet():
        return ViTMAEForPreTraining.from_pretrained(str(folder), dtype=torch.float32).train()
