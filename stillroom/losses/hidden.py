"""Hidden-state and attention terms, and the student -> teacher layer mapping.

Layer indices follow Hugging Face: for hidden states, index 0 is the embedding
output and index i the output of block i-1 (so ``num_layers`` is the last
block; in Llama-style models that last entry already has the final norm
applied). For attentions, index i is block i (0-based), as in HF's
``outputs.attentions``.

Every term returns ``(sum over counted tokens, count)`` like the logit terms:
per-token values summed over the mask, so the loop's single division by the
global token count gives the token mean. Computation is in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from stillroom.losses.registry import TermSpec, all_of, boolean, non_negative, register
from stillroom.teachers.signal import TeacherSignal

LayerMap = list[tuple[int, int]]
LAYER_PARAMS = ("layers", "include_embeddings")
"""Params of a hidden-state/attention term that choose its layer map (the mix resolves them);
every other param is a keyword argument of the term function."""


def uniform_layer_map(student_layers: int, teacher_layers: int, *, include_embeddings: bool = False) -> LayerMap:
    """Hidden-state pairs: student block output m <-> teacher block output floor(m N / M), m = 1..M.

    TinyBERT's g(m) = m N / M; for M = N it is the identity (SquareHead). With
    ``include_embeddings`` the embedding outputs (0, 0) are paired too.
    """
    pairs = [(m, (m * teacher_layers) // student_layers) for m in range(1, student_layers + 1)]
    return ([(0, 0)] if include_embeddings else []) + pairs


def uniform_attention_map(student_layers: int, teacher_layers: int) -> LayerMap:
    """Attention pairs (0-based blocks): student block m <-> teacher block floor((m+1) N / M) - 1."""
    return [(m, ((m + 1) * teacher_layers) // student_layers - 1) for m in range(student_layers)]


def resolve_layer_map(term: str, layers: Any, student_layers: int | None, teacher_layers: int | None, *,
                      include_embeddings: bool = False, attention: bool = False) -> LayerMap:
    """Turn a recipe's ``layers`` ("uniform", "last" or ``[[s, t], ...]``) into explicit pairs."""
    try:
        pairs = parse_layers(layers)
    except ValueError as err:
        raise ValueError(f"loss term {term!r}: {err}") from None
    if pairs is None:
        if student_layers is None or teacher_layers is None:
            raise ValueError(f"loss term {term!r}: layers={layers!r} needs the student's and teacher's layer counts")
        if layers == "last":
            return [(student_layers - 1, teacher_layers - 1)] if attention else [(student_layers, teacher_layers)]
        if attention:
            return uniform_attention_map(student_layers, teacher_layers)
        return uniform_layer_map(student_layers, teacher_layers, include_embeddings=include_embeddings)
    top_s = student_layers - 1 if attention and student_layers else student_layers
    top_t = teacher_layers - 1 if attention and teacher_layers else teacher_layers
    for s, t in pairs:
        if (top_s is not None and s > top_s) or (top_t is not None and t > top_t):  # >= 0: parse_layers
            raise ValueError(f"loss term {term!r}: layer pair [{s}, {t}] is out of range "
                             f"(student 0..{top_s}, teacher 0..{top_t})")
    return pairs


def parse_layers(layers: Any) -> LayerMap | None:
    """A recipe's ``layers``: None for "uniform"/"last" (resolved once the layer counts are known),
    else the explicit non-negative ``(student, teacher)`` pairs; ValueError on anything else."""
    if isinstance(layers, str):
        if layers not in ("uniform", "last"):
            raise ValueError(f"layers={layers!r}; valid: 'uniform', 'last' or [[s, t], ...]")
        return None
    try:
        pairs = [(int(s), int(t)) for s, t in layers]
    except (TypeError, ValueError):
        raise ValueError(f"layers must be 'uniform', 'last' or a list of [student, teacher] "
                         f"index pairs (got {layers!r})") from None
    if any(s < 0 or t < 0 for s, t in pairs):
        raise ValueError(f"layers: indices must be >= 0 (got {layers!r})")
    return pairs


def _check_layers(values: dict[str, Any]) -> dict[str, Any]:
    if "layers" in values:
        parse_layers(values["layers"])
    return values


def _teacher_states(teacher: TeacherSignal | dict, attention: bool) -> dict[int, torch.Tensor]:
    if isinstance(teacher, TeacherSignal):
        return teacher.attentions if attention else teacher.hidden_states
    return teacher


