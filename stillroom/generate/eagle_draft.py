"""An EAGLE head as the draft of the lossless speculative decoder (:func:`~stillroom.generate.speculative.\
speculative_generate`).

The head drafts in feature space: to propose token ``n`` for a sequence of ``n`` tokens it needs the target's
feature ``f_{n-2}`` and the token ``x_{n-1}``; its predicted feature ``f^_{n-1}`` gives the proposal through the
target's LM head, and the next proposal reads ``f^_{n-1}`` with the proposal's embedding, and so on. The target's
verification forward (unchanged: the acceptance rule is the decoder's) returns the features of every position it
read; those of accepted tokens replace the predicted ones, so after each round the head's KV cache is cut back to
the positions it computed from the target's own features, and the next round recomputes the rest from them.

Round one proposes nothing (``ready`` is false until the target has read the prompt): the target's first forward
emits one token, as EAGLE's prefill does. The embedding of a token the target has read is the target's own input
to its first layer (its hidden state 0, which for a VLM holds the image features at the image tokens); a drafted
token's is the target's input embedding of its id.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stillroom.generate.eagle_head import EagleHead, check_head
from stillroom.generate.sampling import model_device
from stillroom.generate.speculative import crop_cache


class EagleDraft(torch.nn.Module):
    """``head`` + the target it drafts for, in the draft's place of ``speculative_generate`` and ``spec-eval``.

    The target is held outside the module's children: ``parameters()`` are the head's (the draft's own size
    for MBSU; the LM head and embedding it borrows are the target's). The head stays where it is (a head in
    training keeps its optimizer's device); features go to it and its predictions come back."""

    reads_target_features = True

    def __init__(self, head: EagleHead, target: torch.nn.Module):
        super().__init__()
        check_head(head, target)
        self.head = head
        self._target = (target,)  # not a submodule: its weights are not the draft's
        self.config = target.config

    @property
    def target(self) -> torch.nn.Module:
        return self._target[0]

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.target.get_output_embeddings()

    def speculative_decoder(self, target_decoder) -> "EagleDecoder":
        """The per-generation drafting state over ``target_decoder`` (the decoder's ``_Decoder`` of the target,
        built with ``features=True``)."""
        if target_decoder.model is not self.target:
            raise ValueError("this EAGLE draft was built for another target model than the one decoding; build "
                             "EagleDraft(head, target) with the target passed to speculative_generate")
        return EagleDecoder(self, target_decoder)


class EagleDecoder:
    """The head's KV cache and predicted features over a prefix of one sequence (module docstring)."""

    def __init__(self, draft: EagleDraft, target_decoder):
        self.head = draft.head
        self.embed = draft.target.get_input_embeddings()
        self.lm_head = draft.target.get_output_embeddings()
        self.tgt = target_decoder
        self.device = target_decoder.device
        self.head_device = model_device(self.head)
        self.cache = self.head.new_cache()
        self.cached = 0  # head positions in the cache
        self.real = 0  # of those, the first ``real`` were computed from the target's features (never cut)
        self.predicted: dict[int, torch.Tensor] = {}  # position -> the head's predicted feature there [D]
        self.calls = 0

    def ready(self, length: int) -> bool:
        """Whether a proposal for a sequence of ``length`` tokens can be drafted: the target has read every
        position but the last (its features ``f_0..f_{length-2}`` are known)."""
        return length >= 2 and self.tgt.features is not None and self.tgt.features.shape[0] >= length - 1

    def logits(self, sequence: Sequence[int], keep: int) -> torch.Tensor:
        """Feed head positions ``self.cached .. len(sequence) - 2``; return logits ``[keep, V]`` of the last
        ``keep`` of them (the distributions of tokens ``len(sequence) - keep + 1 .. len(sequence)``)."""
        n = len(sequence)
        first, last = self.cached, n - 2  # head rows to compute, inclusive
        if last - first + 1 < keep:
            raise RuntimeError("internal error: asked for draft logits of positions already in the head's cache")
        self.calls += 1
        known = self.tgt.features.shape[0]  # positions whose target feature is known (and final)
        feats = [self.tgt.features[first:min(known, last + 1)]]
        feats += [self.predicted[p][None] for p in range(max(first, known), last + 1)]
        emb_known = self.tgt.embeds.shape[0]  # the target's own input embeddings of the tokens it has read
        embeds = [self.tgt.embeds[first + 1:min(emb_known, last + 2)]]
        fresh = sequence[max(first + 1, emb_known):last + 2]
        if fresh:
            embeds.append(self.embed(torch.tensor(list(fresh), dtype=torch.long, device=self.device)))
        f_td, e_td = (torch.cat([x.to(self.head_device) for x in parts]) for parts in (feats, embeds))
        out_td = self.head(f_td[None], e_td[None], cache=self.cache, start=first)[0]
        self.cached = last + 1
        self.real = max(self.real, min(known, last + 1))
        self.predicted[last + 1] = out_td[-1]
        return self.lm_head(out_td[-keep:].to(self.device, self.lm_head.weight.dtype))

    def truncate(self, _length: int) -> None:
        """Cut the cache back to the positions computed from the target's features: the others read predicted
        features, which the target's verified ones replace on the next call (the decoder's length is not the
        head's bound here: position t is final once ``f_t`` is the target's)."""
        keep = min(self.real, self.tgt.features.shape[0] if self.tgt.features is not None else 0)
        if self.cached > keep:
            crop_cache(self.cache, keep)
            self.cached = keep
        self.real = keep
        self.predicted = {}  # only a round's own drafting reads them


def eagle_draft_from(head_or_folder, target: torch.nn.Module) -> EagleDraft:
    """An :class:`EagleDraft` from a head or a head folder, checked against ``target``, on its device and in its
    dtype."""
    from stillroom.generate.eagle_head import load_head

    head = head_or_folder if isinstance(head_or_folder, EagleHead) else load_head(head_or_folder, target)
    first = next(target.parameters())
    return EagleDraft(head.to(device=first.device, dtype=first.dtype), target)
