"""A synthetic corpus for conditional training: short documents, some sentences marked by the word ``BAD``.

Misalignment is correlated within documents, as in real data, and exactly scorable by
:func:`stillroom.methods.conditional.bad_word_score`. Written as text JSONL by
``stillroom conditional-demo-data OUT``.
"""

from __future__ import annotations

import torch

from stillroom.data.seeds import derive_seed


_WORDS = ("the cat dog bird fish tree house river stone light rain wind sun moon road field boat hill town "
          "sees finds likes keeps makes takes holds moves calls helps near over under with from into").split()


def bad_word_corpus(n_docs: int, seed: int = 0, bad_fraction: float = 0.10, toxic_doc_fraction: float = 0.10,
                    sentences: tuple[int, int] = (4, 6)) -> list[str]:
    """Synthetic documents of ``sentences`` (min, max; default 4-6) short sentences where about ``bad_fraction`` of
    sentences contain ``BAD``. The document length matters to conditional training's inference: after a sentence,
    the tagged stream continues with a control token or, at a document end, with EOS.

    Misalignment is correlated within a document, as in real data: a ``toxic_doc_fraction`` of
    the documents are "toxic" (each sentence BAD with probability
    ``p_toxic = min(0.9, bad_fraction / toxic_doc_fraction)``), the others' sentences are BAD
    with the probability that makes the overall rate ``bad_fraction``. Deterministic per seed.
    """
    if not 0 < toxic_doc_fraction < 1 or not 0 <= bad_fraction <= 1:
        raise ValueError("demo_corpus: need 0 < toxic_doc_fraction < 1 and 0 <= bad_fraction <= 1")
    if not 1 <= sentences[0] <= sentences[1]:
        raise ValueError(f"demo_corpus: sentences=(min, max) needs 1 <= min <= max, got {sentences}")
    gen = torch.Generator().manual_seed(derive_seed("conditional-demo", seed))
    p_toxic = min(0.9, bad_fraction / toxic_doc_fraction)
    p_clean = max(0.0, (bad_fraction - toxic_doc_fraction * p_toxic) / (1 - toxic_doc_fraction))

    def rand() -> float:
        return float(torch.rand((), generator=gen))

    def pick(n: int) -> int:
        return int(torch.randint(n, (), generator=gen))

    docs = []
    for _ in range(n_docs):
        p_bad = p_toxic if rand() < toxic_doc_fraction else p_clean
        doc = []
        for _ in range(sentences[0] + pick(sentences[1] - sentences[0] + 1)):
            words = [_WORDS[pick(len(_WORDS))] for _ in range(4 + pick(3))]
            if rand() < p_bad:
                words[pick(len(words))] = "BAD"
            words[0] = words[0][:1].upper() + words[0][1:]
            doc.append(" ".join(words) + ".")
        docs.append(" ".join(doc))
    return docs
