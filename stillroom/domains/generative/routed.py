"""The ``routed`` denoiser kind: K member denoisers, each owning a group of classes (MSD, spec 11).

Multi-student distillation trains one student per group ``C_k`` of a partition of the classes; at inference
a router sends a condition ``c`` to its student ``k(c)`` and only that student runs. :class:`RoutedDenoiser`
is that router as one :class:`~.denoiser.Denoiser`, so every method that trains a denoiser (``sft``, ``tsm``,
``dmd``) trains K students at once without a loop of its own:

* ``forward(x_t, t_b, labels_b)`` sends each sample to the member owning its label (``index_select`` in,
  ``index_copy`` out): a batch may mix classes, each member sees only its own samples, and a member's
  gradients come only from them. What one sample costs is one member (:meth:`describe`).
* Members keep the global class ids (``num_classes`` rows + null in their own class tables), so a member
  folder is an ordinary denoiser that can be loaded and sampled alone for its group's classes.
* The null label (classifier-free guidance's unconditional model, condition dropout in training) belongs
  to no group: the routed model's unconditional prediction is the mean of every member's null-label
  prediction (an ensemble of the members' unconditional heads), so null-label samples run through all K
  members and their gradients reach all of them. Guided sampling of a routed model therefore costs
  ``K + 1`` member evaluations per step; one-step students sample unguided (one member).
* A label outside ``[0, num_classes]`` is refused with :class:`UnknownConditionError`; a partition that
  misses or repeats a class, or members that disagree on convention, classes or sample shape, are refused
  when the model is built (:func:`check_partition`).

Folder: ``denoiser.json`` (kind ``routed``, the partition and each member's kind and architecture) and
``members/<k>/`` with each member's own ``denoiser.json`` and weights (written by :meth:`save_weights`
inside the temporary folder :func:`~.models.save_denoiser` renames into place).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stillroom.config.generative import check_partition
from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.denoiser import Denoiser

MEMBERS_DIR = "members"
MEMBER_FILE = "denoiser.json"


class UnknownConditionError(ValueError):
    """A label the router of a :class:`RoutedDenoiser` does not know (in no group, and not the null label)."""


class RoutedDenoiser(Denoiser):
    """K member denoisers and the partition of the classes they own (see the module docstring)."""

    kind = "routed"
    member_kinds: dict[str, Any] = {}
    """Member classes by kind: :func:`with_routed` points it at the registry of :mod:`.models` (which imports
    this module, so this module cannot import it)."""

    def __init__(self, members: list[Denoiser], groups: list[list[int]]):
        super().__init__()
        if len(members) != len(groups):
            raise ValueError(f"routed denoiser: {len(members)} members for {len(groups)} groups; give one per group")
        if any(isinstance(m, RoutedDenoiser) for m in members):
            raise ValueError("routed denoiser: a member is itself routed; give plain denoisers as members")
        first = members[0]
        for k, m in enumerate(members):
            if (m.convention, m.num_classes, tuple(m.sample_shape())) != (
                    first.convention, first.num_classes, tuple(first.sample_shape())):
                raise ValueError(f"routed denoiser: member {k} ({m.describe()}) differs from member 0 "
                                 f"({first.describe()}) in convention, classes or sample shape")
        check_partition(groups, first.num_classes, "routed denoiser")
        self.members = nn.ModuleList(members)
        self.groups = [list(map(int, g)) for g in groups]
        self.convention: Convention = first.convention
        self.num_classes = first.num_classes
        route = torch.empty(first.num_classes, dtype=torch.long)
        for k, group in enumerate(self.groups):
            route[group] = k
        self.register_buffer("route_table", route, persistent=False)

    def route(self, labels_b: torch.Tensor) -> torch.Tensor:
        """``[B]`` member index of each label; ``-1`` for the null label (every member)."""
        bad = (labels_b < 0) | (labels_b > self.num_classes)
        if bool(bad.any()):
            unknown = sorted(set(labels_b[bad].tolist()))
            raise UnknownConditionError(f"routed denoiser: labels {unknown} are in no group of {self.groups} and "
                                        f"are not the null label {self.null_label}; the router knows classes "
                                        f"0 .. {self.num_classes - 1}")
        member_b = self.route_table[labels_b.clamp_max(self.num_classes - 1)]
        return torch.where(labels_b == self.num_classes, torch.full_like(labels_b, -1), member_b)

    def forward(self, x_t: torch.Tensor, t_b: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
        """``x0_hat`` (``x_t``'s shape) with each sample predicted by the member its label routes to."""
        route_b = self.route(labels_b)
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        idle = []
        for k, member in enumerate(self.members):
            idx = (route_b == k).nonzero().squeeze(1)
            if idx.numel():
                pieces.append((idx, member(x_t.index_select(0, idx), t_b.index_select(0, idx),
                                           labels_b.index_select(0, idx))))
            else:
                idle.append(member)
        idx = (route_b == -1).nonzero().squeeze(1)
        if idx.numel():
            x, t, labels = x_t.index_select(0, idx), t_b.index_select(0, idx), labels_b.index_select(0, idx)
            pieces.append((idx, torch.stack([m(x, t, labels) for m in self.members]).mean(dim=0)))
            idle = []
        if not pieces:  # an empty batch
            return x_t.clone()
        out = x_t.new_zeros(x_t.shape, dtype=pieces[0][1].dtype)
        for idx, y in pieces:
            out = out.index_copy(0, idx, y)
        if idle and torch.is_grad_enabled():  # a member without a sample in this process's batch joins the graph
            out = out + 0.0 * sum(p.sum() for m in idle for p in m.parameters())  # with a zero (DDP reduces it)
        return out

    def member_params(self) -> list[int]:
        """Parameters of each member (one sample runs one of them)."""
        return [sum(p.numel() for p in m.parameters()) for m in self.members]

    def describe(self) -> str:
        params = self.member_params()
        per = ", ".join(f"{g} -> {m.kind} {n:,}" for g, m, n in zip(self.groups, self.members, params))
        return (f"routed denoiser of {len(self.members)} members ({per} params; one sample runs one member, "
                f"at most {max(params):,} params), {self.num_classes} classes, {self.convention.describe()}")

    def arch_json(self) -> dict:
        return {"groups": self.groups, "members": [{"kind": m.kind, "arch": m.arch_json()} for m in self.members]}

    def sample_shape(self) -> tuple[int, ...]:
        return self.members[0].sample_shape()

    @classmethod
    def from_json(cls, arch: dict, num_classes: int, convention: Convention) -> "RoutedDenoiser":
        members = []
        for k, spec in enumerate(arch["members"]):
            if spec.get("kind") not in cls.member_kinds or spec["kind"] == cls.kind:
                raise ValueError(f"routed denoiser: member {k} has kind {spec.get('kind')!r}; a member is one of "
                                 f"{', '.join(n for n in cls.member_kinds if n != cls.kind)}")
            members.append(cls.member_kinds[spec["kind"]].from_json(spec["arch"], num_classes, convention))
        return cls(members, arch["groups"])

    def save_weights(self, folder: Path) -> None:
        """Each member as a denoiser folder ``members/<k>/`` of ``folder`` (which is being written atomically)."""
        for k, (member, group) in enumerate(zip(self.members, self.groups)):
            sub = Path(folder) / MEMBERS_DIR / str(k)
            sub.mkdir(parents=True, exist_ok=True)
            member.save_weights(sub)
            info = {"kind": member.kind, "convention": member.convention.to_json(), "num_classes": self.num_classes,
                    "arch": member.arch_json(), "routed_member": {"index": k, "classes": group}}
            (sub / MEMBER_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))

    def load_weights(self, folder: Path) -> None:
        for k, member in enumerate(self.members):
            sub = Path(folder) / MEMBERS_DIR / str(k)
            if not (sub / MEMBER_FILE).is_file():
                raise FileNotFoundError(f"routed denoiser {folder}: member folder {sub} is missing; the folder was "
                                        "not written whole (save it again)")
            member.load_weights(sub)


def check_routes(model: Denoiser, groups: list[list[int]], where: str) -> None:
    """Refuse ``model`` unless it is a routed denoiser over exactly ``groups`` (the config's partition)."""
    if not isinstance(model, RoutedDenoiser):
        raise ValueError(f"{where}: generative.student.route is set but the folder holds a {model.kind} denoiser, "
                         "not a routed one; give a routed student's folder, or drop route (or use route.member_paths)")
    if model.groups != [list(g) for g in groups]:
        raise ValueError(f"{where}: the folder routes the groups {model.groups}, generative.student.route gives "
                         f"{groups}; make them agree (or drop route to take the folder's)")


def with_routed(kinds: dict[str, Any]) -> dict[str, Any]:
    """``kinds`` plus ``routed``, whose members may be any of ``kinds`` (the registry of :mod:`.models`)."""
    registry = {**kinds, RoutedDenoiser.kind: RoutedDenoiser}
    RoutedDenoiser.member_kinds = registry
    return registry
