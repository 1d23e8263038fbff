"""The networks of the autoregressive domain's students: a GRU backbone over a shifted sequence and an MLP head.

:class:`CondDenoiser` is one shape with two uses (spec 12.2):

* the *guidance* network (and the GTS model): the backbone reads the clean tokens ``q`` shifted by one position
  (``q_<i``: position 0 reads a learned start input), giving a feature ``f_i`` that depends on ``q_<i`` only; the
  head maps ``(q_i^t, t, f_i)`` to the clean-token prediction ``mu_psi`` (the score is
  ``-(q^t - (1 - t) mu) / t^2``: :func:`~.score.score_from_denoiser`);
* the one-step *generator* (the student): the backbone reads the noise sequence ``eps`` shifted by one
  position and the head maps ``(eps_i, t = 1, f_i)`` to the continuous token ``q_i``; all positions come out of
  one pass (:meth:`CondDenoiser.generate`).

Both are the same class, so the GTS model's weights initialise either. Saved as ``ar_net.json`` (the shape)
plus ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stillroom.domains.generative.conventions import sinusoidal

NET_FILE = "ar_net.json"
WEIGHTS_FILE = "model.safetensors"
TOKEN_DIM = 2


class CondDenoiser(nn.Module):
    """``(x_t [B, n, 2], t [B, n], prev [B, n, 2]) -> [B, n, 2]`` (see the module docstring)."""

    def __init__(self, hidden: int = 32, head_width: int = 64, time_features: int = 16):
        super().__init__()
        self.shape = {"hidden": hidden, "head_width": head_width, "time_features": time_features}
        self.start = nn.Parameter(torch.zeros(TOKEN_DIM))
        self.backbone = nn.GRU(TOKEN_DIM, hidden, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(TOKEN_DIM + time_features + hidden, head_width), nn.SiLU(),
            nn.Linear(head_width, head_width), nn.SiLU(), nn.Linear(head_width, TOKEN_DIM))

    def features(self, seq_bnd: torch.Tensor) -> torch.Tensor:
        """``[B, n, hidden]``: ``f_i`` of the backbone over ``seq`` shifted by one (it reads ``seq_<i`` only)."""
        start_b1d = self.start.expand(seq_bnd.shape[0], 1, TOKEN_DIM).to(seq_bnd.dtype)
        shifted_bnd = torch.cat([start_b1d, seq_bnd[:, :-1]], dim=1)
        return self.backbone(shifted_bnd)[0]

    def head_out(self, x_bnd: torch.Tensor, t_bn: torch.Tensor, feats_bnh: torch.Tensor) -> torch.Tensor:
        """``[B, n, 2]``: the head's clean-token prediction at noisy tokens ``x`` and times ``t``."""
        b, n, _ = x_bnd.shape
        time_bnf = sinusoidal(t_bn.reshape(-1), self.shape["time_features"]).reshape(b, n, -1).to(x_bnd.dtype)
        return self.head(torch.cat([x_bnd, time_bnf, feats_bnh], dim=-1))

    def forward(self, x_bnd: torch.Tensor, t_bn: torch.Tensor, prev_bnd: torch.Tensor) -> torch.Tensor:
        """Guidance use: ``mu_psi(q_i^t, t_i | prev_<i)`` for every position."""
        return self.head_out(x_bnd, t_bn, self.features(prev_bnd))

    def generate(self, eps_bnd: torch.Tensor) -> torch.Tensor:
        """Generator use: continuous tokens ``[B, n, 2]`` from the noise sequence ``eps [B, n, 2]`` in one pass."""
        ones_bn = torch.ones(eps_bnd.shape[:2], device=eps_bnd.device, dtype=eps_bnd.dtype)
        return self.head_out(eps_bnd, ones_bn, self.features(eps_bnd))

    def describe(self) -> str:
        return f"GRU {self.shape['hidden']} + MLP head {self.shape['head_width']}"


def build_net(shape: dict, seed: int) -> CondDenoiser:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CondDenoiser(**shape)


def save_net(model: CondDenoiser, folder: Path, extra: dict | None = None) -> None:
    """``folder/ar_net.json`` + ``folder/model.safetensors``, written under a temporary name and renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, folder / WEIGHTS_FILE)
    tmp_json = folder / f".{NET_FILE}.tmp"
    tmp_json.write_text(json.dumps({"shape": model.shape, **(extra or {})}, indent=2) + "\n")
    os.replace(tmp_json, folder / NET_FILE)


def load_net(folder: Path, where: str) -> CondDenoiser:
    if not (folder / NET_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{where}: {folder} is not a generator folder (needs {NET_FILE} and {WEIGHTS_FILE}); give "
                         "the `student/` folder of an autoregressive run")
    shape = json.loads((folder / NET_FILE).read_text())["shape"]
    model = CondDenoiser(**shape)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model
