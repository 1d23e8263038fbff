"""TAID's adaptive schedule for the interpolation parameter t (Shing et al., ICLR 2025).

Exact logic of the official code (``SakanaAI/TAID``, ``src/distil_losses/taid.py``):

    first call:  prev_loss = J; t unchanged
    afterwards:  delta = (prev_loss - J) / (prev_loss + 1e-15)
                 m     = beta * m + (1 - beta) * delta
                 dt    = alpha * sigmoid(m) * (1 - t)
                 t_lin = t_start + (t_end - t_start) * step / total_steps
                 t     = min(t_end, max(t_lin, t + dt)); prev_loss = J
    adaptive off: t = t_lin

``t``, ``momentum`` and ``prev_loss`` are fp32 buffers, so they are saved and
restored with the module's ``state_dict`` (exact resume).

Decision (documented in docs/LOSSES.md): :meth:`update` runs once per *optimizer*
step (the spec's recommendation; the official code updates on every micro-batch),
fed J = the TAID term's own loss per token over the accumulated step (as the
official code feeds its TAID loss, not the sum of every term of the mix), through
``LossMix.after_step``. The loop all-reduces that value first, which keeps t
identical across processes.

The schedule is the per-run state of the ``taid`` term (``TermSpec.state``): it gives
the kernel its argument (:meth:`kernel_args`), is advanced by :meth:`update` and
logged by :meth:`log_state`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stillroom.losses.registry import all_of, boolean, non_negative, unit_interval

_check_values = all_of(unit_interval("t_start", "t_end", open_right=("beta",)), non_negative("alpha"),
                       boolean("adaptive"))


class TaidSchedule(torch.nn.Module):
    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                 adaptive: bool = True):
        super().__init__()
        try:
            p = self.check({"t_start": t_start, "t_end": t_end, "alpha": alpha, "beta": beta, "adaptive": adaptive})
        except (TypeError, ValueError) as err:
            raise ValueError(f"taid: {err}") from None
        self.t_start, self.t_end, self.alpha, self.beta = p["t_start"], p["t_end"], p["alpha"], p["beta"]
        self.adaptive = p["adaptive"]
        self.register_buffer("t", torch.tensor(float(t_start)))
        self.register_buffer("momentum", torch.tensor(0.0))
        self.register_buffer("prev_loss", torch.tensor(math.inf))

    @staticmethod
    def check(values: dict[str, Any]) -> dict[str, Any]:
        """Validate (and make floats of) the schedule parameters present in ``values``; no tensors."""
        values = _check_values(values)
        if "t_start" in values and "t_end" in values and values["t_start"] > values["t_end"]:
            raise ValueError(f"need t_start <= t_end (got t_start={values['t_start']}, t_end={values['t_end']})")
        return values

    @property
    def value(self) -> float:
        return float(self.t)

    def kernel_args(self) -> dict[str, float]:
        """The ``taid`` kernel's arguments for the next forward: the current t."""
        return {"t": self.value}

    def log_state(self) -> dict[str, float]:
        return {"taid_t": self.value}

    def t_linear(self, step: int, total_steps: int) -> float:
        frac = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
        return self.t_start + (self.t_end - self.t_start) * frac

    def update(self, loss: float, step: int, total_steps: int) -> None:
        """Advance t after optimizer step ``step`` (of ``total_steps``) whose TAID loss per token was ``loss``."""
        loss = float(loss)
        t_lin = self.t_linear(step, total_steps)
        if not self.adaptive:
            self.t.fill_(min(self.t_end, t_lin))
            return
        if not math.isfinite(loss):
            raise ValueError(f"taid: the loss passed to the schedule is {loss}; t cannot be updated from it")
        prev = float(self.prev_loss)
        if math.isinf(prev):
            self.prev_loss.fill_(loss)
            return
        delta = (prev - loss) / (prev + 1e-15)
        m = self.beta * float(self.momentum) + (1.0 - self.beta) * delta
        t = float(self.t)
        dt = self.alpha * (1.0 / (1.0 + math.exp(-m))) * (1.0 - t)
        self.momentum.fill_(m)
        self.t.fill_(min(self.t_end, max(t_lin, t + dt)))
        self.prev_loss.fill_(loss)

    def extra_repr(self) -> str:
        return (f"t={self.value:.4f}, t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, "
                f"beta={self.beta}, adaptive={self.adaptive}")
