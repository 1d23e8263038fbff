"""Fake quantization on llama.cpp's Q8_0 / Q4_0 block grids, with the straight-through estimator.

A weight ``W [out, in]`` is cut into blocks of 32 consecutive input weights of a row (``W.view(-1, 32)``);
each block shares one scale ``d`` stored as float16 (symmetric, no offset):

* Q8_0: ``d = max|w| / 127``, ``q = roundf(w / d)`` in [-127, 127] (round half away from zero);
* Q4_0: ``d = m / -8`` with ``m`` the block's weight of largest magnitude (its sign kept),
  ``q = clamp(trunc(w / d + 8.5), 0, 15) - 8`` in [-8, 7].

The dequantized weight is ``q * float(float16(d))``. The rounding is written op for op as gguf-py's reference
``gguf/quants.py`` (float32 math, ``1/d`` multiplied, ``d`` rounded to float16 only when stored), so the grid
values here equal what ``gguf.quants.dequantize(gguf.quants.quantize(W))`` gives, bit for bit (tested), and so
what llama.cpp and transformers' GGUF loader compute from the exported file.

Training (QAT / QAD): :class:`FakeQuantLinear` computes ``F.linear(x, dequant(quant(W)), b)``; the backward
passes the gradient of the grid weight straight to the latent float ``W`` (straight-through estimator, Bengio
et al. 2013; as NVIDIA Model Optimizer's QAT). The module keeps ``weight``/``bias`` as they were (only its class
changes), so state_dict keys, checkpoints and resume are those of the plain model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.config.quantize import QuantizeConfig

BLOCK = 32
"""Weights per block (llama.cpp's QK8_0 = QK4_0 = 32)."""


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, written as gguf-py's ``np_roundf`` (``floor(a) + floor(2 (a - floor(a)))``)."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _inverse(d_n1: torch.Tensor) -> torch.Tensor:
    """``1 / d``, 0 where ``d`` is 0 (an all-zero block), as gguf-py's ``np.where(d == 0, 0, 1 / d)``."""
    return torch.where(d_n1 == 0, torch.zeros_like(d_n1), 1 / d_n1)


def quantize_blocks(blocks_nb: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes_nb, scale_n1)`` of float32 blocks ``[n, 32]``: integer codes as float32 (q8_0 in [-127, 127],
    q4_0 in [-8, 7]) and the float16 scale of each block."""
    blocks_nb = blocks_nb.float()
    if fmt == "q8_0":
        d_n1 = blocks_nb.abs().amax(dim=-1, keepdim=True) / 127
        codes_nb = _roundf(blocks_nb * _inverse(d_n1)) + 0.0  # + 0.0: int8 codes have no -0
    elif fmt == "q4_0":
        imax_n1 = blocks_nb.abs().argmax(dim=-1, keepdim=True)  # the first largest, as numpy's argmax
        d_n1 = blocks_nb.gather(-1, imax_n1) / -8
        codes_nb = torch.trunc(blocks_nb * _inverse(d_n1) + 8.5).clamp(0, 15) - 8
    else:
        raise ValueError(f"unknown quantization format {fmt!r}; use q8_0 or q4_0")
    return codes_nb, d_n1.to(torch.float16)


def grid_weight(weight_oi: torch.Tensor, fmt: str) -> torch.Tensor:
    """The dequantized grid values of ``weight_oi [out, in]`` (float32, same shape and device); ``in`` must be a
    multiple of 32."""
    if weight_oi.shape[-1] % BLOCK:
        raise ValueError(f"a {fmt} weight needs rows of a multiple of {BLOCK} weights; got shape "
                         f"{tuple(weight_oi.shape)}")
    codes_nb, d_n1 = quantize_blocks(weight_oi.detach().reshape(-1, BLOCK), fmt)
    return (codes_nb * d_n1.float()).reshape(weight_oi.shape)


class _StraightThrough(torch.autograd.Function):
    """Forward: the grid weight (exactly, not ``w + (q - w).detach()``, which rounds); backward: identity."""

    @staticmethod
    def forward(ctx, weight_oi: torch.Tensor, fmt: str) -> torch.Tensor:
        return grid_weight(weight_oi, fmt).to(weight_oi.dtype)

    @staticmethod
    def backward(ctx, grad_oi: torch.Tensor):
        return grad_oi, None


def fake_quantize(weight_oi: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight_oi`` on the ``fmt`` grid in the forward; its gradient passes straight to ``weight_oi``."""
    return _StraightThrough.apply(weight_oi, fmt)


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses its weight on a block grid (``quant_format``). Made by changing the
    class of an existing ``nn.Linear`` (:func:`make_quant_aware`): parameters and their names are untouched."""

    quant_format: str = "q4_0"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: recomputed every forward (the weight changes every step)
            self.__dict__.pop("_grid_cache", None)  # not held through training
            return F.linear(x, fake_quantize(self.weight, self.quant_format), self.bias)
        return F.linear(x, self._cached_grid(), self.bias)

    def _cached_grid(self) -> torch.Tensor:
        """The grid weight without autograd, reused while the weight is unchanged (evaluation, generation and
        the speed rows then cost what the exported model costs). The key is the weight's storage, in-place
        version (bumped by every optimizer step and ``load_state_dict``), dtype and the format; the cache holds
        the storage it was computed from, so no other tensor can reuse that address meanwhile."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.quant_format)
        cached = self.__dict__.get("_grid_cache")
        if cached is None or cached[0] != key:
            cached = (key, grid_weight(w, self.quant_format).to(w.dtype), w.detach())
            self.__dict__["_grid_cache"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_format={self.quant_format}"


def _targets(model: nn.Module, cfg: QuantizeConfig) -> list[tuple[str, nn.Linear]]:
    """The linear layers ``cfg.modules`` names (by the last part of the module name), checked for the block."""
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in cfg.modules or not isinstance(module, nn.Linear):
            continue
        if module.in_features % BLOCK:
            leaf = name.rsplit(".", 1)[-1]
            raise ValueError(f"student.quantize: {name} has {module.in_features} input features, not a multiple "
                             f"of the {BLOCK}-weight block of {cfg.format}; remove {leaf!r} from "
                             "student.quantize.modules")
        found.append((name, module))
    if not found:
        raise ValueError(f"student.quantize.modules {cfg.modules} match no linear layer of the student; name the "
                         "last part of its linear layers' names (e.g. q_proj, down_proj)")
    return found


def make_quant_aware(model: nn.Module, cfg: QuantizeConfig) -> list[str]:
    """Turn the linear layers ``cfg.modules`` names into :class:`FakeQuantLinear` in place; returns their names.
    Idempotent (a layer already fake-quantized gets the new format)."""
    names = []
    for name, module in _targets(model, cfg):
        module.__class__ = FakeQuantLinear
        module.quant_format = cfg.format
        names.append(name)
    return names


def quantized_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """The fake-quantized linear layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def on_grid(model: nn.Module) -> nn.Module:
    """A plain copy of a quant-aware ``model``: each fake-quantized layer back to ``nn.Linear`` holding its grid
    weight (what the fake-quant forward used), so plain transformers computes the same function."""
    import copy

    plain = copy.deepcopy(model)
    with torch.no_grad():
        for module in quantized_layers(plain).values():
            module.weight.copy_(grid_weight(module.weight, module.quant_format))
            module.__class__ = nn.Linear
            module.__dict__.pop("quant_format", None)
            module.__dict__.pop("_grid_cache", None)
    return plain


def latent_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a quant-aware ``model`` keeping the latent full-precision weights."""
    import copy

    plain = copy.deepcopy(model)
    for module in quantized_layers(plain).values():
        module.__class__ = nn.Linear
        module.__dict__.pop("quant_format", None)
        module.__dict__.pop("_grid_cache", None)
    return plain


def quant_summary(model: nn.Module) -> dict:
    """For the log and the report: format, quantized layers and weights, and bits per weight of those layers."""
    layers = quantized_layers(model)
    formats = sorted({m.quant_format for m in layers.values()})
    weights = sum(m.weight.numel() for m in layers.values())
    bits = {"q8_0": 8.5, "q4_0": 4.5}
    return {"format": ",".join(formats), "layers": len(layers), "weights": weights,
            "bits_per_weight": bits.get(formats[0]) if len(formats) == 1 else None}
