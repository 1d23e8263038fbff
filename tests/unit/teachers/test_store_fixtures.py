"""Synthetic examples and a deterministic fake teacher for the store tests (helpers only, no tests here)."""

from __future__ import annotations

import torch

from stillroom.data.batch import Example
from stillroom.teachers.store_format import SequenceSignal
from stillroom.teachers.store_sampled import topk_signal
from stillroom.teachers.store_writer import make_header

V = 300
H = 8


def examples(n: int = 40, seed: int = 0, min_len: int = 5, max_len: int = 40) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, V, (length,), generator=g).tolist()
        target = [True] * length
        if i % 3 == 0:  # a prompt part that is not learned
            target[: length // 2] = [False] * (length // 2)
        out.append(Example(input_ids=ids, target=target, uid=f"src:{i}:{seed}", n_bytes=3 * length))
    return out


class FakeTeacher:
    """Logits and hidden states as fixed random functions of the (previous, current) token pair."""

    def __init__(self, seed: int = 1, scale: float = 4.0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g) * scale
        self.shift = torch.randn(V, V, generator=g)
        self.hidden = {0: torch.randn(V, H, generator=g), 2: torch.randn(V, H, generator=g)}

    def logits(self, ids: list[int]) -> torch.Tensor:
        cur = torch.tensor(ids)
        prev = torch.tensor([0] + ids[:-1])
        return self.table[cur] + 0.5 * self.shift[prev, cur].unsqueeze(-1)

    def compute(self, k: int, temperature: float = 1.0, layers=(0, 2)):
        def fn(exs: list[Example]) -> list[SequenceSignal]:
            rows = []
            for e in exs:
                ids, lp, tail = topk_signal(self.logits(e.input_ids), k, temperature)
                hidden = {i: self.hidden[i][torch.tensor(e.input_ids)] for i in layers}
                rows.append(SequenceSignal(e.uid, ids, lp, tail, hidden))
            return rows

        return fn


def header(exs, *, k=16, logprob_dtype="float16", temperature=1.0, layers=(0, 2), shard_tokens=200,
           tokenizer_hash="a" * 64, teacher="local:/t@local#sha256:0123456789abcdef"):
    return make_header(exs, teacher_identity=teacher, tokenizer_hash=tokenizer_hash, vocab_size=V, k=k,
                       loss_temperature=temperature, logprob_dtype=logprob_dtype, hidden_layers=list(layers),
                       hidden_size=H, shard_tokens=shard_tokens)
