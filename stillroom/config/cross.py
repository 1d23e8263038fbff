"""Settings and run checks of cross-tokenizer distillation (``teacher.tokenizer_mode: cross``).

See ``docs/methods/cross_tokenizer.md``: the teacher reads the student's text in its own
tokens, positions align where both have read the same text, and the loss compares the
distributions on their same-spelling tokens (any divergence term) and by rank (``uld``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from stillroom.config.base import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

CROSS_SOURCES = ("online", "store", "remote", "ensemble")
"""Teacher sources that read another tokenizer's text (every one)."""
TOPK_SOURCES = ("store", "remote")
"""Sources that give the teacher's top k log-probabilities at temperature 1 (not its whole distribution)."""


class CrossConfig(Strict):
    rank_k: int | None = Field(
        None, ge=1, description="ULD: rank at most this many teacher probabilities per position (null: "
        "min(V_s, V_t) over the support, which makes ULD exact; smaller saves memory and makes the tail bin "
        "a lower bound).")
    chunk_rows: int = Field(
        256, ge=1, description="Aligned positions projected through the teacher's output head at a time: bounds "
        "the teacher's logits to chunk_rows x V_t (a 256k vocabulary at 256 rows: 256 MiB in fp32).")
    vocab_map: Literal["exact", "min_edit_distance"] = Field(
        "exact", description="Which student token each teacher token's probability counts for. exact: the "
        "student token spelling the same bytes (teacher tokens without one are the 'unmatched' mass, for uld). "
        "min_edit_distance (FuseLLM's MinED): every teacher token counts for the student token spelled closest "
        "to it (Levenshtein on bytes; identical first, then the longest common prefix, then the lowest id; "
        "special tokens by content or role) and the probabilities are summed per student token, so the "
        "matched distribution covers the whole teacher mass and uld support: unmatched is refused. Needs "
        "rapidfuzz (pip install 'stillroom[cross]'); the map is cached under the run's cache_dir.")
    chat_template: Literal["student", "own"] = Field(
        "student", description="Chat (messages) records. student: the teacher reads the student's rendering "
        "(right when the templates agree, e.g. with student.new_tokenizer). own: each side renders the messages "
        "with its own chat template and positions align inside the message contents only (chat records are "
        "one sequence each in a cross run; docs/methods/cross_tokenizer.md).")


class NewTokenizer(Strict):
    """A byte-level BPE trained for the student on the run's training text (stillroom/models/new_tokenizer.py)."""

    vocab_size: int = Field(8192, ge=300, description="Tokens in the new vocabulary (256 byte tokens, the teacher's "
                            "special tokens, then merges).")
    min_frequency: int = Field(2, ge=1, description="A merge must occur at least this often in the training text.")


def check_cross_run(cfg: "RunConfig") -> None:
    """What a cross-tokenizer run needs, checked when the recipe loads (errors name the key and the fix)."""
    from stillroom.losses.registry import get_term

    cross = cfg.teacher.tokenizer_mode == "cross"
    uld = [t for t in cfg.loss.terms if t.name == "uld"]
    if not cross and (cfg.student.tokenizer or cfg.student.new_tokenizer is not None):
        raise ValueError("student.tokenizer / student.new_tokenizer give the student its own tokenizer; set "
                         "teacher.tokenizer_mode: cross to distill across tokenizers")
    if not cross:
        if uld:
            raise ValueError("loss.terms has 'uld', which compares a teacher with another tokenizer; set "
                             "teacher.tokenizer_mode: cross (or use a divergence such as forward_kl)")
        return
    if cfg.domain != "lm" or cfg.vlm is not None:
        raise ValueError("teacher.tokenizer_mode=cross distills causal language models (domain: lm, no vlm section)")
    if cfg.teacher.source not in CROSS_SOURCES:
        raise ValueError(f"teacher.tokenizer_mode=cross works with teacher.source in {CROSS_SOURCES}, "
                         f"not {cfg.teacher.source!r}")
    sources = [m.source for m in cfg.teacher.ensemble] if cfg.teacher.source == "ensemble" else [cfg.teacher.source]
    if uld and cfg.teacher.source == "ensemble" and cfg.teacher.ensemble_mode == "average":
        raise ValueError("loss.terms has 'uld', which compares ranked probabilities; an averaged cross-tokenizer "
                         "ensemble has no ranks to give (the ranks of a mixture are not the mixture of ranks). Use "
                         "teacher.ensemble_mode: route, or a divergence on the matched tokens (forward_kl, ...)")
    if cfg.teacher.source == "ensemble" and "ensemble" in sources:
        raise ValueError("teacher.ensemble: a cross-tokenizer ensemble's members are online, store or remote "
                         "teachers, not ensembles")
    if uld and cfg.loss.loss_temperature != 1.0 and any(s in TOPK_SOURCES for s in sources):
        raise ValueError(f"loss.terms has 'uld' and loss.loss_temperature is {cfg.loss.loss_temperature}, but a "
                         "store or remote cross-tokenizer teacher gives its top-k log-probabilities at temperature "
                         "1, whose ranked probabilities cannot be re-tempered; set loss.loss_temperature: 1 or use "
                         "teacher.source: online")
    if cfg.teacher.cross.vocab_map == "min_edit_distance" and any(
            t.params.get("support", "all") == "unmatched" for t in uld):
        raise ValueError("loss.terms has 'uld' with support: unmatched, but teacher.cross.vocab_map: "
                         "min_edit_distance maps every teacher token to a student token, so the unmatched "
                         "teacher mass is (nearly) empty; use uld with support: all, drop it (the divergence on "
                         "the matched tokens then sees the whole teacher distribution), or vocab_map: exact")
    s = cfg.student
    if s.tokenizer and s.new_tokenizer is not None:
        raise ValueError("set one of student.tokenizer (a tokenizer folder) and student.new_tokenizer (train one)")
    if s.model is None and not (s.from_config is not None and (s.tokenizer or s.new_tokenizer is not None)):
        raise ValueError("teacher.tokenizer_mode=cross needs the student's own tokenizer: set student.model (a "
                         "folder with its tokenizer), or student.from_config together with student.tokenizer "
                         "(a tokenizer folder) or student.new_tokenizer (a BPE trained on the run's text); "
                         "student.from_teacher would share the teacher's tokenizer")
    for term in cfg.loss.terms:
        spec = get_term(term.name)
        if spec.kind != "logit":
            raise ValueError(f"loss.terms: {term.name!r} compares hidden states or attentions position by position; "
                             "with teacher.tokenizer_mode=cross the positions differ. Use logit terms (a divergence "
                             "on the matched tokens, uld)")
