"""MEND's model pieces (Li et al., ICLR 2024): a demonstration distiller and a frozen LLM fed distilled vectors.

* :class:`MendDistiller` (f_phi): a small causal LM body reads the K concatenated demonstrations ``D`` followed
  by ``l`` learnable summary embeddings and returns its last hidden states at the ``l`` summary positions,
  projected to the LLM's width when the widths differ (dense + tanh, as the released ``MyPooler``): the distilled
  demonstration vectors ``S_D`` ``[B, l, H_llm]``. The summary embeddings start as the input embeddings of ``l``
  random vocabulary ids (seeded): the LLM's rows when the widths match, else the distiller's own.
* :func:`prefix_logits`: the frozen LLM on ``[S_D ; x]`` through ``inputs_embeds`` (the prefix always attended,
  ``x`` right-padded, positions ``0 .. l + |x| - 1``); returns the logits at the ``x`` positions only.
* :func:`split_rows`: a collated batch of full-context rows ``[D ; x]`` (right-padded, ``demo_len`` tokens of
  ``D`` per row) into the distiller's input (``D`` left-padded, so the summary positions are the last ``l``),
  the ``x`` part (right-padded) with its shifted targets, and the gather index of the ``x`` positions in the
  full row (the teacher's frame). Student and teacher logits are compared on the same ``x`` tokens: position
  ``j`` of ``x`` is ``l + j`` in the student's input and ``demo_len + j`` in the teacher's.
* :func:`save_distiller` / :func:`load_distiller`: safetensors + a small JSON config, each written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stillroom.models.lora import decoder_body, unwrap

WEIGHTS = "mend_distiller.safetensors"
CONFIG = "mend_distiller.json"


class MendDistiller(nn.Module):
    """f_phi: demonstrations ``[B, Td]`` (left-padded) -> ``S_D`` ``[B, l, llm_width]`` (module docstring)."""

    def __init__(self, backbone: nn.Module, summary_len: int, llm_width: int, *, init_table: torch.Tensor,
                 seed: int) -> None:
        super().__init__()
        self.backbone = backbone
        width = int(unwrap(backbone).get_input_embeddings().weight.shape[1])
        if init_table.shape[1] != width:
            raise ValueError(f"MEND: the summary embeddings' init table has width {init_table.shape[1]}, the "
                             f"distiller {width}")
        ids = torch.randint(0, init_table.shape[0], (summary_len,), generator=torch.Generator().manual_seed(seed))
        self.summary = nn.Parameter(init_table.detach()[ids.to(init_table.device)].clone().float())
        self.projector = nn.Sequential(nn.Linear(width, llm_width), nn.Tanh()) if width != llm_width else None
        self.summary_len, self.width, self.llm_width = summary_len, width, llm_width

    def forward(self, demo_ids_bt: torch.Tensor, demo_mask_bt: torch.Tensor) -> torch.Tensor:
        """``demo_ids_bt``/``demo_mask_bt`` ``[B, Td]`` left-padded -> ``S_D`` ``[B, l, llm_width]``."""
        base = unwrap(self.backbone)
        b = demo_ids_bt.shape[0]
        tokens_btd = base.get_input_embeddings()(demo_ids_bt)
        summary_bld = self.summary.to(tokens_btd.dtype).unsqueeze(0).expand(b, -1, -1)
        embeds = torch.cat([tokens_btd, summary_bld], dim=1)
        mask = torch.cat([demo_mask_bt, demo_mask_bt.new_ones(b, self.summary_len)], dim=1)
        positions = (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # left padding does not shift positions
        out = decoder_body(self.backbone)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                          use_cache=False)
        states_bld = out.last_hidden_state[:, -self.summary_len:]
        return states_bld if self.projector is None else self.projector(states_bld)

    def describe(self) -> dict:
        """The JSON config saved beside the weights."""
        return {"summary_len": self.summary_len, "width": self.width, "llm_width": self.llm_width,
                "projector": self.projector is not None,
                "backbone_config": unwrap(self.backbone).config.to_dict()}


def summary_init_table(llm: nn.Module, backbone: nn.Module) -> torch.Tensor:
    """``[V, H]``: the embedding rows the summary embeddings are drawn from: the LLM's when its width is the
    distiller's, else the distiller's own."""
    llm_table = unwrap(llm).get_input_embeddings().weight
    own = unwrap(backbone).get_input_embeddings().weight
    return llm_table if llm_table.shape[1] == own.shape[1] else own


def llm_width(llm: nn.Module) -> int:
    return int(unwrap(llm).get_input_embeddings().weight.shape[1])


def prefix_logits(llm: nn.Module, prefix_bld: torch.Tensor, x_ids_bt: torch.Tensor, x_mask_bt: torch.Tensor,
                  vocab: int) -> torch.Tensor:
    """The LLM on ``[prefix ; x]``: logits ``[B, Tx, vocab]`` at the ``x`` positions (position ``j`` of ``x`` is
    input position ``l + j``). ``prefix_bld`` ``[B, l, H]`` (``l`` may be 0: no demonstrations)."""
    base = unwrap(llm)
    x_bth = base.get_input_embeddings()(x_ids_bt)
    embeds = torch.cat([prefix_bld.to(x_bth.dtype), x_bth], dim=1)
    mask = torch.cat([x_mask_bt.new_ones(x_mask_bt.shape[0], prefix_bld.shape[1]), x_mask_bt], dim=1)
    out = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    return out.logits[:, prefix_bld.shape[1]:, :vocab]


@dataclass
class MendRows:
    """A batch of full-context rows split for MEND (shapes in the field docs)."""

    demo_ids: torch.Tensor
    """``[B, Td]`` demonstrations, left-padded."""
    demo_mask: torch.Tensor
    """``[B, Td]``."""
    x_ids: torch.Tensor
    """``[B, Tx]`` the input x (query and answer), right-padded."""
    x_mask: torch.Tensor
    """``[B, Tx]`` bool: real x tokens (the KD positions)."""
    x_targets: torch.Tensor
    """``[B, Tx]`` the token each x position predicts (-100: not learned), cut from the batch's ``target_ids``."""
    full_index: torch.Tensor
    """``[B, Tx]`` position of each x token in the full row (padding: 0), to gather the teacher's logits."""


