"""LELP's construction (Loo et al. 2024): pseudo-subclasses from linear projections of a teacher's embedding.

Done once with the frozen teacher on the training images (spec: llm-methods.md section 11). With ``e(x)``
``[d]`` the input of the teacher's head and ``W`` ``[C, d]`` its weight (logits ``z_T = W e + b``):

1. null space: ``e⊥ = (I - W⁺W) e``, so ``W e⊥ = 0``: the subclass directions carry nothing the teacher's
   logits (ordinary KD) already transmit;
2. per class ``c`` (its training images by label or by the teacher's prediction): centre ``e⊥`` at
   ``mean_c`` and take the top-``S`` principal directions ``U_c`` ``[d, S]``;
3. ``U_c <- U_c R_c`` with a seeded random orthogonal ``R_c`` ``[S, S]``, spreading the variance evenly;
4. coordinates ``u_{c,s}(x) = <e⊥(x) - mean_c, U_c[:, s]>``, optionally divided by their standard deviation
   over the class's images;
5. ``p_T(c, s|x) = p_T(c|x) softmax_s(u_{c,s}(x) / beta)``: summing over ``s`` gives ``p_T(c|x)`` exactly.

Outputs are laid out class-major: output ``c*S + s`` is subclass ``s`` of class ``c``, so a class's
log-probability is the logsumexp of its ``S`` consecutive outputs (:func:`class_logits`). The basis
(``P``, means, directions, scales) is computed in float64 and cached as safetensors (written to a
temporary file, then renamed) under ``<cache_dir>/lelp/<key>.safetensors``, ``key`` hashing the teacher's
weights, the training images and the settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

VERSION = 1
"""Bumped when the construction changes (part of the cache key)."""


def head_of(model: nn.Module) -> nn.Linear:
    """The classifier's output head: its last ``nn.Linear`` with ``num_classes`` outputs."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == model.num_classes]
    if not heads:
        raise ValueError(f"method=lelp needs a teacher whose head is a Linear layer with {model.num_classes} "
                         f"outputs; {type(model).__name__} has none")
    return heads[-1]


@contextmanager
def capture_embedding(model: nn.Module):
    """Within the block, every forward of ``model`` stores its head's input ``[B, d]`` in ``box["e"]``."""
    box: dict[str, torch.Tensor] = {}
    handle = head_of(model).register_forward_pre_hook(lambda _m, inputs: box.__setitem__("e", inputs[0]))
    try:
        yield box
    finally:
        handle.remove()


