"""Lossless speculative decoding (Leviathan et al. 2023; Chen et al. 2023) for one sequence.

Per round the draft q proposes up to ``gamma`` tokens one by one (reusing its KV
cache), the target p scores all of them in **one** forward pass (reusing its KV
cache), and an acceptance rule keeps a prefix of the proposals plus one token from p:

* greedy: accept ``y_i`` while ``y_i == argmax p_i``; at the first mismatch emit
  ``argmax p_i``; if all are accepted emit the bonus ``argmax p_{gamma+1}``. The output
  equals greedy decoding of the target token for token.
* sampling: accept ``y_i ~ q_i`` with probability ``min(1, p_i(y_i) / q_i(y_i))``; on the
  first rejection emit a draw from ``normalize(max(0, p_i - q_i))``; if all are accepted
  emit a draw from ``p_{gamma+1}``. The output is distributed exactly as sampling
  from p. Both p and q are ``warp_to_probs(logits, sampling_temperature, top_p)``.

KV caches hold, for each model, keys/values of a prefix of the current sequence. After
a round both are cropped to at most ``len(sequence) - 1`` tokens, which removes the
entries of rejected proposals; the tokens they still lack are fed on the next call.

Counting conventions (see :class:`SpecStats`): ``proposed`` drafted tokens; ``tested``
those that went through the acceptance test (the proposals up to and including the
first rejection); ``acceptance_rate = accepted / tested`` estimates the per-token
acceptance probability alpha of the i.i.d. model, so it can be plugged into
:func:`expected_block_efficiency`. ``beta_mean`` is DistillSpec's lower-variance
estimate of the same alpha: the mean over tested (draft-visited) contexts of
``sum_v min(p, q)`` (sampling) or ``1[argmax q == argmax p]`` (greedy).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from stillroom.generate.distributions import check_sampling_args, sample_from, uniform, warp_to_probs
from stillroom.generate.sampling import cache_keyword, checked_cache, eval_mode, model_device, stop_ids


@dataclass
class SpecStats:
    """Counters of one or more speculative (or autoregressive) generations; add them with ``+``."""

    target_calls: int = 0
    draft_calls: int = 0
    proposed: int = 0
    tested: int = 0
    accepted: int = 0
    generated_tokens: int = 0
    beta_sum: float = 0.0
    wall_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """accepted / tested: the per-token acceptance probability alpha (nan if nothing was tested)."""
        return self.accepted / self.tested if self.tested else float("nan")

    @property
    def accepted_per_proposed(self) -> float:
        """accepted / proposed (the ratio some tools call "acceptance rate"; not alpha)."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def beta_mean(self) -> float:
        """Mean over tested contexts of sum_v min(p, q) (sampling) or argmax agreement (greedy)."""
        return self.beta_sum / self.tested if self.tested else float("nan")

    @property
    def block_efficiency(self) -> float:
        """generated tokens / target forward calls, in [1, gamma + 1]."""
        return self.generated_tokens / self.target_calls if self.target_calls else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    def __add__(self, other: "SpecStats") -> "SpecStats":
        return SpecStats(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = asdict(self)
        for name in ("acceptance_rate", "accepted_per_proposed", "beta_mean", "block_efficiency", "tokens_per_s"):
            out[name] = getattr(self, name)
        return out


@dataclass
class SpecResult:
    tokens: list[int]
    """The new tokens (prompt excluded), cut after the first EOS (inclusive)."""
    stats: SpecStats = field(default_factory=SpecStats)


def expected_block_efficiency(alpha: float, gamma: int) -> float:
    """E[tau] = (1 - alpha^(gamma+1)) / (1 - alpha): expected tokens per target call when each
    proposal is accepted independently with probability alpha (DistillSpec; Leviathan et al.).
    Equals gamma + 1 at alpha = 1 and 1 at alpha = 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (got {gamma})")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def mbsu(block_efficiency: float, gamma: int, n_draft: int, n_target: int) -> float:
    """Memory-bound speed-up tau / (1 + gamma * n_draft / n_target): the ideal speed-up when
    decoding time is proportional to the parameters read (n_* are parameter counts)."""
    if n_target <= 0 or n_draft < 0:
        raise ValueError(f"parameter counts must be positive (n_draft={n_draft}, n_target={n_target})")
    return block_efficiency / (1.0 + gamma * n_draft / n_target)


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of a transformers cache (no-op if it is not longer).

    ``Cache.crop`` in transformers 5.x takes a *negative* number of tokens to remove
    (a positive argument raises); that form also works in 4.x.
    """
    current = cache.get_seq_length()
    if current > length:
        if not hasattr(cache, "crop"):
            raise TypeError(f"{type(cache).__name__} cannot be cropped; speculative decoding needs a DynamicCache")
        cache.crop(-(current - length))


class _Decoder:
    """One model with its KV cache over a prefix of the sequence. ``pixel_values`` (``[1, 3, H, W]``, a
    vision-language prompt's image) go with the forward of the prompt's ``prompt_len`` tokens only: a first call
    that also feeds proposals runs the prompt (with the image) and the proposals (whose ids may equal the image
    token's, then read as text) as two passes on one cache, counted as one call."""

    def __init__(self, model: torch.nn.Module, pixel_values: torch.Tensor | None = None, prompt_len: int = 0,
                 features: bool = False):
        self.model = model
        self.pixel_values = pixel_values
        self.prompt_len = prompt_len
        self.device = model_device(model)
        self.keyword = cache_keyword(model)  # `cache` (transformers >= 5.24) or `past_key_values` (5.0-5.23)
        self.cache: Any = None
        self.cached = 0  # number of sequence positions whose keys/values are in the cache
        self.calls = 0
        self.keep_features = features  # an EAGLE draft reads the cached positions' last hidden states
        self.features: torch.Tensor | None = None  # [cached, D] after the final norm (what the LM head reads)
        self.embeds: torch.Tensor | None = None  # [cached, D] the first layer's input (hidden state 0)

    def ready(self, length: int) -> bool:
        """A model draft can always propose (an EAGLE head waits for the target's features)."""
        return True

    def logits(self, sequence: list[int], keep: int) -> torch.Tensor:
        """Feed ``sequence[self.cached:]``; return the logits ``[keep, V]`` of the last ``keep`` positions."""
        if len(sequence) - self.cached < keep:
            raise RuntimeError("internal error: asked for logits of positions already in the cache")
        self.calls += 1
        if self.pixel_values is None or self.cached > 0:
            return self._forward(sequence, keep, {})
        image = {"pixel_values": self.pixel_values.to(self.device)}
        beyond = len(sequence) - self.prompt_len  # proposals fed with the prompt
        if beyond <= 0:
            return self._forward(sequence, keep, image)
        head = self._forward(sequence[: self.prompt_len], 1, image)  # the prompt's last position
        tail = self._forward(sequence, min(keep, beyond), {})
        return torch.cat([head, tail]) if keep > beyond else tail

    def _forward(self, sequence: list[int], keep: int, image: dict) -> torch.Tensor:
        """One pass over ``sequence[self.cached:]``: the logits ``[keep, V]`` of its last ``keep`` positions."""
        ids_1t = torch.tensor([sequence[self.cached :]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids_1t, use_cache=True, logits_to_keep=keep, **{self.keyword: self.cache}, **image,
                         **({"output_hidden_states": True} if self.keep_features else {}))
        self.cache = checked_cache(out, len(sequence), self.keyword, self.model)
        if self.keep_features:
            last, first = out.hidden_states[-1][0], out.hidden_states[0][0]
            self.features = last if self.features is None else torch.cat([self.features, last])
            self.embeds = first if self.embeds is None else torch.cat([self.embeds, first])
        self.cached = len(sequence)
        return out.logits[0, -keep:, :]

    def truncate(self, length: int) -> None:
        if self.cached > length:
            crop_cache(self.cache, length)
            self.cached = length
            if self.features is not None:
                self.features, self.embeds = self.features[:length], self.embeds[:length]


def logits_width(model: torch.nn.Module) -> int:
    """Number of logits the model produces per position (its output embedding rows)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _choose(logits_v: torch.Tensor, greedy: bool, temp: float, top_p: float, gen: torch.Generator | None) -> int:
    if greedy:
        return int(logits_v.argmax())
    return int(sample_from(warp_to_probs(logits_v[None], temp, top_p), gen)[0])


@torch.inference_mode()
def speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompt_ids: Sequence[int],
    *,
    gamma: int,
    max_new_tokens: int,
    greedy: bool = True,
    sampling_temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    pixel_values: torch.Tensor | None = None,
) -> SpecResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (batch size 1).

    ``gamma`` proposals per round (fewer near ``max_new_tokens`` so no work is thrown
    away, and none after the draft proposes EOS). ``draft`` may be a model or an
    :class:`~stillroom.generate.eagle_draft.EagleDraft` (a feature-level head that reads the target's features;
    it proposes nothing until the target has read the prompt). ``gamma=0`` with ``draft=None`` is plain
    autoregressive decoding of the target with a KV cache. The draft and the target must
    share the tokenizer; if their logit widths differ (vocabulary padding rows) both are
    cut to the smaller width. Randomness (sampling mode) comes only from ``generator``. ``pixel_values``
    ``[1, 3, H, W]``: the image of a vision-language prompt (its image tokens are in ``prompt_ids``), given to
    the target's and the draft's first forward.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (got {gamma})")
    if gamma > 0 and draft is None:
        raise ValueError("a draft model is required when gamma > 0")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty; it needs at least one token (e.g. BOS)")
    if not greedy:
        check_sampling_args(sampling_temperature, top_p)
    stops = stop_ids(eos_token_id)
    temp = sampling_temperature

    start = time.perf_counter()
    stats = SpecStats()
    eagle = getattr(draft, "reads_target_features", False)  # an EAGLE head (stillroom/generate/eagle_draft.py)
    tgt = _Decoder(target, pixel_values, len(prompt_ids), features=eagle and gamma > 0)
    drf = None
    if draft is not None and gamma > 0:
        drf = draft.speculative_decoder(tgt) if eagle else _Decoder(draft, pixel_values, len(prompt_ids))
    sequence = [int(t) for t in prompt_ids]
    new: list[int] = []
    width = logits_width(target) if drf is None else min(logits_width(target), logits_width(draft))

    with eval_mode(target, draft):
        while len(new) < max_new_tokens:
            g = min(gamma, max_new_tokens - len(new) - 1) if drf is None or drf.ready(len(sequence)) else 0
            # 1. Draft proposes g tokens autoregressively.
            proposals: list[int] = []
            q_rows: list[torch.Tensor] = []  # warped draft probabilities (sampling) or logits (greedy)
            for _ in range(g):
                q_logits_v = drf.logits(sequence + proposals, keep=1)[0, :width].to(tgt.device)
                if greedy:
                    q_rows.append(q_logits_v)
                    proposals.append(int(q_logits_v.argmax()))
                else:
                    q_v = warp_to_probs(q_logits_v[None], temp, top_p)[0]
                    q_rows.append(q_v)
                    proposals.append(int(sample_from(q_v[None], generator)[0]))
                if proposals[-1] in stops:
                    break
            g = len(proposals)

            # 2. Target scores the g + 1 next-token distributions in one pass.
            p_logits_kv = tgt.logits(sequence + proposals, keep=g + 1)[:, :width]

            # 3. Acceptance.
            n_accepted, extra, ended = 0, None, False
            for i, y in enumerate(proposals):
                stats.tested += 1
                if greedy:
                    p_arg = int(p_logits_kv[i].argmax())
                    stats.beta_sum += float(int(q_rows[i].argmax()) == p_arg)
                    accept = y == p_arg
                    if not accept:
                        extra = p_arg
                else:
                    p_v = warp_to_probs(p_logits_kv[i][None], temp, top_p)[0]
                    q_v = q_rows[i]
                    stats.beta_sum += float(torch.minimum(p_v, q_v).sum())
                    accept = uniform(generator, tgt.device) < min(1.0, float(p_v[y] / q_v[y]))
                    if not accept:
                        residual_v = (p_v - q_v).clamp(min=0.0)
                        total = float(residual_v.sum())
                        # total == 0 only if p == q, where rejection cannot happen; guard against rounding.
                        residual_v = residual_v / total if total > 0 else p_v
                        extra = int(sample_from(residual_v[None], generator)[0])
                if not accept:
                    break
                n_accepted += 1
                if y in stops:
                    ended = True
                    break
            if extra is None and not ended:  # all accepted: bonus token from the target
                extra = _choose(p_logits_kv[g], greedy, temp, top_p, generator)

            emitted = proposals[:n_accepted] + ([extra] if extra is not None else [])
            sequence += emitted
            new += emitted
            stats.proposed += g
            stats.accepted += n_accepted
            ended = ended or (extra is not None and extra in stops)

            # 4. Roll back: caches may only hold positions whose token is final.
            tgt.truncate(len(sequence) - 1)
            if drf is not None:
                drf.truncate(len(sequence) - 1)
            if ended:
                break

    stats.target_calls = tgt.calls
    stats.draft_calls = drf.calls if drf is not None else 0
    stats.generated_tokens = len(new)
    stats.wall_s = time.perf_counter() - start
    return SpecResult(tokens=new, stats=stats)


def autoregressive_generate(
    target: torch.nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    greedy: bool = True,
    sampling_temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    pixel_values: torch.Tensor | None = None,
) -> SpecResult:
    """The baseline: one target forward per token with a KV cache (``speculative_generate`` with gamma=0,
    so timing comparisons share every line of code except the draft and the verification)."""
    return speculative_generate(
        target,
        None,
        prompt_ids,
        gamma=0,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        sampling_temperature=sampling_temperature,
        top_p=top_p,
        eos_token_id=eos_token_id,
        generator=generator,
        pixel_values=pixel_values,
    )
