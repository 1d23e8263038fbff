"""OGEN's parts on features (spec 6.2): the prompt head, the unknown-feature generator, the local mean teacher.

All work on L2-normalised CLIP features of width ``D``: class text features ``e`` ``[C, D]`` (prompt-template
averaged, :func:`stillroom.domains.vl.zero_shot.class_weights`) and image features ``v`` ``[B, D]``.

* :class:`PromptHead`: ``w_c = n(e_c + A e_c)`` with one shared ``A`` ``[D, D]`` (init 0: the head starts as
  the zero-shot classifier), optionally ``v' = n(v + B v)`` on the image side; logits ``s * v' . w_c``.
* :class:`FeatureGenerator`: a 1-head attention block. For an unknown class ``u`` with its ``k`` nearest known
  classes ``n_j`` (text cosine) and one real image feature ``v_j`` of each, ``a = softmax_j((Q e_u).(K e_{n_j})
  / sqrt(D))`` and ``v_u = n( sum_j a_j (v_j + S (e_u - e_{n_j})) )``: the neighbours' images, moved by a learned
  map of the text difference ("extrapolation" from kNN examples). Trained leave-one-class-out on the known
  classes (:func:`train_generator`: each known class in turn plays the unknown one and its real features are
  the targets, loss ``1 - cos``), then frozen.
* :class:`LocalMeanTeacher`: snapshots of a flat parameter vector, one per epoch; the teacher is the mean of
  the last ``w(e) = max(1, floor(e * ratio))`` (the window grows as training goes on). Snapshots are buffers,
  so a checkpoint holds them and a resume continues exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PromptHead(nn.Module):
    """The trained part of OGEN (module docstring); ``text_cd`` frozen class features of every class."""

    def __init__(self, text_cd: torch.Tensor, scale: float, image_adapter: bool):
        super().__init__()
        d = text_cd.shape[1]
        self.register_buffer("text_cd", text_cd.float().clone())
        self.scale = float(scale)
        self.residual = nn.Parameter(torch.zeros(d, d))
        self.adapter = nn.Parameter(torch.zeros(d, d)) if image_adapter else None

    def class_weights(self, text_cd: torch.Tensor | None = None, params: torch.Tensor | None = None) -> torch.Tensor:
        """``[C, D]`` ``n(e + e A^T)`` of ``text_cd`` (default: every class); ``params``: a flat vector instead of
        the head's own (the mean teacher's)."""
        e = self.text_cd if text_cd is None else text_cd
        a = self.residual if params is None else self.unflatten(params)[0]
        return F.normalize(e + e @ a.T, dim=-1)

    def image(self, image_bd: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        b = self.adapter if params is None else self.unflatten(params)[1]
        return image_bd if b is None else F.normalize(image_bd + image_bd @ b.T, dim=-1)

    def logits(self, image_bd: torch.Tensor, text_cd: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C]`` ``scale * v' . w_c``."""
        return self.scale * self.image(image_bd, params) @ self.class_weights(text_cd, params).T

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.parameters()])

    def unflatten(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = self.residual.shape[0]
        a = params[: d * d].view(d, d)
        return a, (params[d * d:].view(d, d) if self.adapter is not None else None)


def nearest(text_cd: torch.Tensor, query_qd: torch.Tensor, k: int,
            exclude_q: torch.Tensor | None = None) -> torch.Tensor:
    """``[Q, k]`` indices of the ``k`` rows of ``text_cd`` nearest (cosine) to each query; ``exclude_q``: a row
    index per query that may not be chosen (leave-one-out), or -1."""
    sim_qc = query_qd @ text_cd.T
    if exclude_q is not None:
        sim_qc = sim_qc.masked_fill(F.one_hot(exclude_q.clamp(min=0), text_cd.shape[0]).bool()
                                    & (exclude_q[:, None] >= 0), float("-inf"))
    return sim_qc.topk(min(k, text_cd.shape[0] - (exclude_q is not None)), dim=1).indices


class FeatureGenerator(nn.Module):
    """The class-conditional unknown-feature generator (module docstring)."""

    def __init__(self, d: int):
        super().__init__()
        self.query, self.key = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.shift = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.shift.weight)

    def forward(self, unknown_qd: torch.Tensor, neighbour_text_qkd: torch.Tensor,
                neighbour_image_qkd: torch.Tensor) -> torch.Tensor:
        """``[Q, D]`` synthesised normalised image features of ``Q`` unknown classes from their ``k`` neighbours."""
        d = unknown_qd.shape[-1]
        att_qk = (self.query(unknown_qd)[:, None, :] * self.key(neighbour_text_qkd)).sum(-1) / math.sqrt(d)
        moved_qkd = neighbour_image_qkd + self.shift(unknown_qd[:, None, :] - neighbour_text_qkd)
        return F.normalize((att_qk.softmax(-1)[..., None] * moved_qkd).sum(1), dim=-1)


def sample_neighbours(known_text_kd: torch.Tensor, bank: list[torch.Tensor], unknown_qd: torch.Tensor, k: int,
                      gen: torch.Generator, exclude_q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(neighbour text [Q, k, D], one random real image feature of each neighbour [Q, k, D])``; ``bank[c]``:
    the real features ``[N_c, D]`` of known class ``c``."""
    idx_qk = nearest(known_text_kd, unknown_qd, k, exclude_q)
    images = torch.stack([torch.stack([bank[c][torch.randint(len(bank[c]), (1,), generator=gen).item()]
                                       for c in row]) for row in idx_qk.tolist()])
    return known_text_kd[idx_qk], images


def train_generator(known_text_kd: torch.Tensor, bank: list[torch.Tensor], k: int, steps: int, lr: float,
                    seed: int) -> tuple[FeatureGenerator, list[float]]:
    """Leave-one-class-out training (module docstring); returns the frozen generator and its loss per step."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureGenerator(known_text_kd.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    classes = torch.arange(len(bank))
    losses = []
    for _ in range(steps):
        held_q = classes[torch.randperm(len(bank), generator=gen)]
        text_qkd, image_qkd = sample_neighbours(known_text_kd, bank, known_text_kd[held_q], k, gen, exclude_q=held_q)
        targets_qd = torch.stack([bank[c][torch.randint(len(bank[c]), (1,), generator=gen).item()]
                                  for c in held_q.tolist()])
        loss = (1 - (model(known_text_kd[held_q], text_qkd, image_qkd) * targets_qd).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.requires_grad_(False).eval(), losses


class LocalMeanTeacher(nn.Module):
    """Epoch snapshots of a flat parameter vector and their local mean (module docstring)."""

    def __init__(self, initial: torch.Tensor, capacity: int, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.register_buffer("snapshots", initial.detach().float()[None].repeat(capacity, 1))
        self.register_buffer("count", torch.ones((), dtype=torch.long))  # the initial parameters are snapshot 0

    def window(self, epoch: int) -> int:
        return max(1, math.floor(epoch * self.ratio))

    def push(self, params: torch.Tensor) -> None:
        self.snapshots.copy_(torch.roll(self.snapshots, -1, 0))
        self.snapshots[-1] = params.detach().float()
        self.count += 1

    def mean(self, epoch: int) -> torch.Tensor:
        """The mean of the last ``min(w(epoch), snapshots so far, capacity)`` snapshots."""
        n = min(self.window(epoch), int(self.count), self.snapshots.shape[0])
        return self.snapshots[-n:].mean(0)
