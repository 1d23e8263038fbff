"""Data sets that ship with the package (no download).

* ``pydoc``: the documents of ``pydoc_data.topics.topics`` (79 topics, about
  465k characters of English prose that ships with CPython), cut at blank lines
  into sections of about 2,000 characters, in sorted topic order:
  ``{"text", "topic", "part"}`` (see :func:`pydoc_sections`).
* ``instructions``: a generated instruction set in ``messages`` format built
  from templates over the pydoc topics. Every answer is derivable from the text
  in the prompt (upper-casing, word counts, word reversal, first sentence,
  picking the topic among listed options, long-word listing). Deterministic for
  a seed; about a quarter have a system turn and about one in eight has two
  user/assistant exchanges. Default size 400 (``limit`` changes it).
* ``arithmetic``: generated word problems with rationales, from
  :func:`stillroom.data.arithmetic.generate_problems`. Its records carry both
  ``messages`` and ``prompt``/``completion``, so format inference picks
  ``messages`` (the chat template); set the source's ``format:
  prompt_completion`` for plain text. Default size 1000 (``limit`` changes it).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Callable, Iterator

from stillroom.data.errors import DataError

DEFAULT_INSTRUCTIONS = 400
DEFAULT_ARITHMETIC = 1000

SYSTEM_PROMPTS = (
    "You are a concise assistant.",
    "You are a helpful assistant that answers exactly what is asked.",
)


def bundled_records(name: str, seed: int, limit: int | None = None) -> Iterator[tuple[dict, str]]:
    """``(fields, where)`` of each record of the bundled set ``name`` (``pydoc``, ``instructions``,
    ``arithmetic``), in order; :mod:`stillroom.data.readers` numbers them."""
    if name == "pydoc":
        return _pydoc(limit)
    if name == "instructions":
        return _as_records("instructions", generate_instructions(limit or DEFAULT_INSTRUCTIONS, seed))
    if name == "arithmetic":
        try:
            from stillroom.data.arithmetic import generate_problems
        except ImportError as e:
            raise DataError(f"bundled:arithmetic is not available ({e})") from None
        return _as_records("arithmetic", generate_problems(limit or DEFAULT_ARITHMETIC, seed))
    raise DataError(f"unknown bundled data set {name!r}; use pydoc, instructions or arithmetic")


def _as_records(tag: str, items: list[dict]) -> Iterator[tuple[dict, str]]:
    for i, item in enumerate(items):
        yield dict(item), f"bundled:{tag}[{i}]"


@lru_cache(maxsize=1)
def pydoc_topics() -> tuple[tuple[str, str], ...]:
    """``(topic, text)`` pairs of ``pydoc_data.topics.topics`` in sorted key order."""
    from pydoc_data.topics import topics

    return tuple((k, topics[k]) for k in sorted(topics))


PYDOC_SECTION_CHARS = 2000


def pydoc_sections(max_chars: int = PYDOC_SECTION_CHARS) -> list[tuple[str, int, str]]:
    """``(topic, part, text)``: each topic cut at blank lines into sections of about
    ``max_chars`` characters. Sections (not whole topics) are the records, so the
    hash-based held-out split draws from many topics and wastes little text (whole
    topics range from 100 to 40k characters)."""
    out = []
    for key, text in pydoc_topics():
        part, current = 0, ""
        for block in re.split(r"(\n\s*\n)", text):
            if current and len(current) + len(block) > max_chars and current.strip():
                out.append((key, part, current.strip("\n")))
                part, current = part + 1, ""
            current += block
        if current.strip():
            out.append((key, part, current.strip("\n")))
    return out


def _pydoc(limit: int | None) -> Iterator[tuple[dict, str]]:
    for i, (key, part, text) in enumerate(pydoc_sections()):
        if limit is not None and i >= limit:
            return
        yield {"text": text, "topic": key, "part": part}, f"bundled:pydoc[{key}#{part}]"


# ---------------------------------------------------------------- instructions

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose: no title underlines, code, grammar or list blocks."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(ln.startswith(" ") for ln in lines):  # indented code, grammar, quoted blocks
            continue
        if len(lines) >= 2 and set(lines[-1].strip()) <= set("*=-~^"):  # a heading
            continue
        para = " ".join(ln.strip() for ln in lines).strip()
        if len(para.split()) >= 8 and para[-1] in ".:" and not para.startswith(("*", "-", "+")):
            out.append(para)
    return out


@lru_cache(maxsize=1)
def _corpus() -> tuple[list[str], dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    """topics, prose paragraphs per topic, sentences per topic, title per topic."""
    keys, paragraphs, sentences, titles = [], {}, {}, {}
    for key, text in pydoc_topics():
        paras = _prose_paragraphs(text)
        sents = [s for p in paras for s in _SENTENCE_END.split(p) if 6 <= len(s.split()) <= 30 and s.endswith(".")]
        if not paras or not sents:
            continue
        keys.append(key)
        paragraphs[key] = paras
        sentences[key] = sents
        titles[key] = text.split("\n", 1)[0].strip()
    return keys, paragraphs, sentences, titles


def _t_upper(rng: random.Random, key: str) -> tuple[str, str]:
    s = rng.choice(_corpus()[2][key])
    return f"Rewrite the following sentence in upper case.\n\n{s}", s.upper()


def _t_count(rng: random.Random, key: str) -> tuple[str, str]:
    s = rng.choice(_corpus()[2][key])
    n = len(s.split())
    return f"How many words does this sentence have (split on spaces)?\n\n{s}", f"The sentence has {n} words."


def _t_reverse(rng: random.Random, key: str) -> tuple[str, str]:
    s = rng.choice(_corpus()[2][key])
    return f"Reverse the order of the words in this sentence.\n\n{s}", " ".join(reversed(s.split()))


def _t_first_sentence(rng: random.Random, key: str) -> tuple[str, str]:
    para = rng.choice(_corpus()[1][key])
    first = _SENTENCE_END.split(para)[0]
    return f"Quote the first sentence of this paragraph.\n\n{para}", first


def _t_long_words(rng: random.Random, key: str) -> tuple[str, str]:
    s = rng.choice(_corpus()[2][key])
    seen: list[str] = []
    for w in (w.strip(".,;:()\"'") for w in s.split()):
        if len(w) > 7 and w not in seen:
            seen.append(w)
    answer = ", ".join(seen) if seen else "There are no words longer than seven letters."
    return f"List, in order and separated by commas, the distinct words longer than seven letters in:\n\n{s}", answer


def _t_topic(rng: random.Random, key: str) -> tuple[str, str]:
    keys, paragraphs, _, titles = _corpus()
    para = rng.choice(paragraphs[key])
    pool = sorted({titles[k] for k in keys} - {titles[key]})  # distinct titles, so one option is right
    options = rng.sample(pool, 3) + [titles[key]]
    rng.shuffle(options)
    listed = "\n".join(f"- {o}" for o in options)
    prompt = f"Which section of the Python documentation is this passage from?\n\n{para}\n\nOptions:\n{listed}"
    return prompt, titles[key]


TEMPLATES: tuple[Callable[[random.Random, str], tuple[str, str]], ...] = (
    _t_upper,
    _t_count,
    _t_reverse,
    _t_first_sentence,
    _t_long_words,
    _t_topic,
)


def generate_instructions(n: int, seed: int) -> list[dict]:
    """``n`` chat records ``{"messages": [...], "template": name}``, deterministic per ``seed``."""
    if n < 1:
        raise ValueError(f"generate_instructions: n must be >= 1, got {n}")
    rng = random.Random(f"stillroom-instructions-{seed}")
    keys = _corpus()[0]
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        turns = 2 if rng.random() < 0.125 else 1
        names = []
        for _ in range(turns):
            template = rng.choice(TEMPLATES)
            prompt, answer = template(rng, rng.choice(keys))
            messages.append({"role": "user", "content": prompt})
            messages.append({"role": "assistant", "content": answer})
            names.append(template.__name__[3:])
        out.append({"messages": messages, "template": "+".join(names)})
    return out
