"""Shared pieces of the CPU-scale reproductions (``bench/reproduce.py METHOD``).

Every reproduction trains tiny models from scratch (spec Appendix B: 1-6 layers, d <= 256,
vocab <= 512) on data generated here, for at least 3 seeds, and reports mean +- std. The
models are real Hugging Face Llama models and the tokenizers real ``PreTrainedTokenizerFast``
objects, saved to disk so that stillroom's own commands (``stillroom.run.run``) can
train them exactly as a user would.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

RESULTS = Path(__file__).resolve().parents[1] / "results"
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def char_tokenizer(texts: Iterable[str] | str, extra_special: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the characters of ``texts`` (plus ``<pad>``, ``<eos>``,
    ``<unk>`` and ``extra_special``). Deterministic: the vocabulary is sorted."""
    if isinstance(texts, str):
        texts = [texts]
    chars = sorted({c for t in texts for c in t})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *extra_special, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=list(extra_special) or None)
    return fast


def tiny_llama(vocab_size: int, *, layers: int = 2, hidden: int = 64, heads: int = 4, seed: int = 0,
               max_positions: int = 512, eos_id: int = 1, pad_id: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama (tied embeddings) seeded by ``seed``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    return LlamaForCausalLM(cfg).eval()


def save_model(model, tokenizer, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def run_stillroom(config: dict, *, quiet: bool = True) -> Path:
    """Validate ``config`` (a RunConfig as a dict) and run it with ``stillroom.run.run``."""
    from stillroom.config.schema import RunConfig
    from stillroom.run import run

    cfg = RunConfig.model_validate(config)
    return run(cfg, log=(lambda _m: None) if quiet else print)


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 64,
                    prefix_ids: Sequence[int] = (), bad_words_ids: list[list[int]] | None = None) -> list[str]:
    """Greedy continuations (decoded, special tokens skipped) of ``prompts``, left-padded batches."""
    model.eval()
    out: list[str] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(prompts), batch_size):
        enc = [list(prefix_ids) + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for j, e in enumerate(enc):
            ids[j, width - len(e):] = torch.tensor(e)
            att[j, width - len(e):] = 1
        gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, bad_words_ids=bad_words_ids)
        out.extend(tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std (n=k)``."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def save_result(method: str, result: dict) -> Path:
    """``bench/results/repro_<method>.json`` with the raw per-seed numbers, the table and the verdict."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"repro_{method}.json"
    result = {"method": method, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    path.write_text(json.dumps(result, indent=2, default=lambda x: x if not isinstance(x, float) or math.isfinite(x) else str(x)))
    return path
