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

Decision (documented in docs/LOSSES.md): the loop calls :meth:`update` once per
*optimizer* step with the loss per token of the accumulated step (the spec's
recommendation; the official code updates on every micro-batch), and with the
value it reports, which keeps t identical across processes when that value is
all-reduced.
"""

from __future__ import annotations

import math

import torch


class TaidSchedule(torch.nn.Module):
    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                 adaptive: bool = True):
        super().__init__()
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"taid: need 0 <= t_start <= t_end <= 1 (got t_start={t_start}, t_end={t_end})")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"taid: beta (momentum) must lie in [0, 1) (got {beta})")
        if alpha < 0:
            raise ValueError(f"taid: alpha must be >= 0 (got {alpha})")
        self.t_start, self.t_end, self.alpha, self.beta, self.adaptive = t_start, t_end, alpha, beta, bool(adaptive)
        self.register_buffer("t", torch.tensor(float(t_start)))
        self.register_buffer("momentum", torch.tensor(0.0))
        self.register_buffer("prev_loss", torch.tensor(math.inf))

    @property
    def value(self) -> float:
        return float(self.t)

    def t_linear(self, step: int, total_steps: int) -> float:
        frac = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
        return self.t_start + (self.t_end - self.t_start) * frac

    def update(self, loss: float, step: int, total_steps: int) -> None:
        """Advance t after optimizer step ``step`` (of ``total_steps``) whose loss per token was ``loss``."""
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
