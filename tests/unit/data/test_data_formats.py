"""Target masks: exact prompt/completion boundaries, assistant-only chat masks."""

from __future__ import annotations

import pytest

from stillroom.config.schema import DataSource
from stillroom.data import BadRecord, DataError
from stillroom.data.formats import TextEncoder, encode_record, infer_format

SRC = DataSource(bundled="pydoc")


def test_text_all_targets_and_eos(tiny_tokenizer):
    enc = TextEncoder(tiny_tokenizer, add_eos=True)
    out = encode_record({"text": "The assert statement."}, "text", SRC, enc)
    ids = tiny_tokenizer("The assert statement.", add_special_tokens=False)["input_ids"]
    assert out.input_ids == ids + [tiny_tokenizer.eos_token_id]
    assert all(out.target)
    no_eos = encode_record({"text": "The assert statement."}, "text", SRC, TextEncoder(tiny_tokenizer, add_eos=False))
    assert no_eos.input_ids == ids


def test_prompt_completion_boundary_is_exact(tiny_tokenizer):
    enc = TextEncoder(tiny_tokenizer, add_eos=True)
    prompt, completion = "Q: what does assert do?\nA:", " It raises AssertionError."
    out = encode_record({"prompt": prompt, "completion": completion}, "prompt_completion", SRC, enc)
    p = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tiny_tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert out.input_ids == p + c + [tiny_tokenizer.eos_token_id]
    assert out.target == [False] * len(p) + [True] * (len(c) + 1)


def test_bos_prefix_only_when_the_tokenizer_adds_it(bos_tokenizer, tiny_tokenizer):
    enc = TextEncoder(bos_tokenizer, add_eos=True)
    assert enc.bos_prefix == [bos_tokenizer.bos_token_id]
    out = encode_record({"prompt": "a b", "completion": " c"}, "prompt_completion", SRC, enc)
    assert out.input_ids[0] == bos_tokenizer.bos_token_id and out.target[0] is False
    assert out.input_ids.count(bos_tokenizer.bos_token_id) == 1
    text = encode_record({"text": "word"}, "text", SRC, enc)
    assert text.input_ids[0] == bos_tokenizer.bos_token_id and text.target == [False] + [True] * (len(text.target) - 1)
    assert TextEncoder(tiny_tokenizer, add_eos=True).bos_prefix == []


def _targets_text(tok, out) -> str:
    """Decode the target tokens run by run, joined with '|'."""
    runs, run = [], []
    for i, f in zip(out.input_ids, out.target):
        if f:
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
    if run:
        runs.append(tok.decode(run))
    return "|".join(runs)


def test_messages_assistant_only_mask(tiny_tokenizer):
    enc = TextEncoder(tiny_tokenizer, add_eos=True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a statement."},
        {"role": "assistant", "content": "The assert statement."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "The pass statement."},
    ]
    out = encode_record({"messages": messages}, "messages", SRC, enc)
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(out.input_ids) == full
    assert _targets_text(tiny_tokenizer, out) == "The assert statement.<|im_end|>\n|The pass statement.<|im_end|>\n"
    assert tiny_tokenizer.eos_token_id not in out.input_ids  # add_eos does not apply to chat


def test_messages_assistant_first_turn(tiny_tokenizer):
    enc = TextEncoder(tiny_tokenizer, add_eos=True)
    out = encode_record(
        {"messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi."}]},
        "messages",
        SRC,
        enc,
    )
    assert _targets_text(tiny_tokenizer, out) == "<|im_start|>assistant\nHello.<|im_end|>\n"


def test_messages_template_breaking_prefix_property_is_an_error(tiny_tokenizer):
    # A template that rewrites earlier assistant turns once another turn follows.
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = TextEncoder(tiny_tokenizer, add_eos=True)
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(DataError, match="not prefix-consistent at assistant turn 1"):
        encode_record({"messages": messages}, "messages", SRC, enc)


def test_messages_bad_records(tiny_tokenizer):
    enc = TextEncoder(tiny_tokenizer, add_eos=True)
    with pytest.raises(BadRecord, match="no assistant turn"):
        encode_record({"messages": [{"role": "user", "content": "x"}]}, "messages", SRC, enc)
    with pytest.raises(BadRecord, match=r"messages\[0\] must be an object with string 'role' and 'content'"):
        encode_record({"messages": [{"role": "user"}]}, "messages", SRC, enc)
    with pytest.raises(BadRecord, match="non-empty list"):
        encode_record({"messages": []}, "messages", SRC, enc)


def test_messages_need_a_chat_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    enc = TextEncoder(tiny_tokenizer, add_eos=True)
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(DataError, match="chat template"):
        encode_record({"messages": msgs}, "messages", SRC, enc)


def test_infer_format():
    src = DataSource(path="x.jsonl")
    assert infer_format({"messages": [], "text": "t"}, src, "x", "x:1") == "messages"
    assert infer_format({"prompt": "p", "completion": "c", "text": "t"}, src, "x", "x:1") == "prompt_completion"
    assert infer_format({"text": "t", "prompt": "p"}, src, "x", "x:1") == "text"
    custom = DataSource(path="x.jsonl", text_field="body")
    assert infer_format({"body": "t"}, custom, "x", "x:1") == "text"
    with pytest.raises(DataError, match=r"x:1.*\['body'\]"):
        infer_format({"body": "t"}, src, "x", "x:1")


def test_tokenizer_without_eos_needs_add_eos_false(tiny_tokenizer):
    tiny_tokenizer.eos_token = None
    with pytest.raises(DataError, match="add_eos=false"):
        TextEncoder(tiny_tokenizer, add_eos=True)
    TextEncoder(tiny_tokenizer, add_eos=False)
