"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS-style pruning of one linear layer, as the official code
``IST-DASLab/sparsegpt`` (``sparsegpt.py::fasterprune``) does it.

The layer ``y = W x`` is pruned to keep its outputs on the calibration inputs: with ``H = X X^T / n`` (the
inputs' second moment, ``[in, in]``), removing weight ``W_rc`` and updating the rest of row ``r`` optimally
costs ``W_rc^2 / [H^-1]_cc^2``-ordered error and moves the not yet processed weights of the row by
``-(W_rc / [H^-1]_cc) [H^-1]_c,c:`` (the error compensation). The inverse Hessian is used through the upper
Cholesky factor of ``H^-1`` (``U``, with ``H^-1 = U^T U``), which gives the successive inverses of the
shrinking Hessians column by column without re-inverting. Columns are solved in blocks of ``block_size``;
within a block the mask is chosen once (unstructured: the ``fraction`` of the block's weights with the
smallest ``W^2 / U_cc^2``) or every ``M`` columns (N:M: the ``M - N`` smallest of each group, per row), and
the block's accumulated error updates all later columns in one matrix product.
"""

from __future__ import annotations

import torch


def inverse_hessian_factor(hessian_ii: torch.Tensor, weight_oi: torch.Tensor, dampening: float) -> torch.Tensor:
    """The upper Cholesky factor ``U`` (``[in, in]``) of ``(H + damp * I)^-1``.

    Inputs that never fired (zero diagonal) get a unit diagonal and their weight columns are zeroed in place
    (as the official code does: they carry no signal). ``damp = dampening * mean(diag H)`` keeps the
    factorisation well defined for the rank-deficient ``H`` of few calibration tokens.
    """
    h = hessian_ii.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight_oi[:, dead] = 0.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += dampening * torch.mean(torch.diag(h))
    lower = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True)


def _block_mask(w_ob: torch.Tensor, diag_b: torch.Tensor, fraction: float) -> torch.Tensor:
    """Unstructured: True at the ``round(fraction * numel)`` weights of the block (``[out, b]``) with the
    smallest OBS saliency ``w^2 / [H^-1]_cc^2`` (pruned)."""
    saliency = (w_ob**2 / diag_b.reshape(1, -1) ** 2).flatten()
    k = int(round(fraction * saliency.numel()))
    mask = torch.zeros_like(saliency, dtype=torch.bool)
    if k:
        mask[torch.topk(saliency, k, largest=False).indices] = True
    return mask.view_as(w_ob)


def sparsegpt_prune(weight_oi: torch.Tensor, hessian_ii: torch.Tensor, *, fraction: float | None = None,
                    n_m: tuple[int, int] | None = None, block_size: int = 128,
                    dampening: float = 0.01) -> torch.Tensor:
    """The pruned and compensated weight (``[out, in]``, float32) of a linear layer whose calibration inputs
    have second moment ``hessian_ii`` (``[in, in]``); exactly one of ``fraction`` / ``n_m``. With
    ``fraction == 0`` nothing is pruned, every compensation is zero and the weight comes back unchanged."""
    weight = weight_oi.detach().float().clone()
    upper = inverse_hessian_factor(hessian_ii.float(), weight, dampening)
    columns = weight.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weight[:, start:end].clone()
        u_block = upper[start:end, start:end]
        diag_b = torch.diag(u_block)
        errors = torch.zeros_like(block)
        pruned = _block_mask(block, diag_b, fraction) if n_m is None else torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                saliency = block[:, i:i + m] ** 2 / diag_b[i:i + m].reshape(1, -1) ** 2
                drop = torch.topk(saliency, m - n, dim=1, largest=False).indices
                pruned.scatter_(1, i + drop, True)
            column = block[:, i]
            kept = torch.where(pruned[:, i], torch.zeros_like(column), column)
            error = (column - kept) / diag_b[i]
            block[:, i:] -= error.unsqueeze(1) @ u_block[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = error
        weight[:, start:end] = block
        weight[:, end:] -= errors @ upper[start:end, end:]
    return weight
