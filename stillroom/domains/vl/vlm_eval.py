"""What a VLM's report measures beyond the language-model metrics: exact-match answers and answers beside images.

:func:`answer_accuracy` answers each held-out question greedily (the batched KV-cached decoder of
:mod:`stillroom.generate.sampling`, the images on the prompt's forward) and checks the answer exactly
(:func:`stillroom.domains.vl.vqa.check_answer`: case, spacing and a final full stop ignored), overall and per
question family. :func:`write_generations_html` shows held-out images next to each model's answer.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from pathlib import Path

import torch

from stillroom.data.batch import Example, prompt_length
from stillroom.data.images import load_pixels
from stillroom.generate.sampling import eos_token_ids, sample_continuations
from stillroom.files import write_atomic


def prompt_and_pixels(example: Example, text_prompt_tokens: int = 24) -> tuple[list[int], torch.Tensor | None]:
    """The prompt ids of ``example`` (image tokens and question) and its pixels ``[1, 3, S, S]`` (``None`` for a
    text-only sequence; plain text, which has no prompt, is prompted by its first ``text_prompt_tokens``)."""
    cut = prompt_length(example.target, len(example.input_ids), text_prompt_tokens)
    return example.input_ids[:cut], None if example.image is None else load_pixels(example.image)[None]


def greedy_answers(model: torch.nn.Module, tokenizer, examples: list[Example], max_new_tokens: int,
                   batch_size: int = 16) -> list[str]:
    """The model's greedy answer to each example's prompt (new text only, special tokens dropped), ``batch_size``
    prompts at a time (left-padded, their images on the first forward: :func:`sample_continuations`)."""
    stops = eos_token_ids(tokenizer, model)
    answers = []
    for lo in range(0, len(examples), batch_size):
        prompts, images = zip(*(prompt_and_pixels(ex) for ex in examples[lo:lo + batch_size]))
        kept = [p for p in images if p is not None]
        new = sample_continuations(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, greedy=True,
                                   eos_token_id=stops, pixel_values=torch.cat(kept) if kept else None)
        answers += [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]
    return answers


def is_correct(example: Example, answer: str) -> bool:
    """Whether ``answer`` is the example's expected completion, by the VQA rules (``check_answer``)."""
    from stillroom.domains.vl.vqa import QA, check_answer

    meta = example.meta
    qa = QA(meta.get("prompt", ""), meta.get("completion", ""), meta.get("family", "all"), int(meta.get("level", 1)))
    return check_answer(qa, answer)


def answer_accuracy(model: torch.nn.Module, tokenizer, examples: list[Example], max_new_tokens: int,
                    answers: list[str] | None = None) -> dict[str, float]:
    """``answer_accuracy`` (all examples) and ``accuracy_<family>`` per question family, in ``[0, 1]``.

    Examples without an expected answer (``meta["completion"]``, e.g. captions) are skipped; ``answers``:
    the model's answers when already generated.
    """
    scored = [ex for ex in examples if "completion" in ex.meta]
    if not scored:
        return {}
    answers = answers if answers is not None else greedy_answers(model, tokenizer, scored, max_new_tokens)
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, answer in zip(scored, answers):
        ok = is_correct(ex, answer)
        hits["all"].append(ok)
        hits[str(ex.meta.get("family", "all"))].append(ok)
    out = {"answer_accuracy": sum(hits["all"]) / len(hits["all"])}
    for family in sorted(k for k in hits if k != "all"):
        out[f"accuracy_{family}"] = sum(hits[family]) / len(hits[family])
    return out


def _png_data_uri(path: str, scale: int = 4) -> str:
    from PIL import Image

    with Image.open(path) as img:
        big = img.convert("RGB").resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_generations_html(path: Path, examples: list[Example], answers: dict[str, list[str]]) -> None:
    """A table: each example's image, question, expected answer and every model's answer (✓/✗), written
    atomically to ``path``. ``answers``: model name -> one answer per example."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in answers)
    rows = []
    for i, ex in enumerate(examples):
        cells = []
        for name, texts in answers.items():
            mark = "&#10003;" if is_correct(ex, texts[i]) else "&#10007;"
            cells.append(f"<td>{html.escape(texts[i])} {mark}</td>")
        image = ex.meta.get("image_path") or (ex.image.path if ex.image else "")
        rows.append(f"<tr><td><img src='{_png_data_uri(image)}'></td><td>{html.escape(ex.meta.get('prompt', ''))}"
                    f"</td><td>{html.escape(str(ex.meta.get('completion', '')))}</td>{''.join(cells)}</tr>")
    page = ("<!doctype html><meta charset='utf-8'><title>VLM generations</title><style>td,th{border:1px solid #ccc;"
            "padding:4px;font-family:sans-serif}img{image-rendering:pixelated}</style><table><tr><th>image</th>"
            f"<th>question</th><th>expected</th>{head}</tr>{''.join(rows)}</table>\n")
    write_atomic(path, page)


def vlm_report(run_dir: Path, heldout: list[Example], models: dict[str, torch.nn.Module], tokenizer, *,
               questions: int, shown: int, max_new_tokens: int, log) -> dict[str, dict]:
    """Per model: exact-match answer accuracy (overall and per family) on the first ``questions`` held-out
    sequences, its first ``shown`` answers as the report's generations, and the page of answers beside their
    images (``run_dir/vlm_generations.html``, or ``vlm_generations_before.html`` before training)."""
    scored = [ex for ex in heldout[:questions] if "completion" in ex.meta]
    if not scored:  # e.g. captions: nothing to check exactly
        return {}
    out: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    for name, model in models.items():
        answers[name] = greedy_answers(model, tokenizer, scored, max_new_tokens)
        metrics = answer_accuracy(model, tokenizer, scored, max_new_tokens, answers=answers[name])
        out[name] = {**metrics, "generations": answers[name][:shown],
                     "prompts": [ex.meta.get("prompt", "") for ex in scored[:shown]]}
        log(f"eval {name}: answer accuracy {100 * metrics.get('answer_accuracy', float('nan')):.1f}% over "
            f"{len(scored)} held-out questions")
    if scored and shown and run_dir.is_dir():
        page = run_dir / ("vlm_generations.html" if "student_after" in models else "vlm_generations_before.html")
        write_generations_html(page, scored[:shown], {k: v[:shown] for k, v in answers.items()})
    return out