@torch.no_grad()
def embeddings_and_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e [N, d], logits [N, C])`` fp32 on the CPU of ``images`` ``[N, C_in, H, W]`` (eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    embs, logits = [], []
    with capture_embedding(model) as box:
        for i in range(0, len(images), batch_size):
            logits.append(model(images[i : i + batch_size].to(device)).float().cpu())
            embs.append(box["e"].float().cpu())
    model.train(was_training)
    return torch.cat(embs), torch.cat(logits)


def null_space_projector(weight_cd: torch.Tensor) -> torch.Tensor:
    """``P = I - W⁺W`` ``[d, d]`` float64: the orthogonal projector onto the null space of ``W`` ``[C, d]``."""
    w = weight_cd.double()
    return torch.eye(w.shape[1], dtype=torch.float64) - torch.linalg.pinv(w) @ w


def random_rotation(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal ``[size, size]`` float64 (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def principal_directions(points_nd: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean [d], top-count directions [d, count], their variances [count])`` of ``points_nd`` (float64)."""
    mean = points_nd.mean(0)
    _, sing, vh = torch.linalg.svd(points_nd - mean, full_matrices=False)
    return mean, vh[:count].T, sing[:count] ** 2 / max(len(points_nd) - 1, 1)


@dataclass
class SubclassBasis:
    """The cached construction: ``projector_dd`` (P), ``means_cd``, rotated ``directions_cds``, ``scales_cs``
    (coordinate standard deviations over each class's images), ``variances_cs`` (PCA variances before the
    rotation, for the report). ``beta`` and ``standardize`` apply when :meth:`log_probs` is called."""

    projector_dd: torch.Tensor
    means_cd: torch.Tensor
    directions_cds: torch.Tensor
    scales_cs: torch.Tensor
    variances_cs: torch.Tensor

    @property
    def subclasses(self) -> int:
        return self.directions_cds.shape[-1]

    def coordinates(self, emb_bd: torch.Tensor, standardize: bool) -> torch.Tensor:
        """``u`` ``[B, C, S]``: every image's coordinates along every class's directions (step 4)."""
        dtype = emb_bd.dtype
        perp_bd = emb_bd @ self.projector_dd.to(dtype)  # P is symmetric
        dirs = self.directions_cds.to(dtype)
        u_bcs = torch.einsum("bd,cds->bcs", perp_bd, dirs) - torch.einsum("cd,cds->cs", self.means_cd.to(dtype), dirs)
        return u_bcs / self.scales_cs.to(dtype) if standardize else u_bcs

    def log_probs(self, emb_bd: torch.Tensor, logits_bc: torch.Tensor, *, beta: float,
                  standardize: bool) -> torch.Tensor:
        """``log p_T(c, s|x)`` ``[B, C*S]`` (class-major) from embeddings ``[B, d]`` and teacher logits ``[B, C]``."""
        u_bcs = self.coordinates(emb_bd, standardize)
        logp_bcs = F.log_softmax(logits_bc.to(u_bcs.dtype), -1)[:, :, None] + F.log_softmax(u_bcs / beta, -1)
        return logp_bcs.flatten(1)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "SubclassBasis":
        return SubclassBasis(*(t.to(device, dtype) for t in self.tensors().values()))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"projector_dd": self.projector_dd, "means_cd": self.means_cd, "directions_cds": self.directions_cds,
                "scales_cs": self.scales_cs, "variances_cs": self.variances_cs}


def build_basis(emb_nd: torch.Tensor, members_n: torch.Tensor, weight_cd: torch.Tensor, subclasses: int,
                seed: int) -> SubclassBasis:
    """The construction (steps 1-4) from the training images' embeddings ``[N, d]``, each image's class for
    the PCA ``members_n`` ``[N]`` and the head's weight ``[C, d]``; rotations drawn from ``seed``."""
    num_classes, d = weight_cd.shape
    if subclasses > d:
        raise ValueError(f"lelp.subclasses={subclasses} exceeds the teacher's embedding width {d}: lower it")
    projector = null_space_projector(weight_cd)
    perp_nd = emb_nd.double() @ projector
    generator = torch.Generator().manual_seed(seed)
    means, dirs, scales, variances = [], [], [], []
    for c in range(num_classes):
        points = perp_nd[members_n == c]
        if len(points) <= subclasses:
            raise ValueError(f"method=lelp: class {c} has {len(points)} training images for its PCA, fewer than "
                             f"lelp.subclasses+1={subclasses + 1}: lower lelp.subclasses or use more images")
        mean, u_ds, var = principal_directions(points, subclasses)
        u_ds = u_ds @ random_rotation(subclasses, generator)
        means.append(mean), dirs.append(u_ds), variances.append(var)
        scales.append(((points - mean) @ u_ds).std(0).clamp_min(1e-12))
    return SubclassBasis(projector, torch.stack(means), torch.stack(dirs), torch.stack(scales), torch.stack(variances))


def class_logits(logits_bk: torch.Tensor, per_class: int) -> torch.Tensor:
    """Class logits ``[B, C]`` of grouped outputs ``[B, C*S]``: the logsumexp of each class's ``S`` outputs, so
    ``softmax`` of them is ``p(c|x) = sum_s p(c, s|x)``."""
    return logits_bk.unflatten(-1, (-1, per_class)).logsumexp(-1)


class GroupedOutputs(nn.Module):
    """A classifier with ``S`` outputs per class seen as a ``C``-class one: images -> class logits ``[B, C]``
    (:func:`class_logits`); ``inner`` keeps the raw ``[B, C*S]`` model (its weights, its ``state_dict``)."""

    def __init__(self, inner: nn.Module, per_class: int):
        super().__init__()
        self.inner, self.per_class = inner, per_class
        self.arch, self.in_shape = getattr(inner, "arch", None), getattr(inner, "in_shape", None)
        self.num_classes = inner.num_classes // per_class

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return class_logits(self.inner(images), self.per_class)

    def describe(self) -> str:
        return f"{self.inner.describe()}, {self.per_class} subclass outputs per class"


def basis_key(teacher: nn.Module, train_uids: list[str], data_fingerprint: str, settings: dict) -> str:
    """16 hex digits of the SHA-256 of the teacher's weights, the training images and the settings."""
    h = hashlib.sha256(json.dumps({"version": VERSION, **settings}, sort_keys=True).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    h.update(data_fingerprint.encode())
    h.update("\n".join(train_uids).encode())
    return h.hexdigest()[:16]


def save_basis(basis: SubclassBasis, path: Path, metadata: dict) -> None:
    """``basis`` as safetensors at ``path``, written to a temporary file and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({k: v.contiguous() for k, v in basis.tensors().items()}, str(tmp),
              metadata={"format": f"stillroom-lelp/{VERSION}", "settings": json.dumps(metadata)})
    os.replace(tmp, path)


def load_basis(path: Path) -> SubclassBasis:
    """A basis :func:`save_basis` wrote (float64, CPU); a clear error for an unreadable file."""
    try:
        t = load_file(str(path))
        return SubclassBasis(t["projector_dd"], t["means_cd"], t["directions_cds"], t["scales_cs"], t["variances_cs"])
    except Exception as exc:  # noqa: BLE001 - any damage means the same fix
        raise ValueError(f"{path} is not a readable LELP basis ({exc}): delete it to build it again") from None


def grouped_outputs_note(per_class: int) -> list[str]:
    """The report's note on a student with grouped outputs (none with one output per class)."""
    if per_class == 1:
        return []
    return [f"student: {per_class} outputs per class (pseudo-subclasses, class-major); its class log-probabilities "
            "are the logsumexp of each class's outputs, for every metric of the report; the saved config.json "
            "records `outputs_per_class`"]


def load_grouped(folder: Path) -> nn.Module:
    """A saved classifier; wrapped in :class:`GroupedOutputs` when its ``config.json`` records
    ``outputs_per_class`` > 1 (a LELP student), so it evaluates as the ``C``-class model it was trained as."""
    from stillroom.domains.vision.models import load_classifier, read_config

    model = load_classifier(folder)
    config = read_config(folder)
    per_class = int((config.get("stillroom") or config).get("outputs_per_class", config.get("outputs_per_class", 1)))
    return GroupedOutputs(model, per_class) if per_class > 1 else model