def _pairs(term: str, student: dict, teacher: dict, layer_map: LayerMap | None, what: str):
    if layer_map is None:
        layer_map = [(k, k) for k in sorted(set(student) & set(teacher))]
        if not layer_map:
            raise ValueError(f"loss term {term!r}: student and teacher share no {what} layer")
    for s, t in layer_map:
        if s not in student:
            raise ValueError(f"loss term {term!r}: the student did not return {what} layer {s} "
                             f"(has {sorted(student)}); request it with output_{what}=True")
        if t not in teacher:
            raise ValueError(f"loss term {term!r}: the teacher signal has no {what} layer {t} (has {sorted(teacher)})")
        yield s, t, student[s], teacher[t]


def _rows(x_btd: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x_btd.reshape(-1, x_btd.shape[-1])[rows].float()


def _count(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    rows = mask.reshape(-1).bool().nonzero().squeeze(1)
    return rows, int(rows.numel())


def squarehead(student_hidden: dict[int, torch.Tensor], teacher: TeacherSignal | dict, mask: torch.Tensor, *,
               layer_map: LayerMap | None = None, eps: float = 7.8125e-3) -> tuple[torch.Tensor, int]:
    """SquareHead (Kurtic et al. 2023): sum_l mean_d (h_s^l - h_t^l)^2 / (mean_{tok,d} (h_t^l)^2 + eps).

    Returned as a sum over counted tokens of sum_l mean_d (...)^2 / norm_l, so dividing by the
    count gives the paper's per-layer token mean. ``norm_l`` (the teacher's mean square) is
    computed over this call's counted tokens, i.e. per micro-batch and per process: with gradient
    accumulation or several processes it differs slightly from the normaliser of one big batch
    (the rest of the loss is exactly one big batch's). eps defaults to bf16's machine epsilon
    (2^-7, MPT code). Student and teacher widths must match (no projection).
    """
    rows, count = _count(mask)
    total = torch.zeros((), dtype=torch.float32, device=mask.device)
    for s, t, hs, ht in _pairs("squarehead", student_hidden, _teacher_states(teacher, False), layer_map, "hidden_states"):
        if hs.shape[-1] != ht.shape[-1]:
            raise ValueError(f"squarehead: student layer {s} width {hs.shape[-1]} != teacher layer {t} width "
                             f"{ht.shape[-1]}; use hidden_mse (learned projection) for different widths")
        if count == 0:
            total = total + hs.sum() * 0.0
            continue
        a, b = _rows(hs, rows), _rows(ht, rows).detach()
        norm = b.pow(2).mean() + eps
        total = total + (a - b).pow(2).mean(-1).sum() / norm
    return total, count


def hidden_mse(student_hidden: dict[int, torch.Tensor], teacher: TeacherSignal | dict, mask: torch.Tensor, *,
               layer_map: LayerMap | None = None,
               projections: dict[int, torch.nn.Module] | None = None) -> tuple[torch.Tensor, int]:
    """Latent MSE (TinyBERT / ERNIE-Tiny): sum over counted tokens of sum_l mean_d (W_l h_s^l - h_t^l)^2.

    ``projections[s]`` (a learned ``nn.Linear(student_width, teacher_width)``, built by
    :func:`stillroom.models.projectors.build_projector` as kind ``linear`` without bias) maps student layer
    s when the widths differ; LossMix creates and owns them (they need the optimizer).
    """
    return _latent("hidden_mse", student_hidden, teacher, mask, layer_map, projections, cosine=False)


def hidden_cosine(student_hidden: dict[int, torch.Tensor], teacher: TeacherSignal | dict, mask: torch.Tensor, *,
                  layer_map: LayerMap | None = None,
                  projections: dict[int, torch.nn.Module] | None = None) -> tuple[torch.Tensor, int]:
    """Cosine distance of hidden states: sum over counted tokens of sum_l (1 - cos(W_l h_s^l, h_t^l)).

    Used by DistilBERT (Sanh et al. 2019) on the last layer; projections as in :func:`hidden_mse`.
    """
    return _latent("hidden_cosine", student_hidden, teacher, mask, layer_map, projections, cosine=True)


def hidden_smooth_l1(student_hidden: dict[int, torch.Tensor], teacher: TeacherSignal | dict, mask: torch.Tensor, *,
                     layer_map: LayerMap | None = None, projections: dict[int, torch.nn.Module] | None = None,
                     beta: float = 1.0) -> tuple[torch.Tensor, int]:
    """Smooth-L1 regression of features (EAGLE / SpecVLM draft training): sum over counted tokens of
    sum_l mean_d smooth_l1_beta(W_l h_s^l - h_t^l), where smooth_l1_beta(x) = 0.5 x^2 / beta for |x| < beta,
    else |x| - 0.5 beta (``torch.nn.SmoothL1Loss``, whose default beta = 1 EAGLE uses); projections as in
    :func:`hidden_mse`. Robust to the large, rare feature errors of an untrained draft where MSE is not."""
    return _latent("hidden_smooth_l1", student_hidden, teacher, mask, layer_map, projections, cosine=False,
                   beta=beta)


def _latent(term, student_hidden, teacher, mask, layer_map, projections, cosine, beta=None):
    rows, count = _count(mask)
    total = torch.zeros((), dtype=torch.float32, device=mask.device)
    for s, t, hs, ht in _pairs(term, student_hidden, _teacher_states(teacher, False), layer_map, "hidden_states"):
        proj = (projections or {}).get(s)
        if count == 0:
            total = total + hs.sum() * 0.0 + (sum(p.sum() for p in proj.parameters()) * 0.0 if proj else 0.0)
            continue
        a, b = _rows(hs, rows), _rows(ht, rows).detach()
        if proj is not None:
            a = proj(a.to(next(proj.parameters()).dtype)).float()
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"{term}: student layer {s} width {a.shape[-1]} != teacher layer {t} width "
                             f"{b.shape[-1]}; give LossMix student_hidden/teacher_hidden so it adds a projection")
        if cosine:
            total = total + (1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)).sum()
        elif beta is not None:
            total = total + torch.nn.functional.smooth_l1_loss(a, b, reduction="none", beta=beta).mean(-1).sum()
        else:
            total = total + (a - b).pow(2).mean(-1).sum()
    return total, count