def split_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, target_ids: torch.Tensor,
               demo_lens: list[int], pad_id: int) -> MendRows:
    """Full rows ``[D ; x]`` ``[B, T]`` (right-padded; row ``b`` has ``demo_lens[b]`` tokens of ``D``) -> MendRows."""
    lengths = attention_mask.sum(dim=1).tolist()
    device = input_ids.device
    td = max(max(demo_lens), 1)
    tx = max(n - d for n, d in zip(lengths, demo_lens))
    demo = torch.full((len(lengths), td), pad_id, dtype=torch.long, device=device)
    demo_mask = torch.zeros_like(demo)
    index = torch.zeros((len(lengths), tx), dtype=torch.long, device=device)
    x_mask = torch.zeros((len(lengths), tx), dtype=torch.bool, device=device)
    for b, (n, d) in enumerate(zip(lengths, demo_lens)):
        if not 0 < d < n:
            raise ValueError(f"MEND: row {b} has {d} demonstration tokens of {n}; it needs both demonstrations and "
                             "an input")
        demo[b, td - d:], demo_mask[b, td - d:] = input_ids[b, :d], 1
        index[b, : n - d] = torch.arange(d, n, device=device)
        x_mask[b, : n - d] = True
    x_ids = torch.where(x_mask, input_ids.gather(1, index), torch.full_like(index, pad_id))
    x_targets = torch.where(x_mask, target_ids.gather(1, index), torch.full_like(index, -100))
    return MendRows(demo, demo_mask, x_ids, x_mask, x_targets, index)


def gather_positions(logits_btv: torch.Tensor, index_bt: torch.Tensor) -> torch.Tensor:
    """``logits_btv[b, index_bt[b, j]]`` -> ``[B, Tx, V]`` (the teacher's logits at the x positions)."""
    return logits_btv.gather(1, index_bt.unsqueeze(-1).expand(-1, -1, logits_btv.shape[-1]))


def save_distiller(distiller: MendDistiller, folder: Path) -> None:
    """``folder/mend_distiller.safetensors`` (every weight: backbone, summary, projector) and
    ``folder/mend_distiller.json``, each through a temporary file and a rename."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in distiller.state_dict().items()}
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS)
    tmp = folder / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(distiller.describe(), indent=1, default=str))
    os.replace(tmp, folder / CONFIG)


def load_distiller(distiller: MendDistiller, folder: Path) -> None:
    """Load a :func:`save_distiller` folder into ``distiller`` (same summary length and widths, checked)."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"mend.init: {folder} holds no {WEIGHTS} + {CONFIG}; give the folder a MEND run "
                                "saved its distiller to (<run>/distiller)")
    saved = json.loads((folder / CONFIG).read_text())
    for key in ("summary_len", "width", "llm_width"):
        if saved.get(key) != getattr(distiller, key):
            raise ValueError(f"mend.init: {folder / CONFIG} has {key}={saved.get(key)}, this run's distiller "
                             f"{getattr(distiller, key)}; set mend.summary_len / the student to match")
    device = distiller.summary.device
    distiller.load_state_dict({k: v.to(device) for k, v in load_file(str(folder / WEIGHTS)).items()})