def attention_mse(student_attentions: dict[int, torch.Tensor], teacher: TeacherSignal | dict, mask: torch.Tensor, *,
                  layer_map: LayerMap | None = None) -> tuple[torch.Tensor, int]:
    """Attention-map distillation (TinyBERT / ERNIE-Tiny): for each counted query token,
    sum over mapped layers of mean over heads of sum over keys (A_s - A_t)^2.

    Maps are ``[B, heads, T, T]`` attention probabilities (HF ``output_attentions``). Summing over
    keys (not averaging) keeps the value independent of padding; it equals TinyBERT's per-row MSE
    times T. When head counts differ, the head-averaged maps are compared.
    """
    b_, t_ = mask.shape
    q_rows = mask.reshape(-1).bool().nonzero().squeeze(1)
    count = int(q_rows.numel())
    total = torch.zeros((), dtype=torch.float32, device=mask.device)
    for s, t, a_s, a_t in _pairs("attention_mse", student_attentions, _teacher_states(teacher, True), layer_map,
                                 "attentions"):
        if count == 0:
            total = total + a_s.sum() * 0.0
            continue
        if a_s.shape[1] != a_t.shape[1]:
            a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
        # [B, H, T, T] -> [B*T(query), H, T(key)], then counted queries only.
        qs = a_s.permute(0, 2, 1, 3).reshape(b_ * t_, a_s.shape[1], -1)[q_rows].float()
        qt = a_t.permute(0, 2, 1, 3).reshape(b_ * t_, a_t.shape[1], -1)[q_rows].float().detach()
        total = total + (qs - qt).pow(2).sum(-1).mean(-1).sum()
    return total, count


_LAYERS = {"layers": "uniform", "include_embeddings": False}
_check_hidden = all_of(_check_layers, boolean("include_embeddings"))
register(TermSpec("squarehead", "hidden", squarehead, {**_LAYERS, "eps": 7.8125e-3},
                  all_of(_check_hidden, non_negative("eps"))))
register(TermSpec("hidden_mse", "hidden", hidden_mse, dict(_LAYERS), _check_hidden, projects=True))
register(TermSpec("hidden_cosine", "hidden", hidden_cosine, dict(_LAYERS), _check_hidden, projects=True))
register(TermSpec("hidden_smooth_l1", "hidden", hidden_smooth_l1, {**_LAYERS, "beta": 1.0},
                  all_of(_check_hidden, non_negative("beta")), projects=True))
register(TermSpec("attention_mse", "attention", attention_mse, {"layers": "uniform"}, _check_layers))
