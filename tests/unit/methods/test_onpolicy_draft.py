"""Draft data: target completions of chat prompts -> resumable store -> prompt/completion JSONL."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_llama

from stillroom.config.schema import DataConfig, DataSource
from stillroom.data import build_splits
from stillroom.data.prompts import read_prompts
from stillroom.datagen.draft_data import chat_prompts, generate_draft_data

RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a keyword."},
                  {"role": "assistant", "content": "def"}]},
    {"id": "q2", "messages": [{"role": "user", "content": "What is a list?"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"}]},
]


@pytest.fixture(scope="module")
def target(tok):
    return tiny_llama(len(tok), layers=2, seed=3)


def test_chat_prompts_end_at_the_last_user_turn(tok):
    items = chat_prompts(RECORDS, tok)
    assert [it["id"] for it in items] == ["0", "q2", "2"]
    assert items[0]["prompt"].endswith("Name a keyword.<|im_end|>\n<|im_start|>assistant\n")
    assert "def" not in items[0]["prompt"] and "Be brief." in items[0]["prompt"]
    assert "Hello" in items[2]["prompt"] and "1 2 3" not in items[2]["prompt"]


def test_chat_prompts_reject_records_without_a_user_turn(tok):
    with pytest.raises(ValueError, match=r"records\[0\].*messages"):
        chat_prompts([{"text": "plain"}], tok)
    with pytest.raises(ValueError, match="no user turn"):
        chat_prompts([{"messages": [{"role": "assistant", "content": "x"}]}], tok)


def test_generate_export_resume_and_train_on_completions_only(tok, target, tmp_path):
    out = tmp_path / "draft" / "data.jsonl"
    kw = dict(out=out, teacher_id="tiny", max_new_tokens=6, batch_size=2, seed=5)
    stats = generate_draft_data(target, tok, RECORDS, **kw)
    assert stats["samples_written"] == 3 and stats["exported"] <= 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(r) == {"id", "prompt", "completion"} for r in rows)
    first = out.read_text()

    again = generate_draft_data(target, tok, RECORDS, **kw)  # resumed: nothing left to generate
    assert again["samples_written"] == 0 and again["samples_skipped"] == 3
    assert out.read_text() == first

    fresh = tmp_path / "other" / "data.jsonl"
    generate_draft_data(target, tok, RECORDS, **{**kw, "out": fresh})
    assert fresh.read_text() == first  # seeded: the same texts in a separate run

    if rows:  # the export trains with format prompt_completion: prompt tokens are not targets
        splits = build_splits(DataConfig(sources=[DataSource(path=str(out))], seq_len=256, heldout_fraction=0.0), tok, 0)
        ex = splits.train[0]
        n_prompt = len(tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"])
        assert not any(ex.target[:n_prompt]) and all(ex.target[n_prompt:])


def test_chat_prompts_of_bundled_instructions_follow_the_data_seed():
    recs = read_prompts("bundled:instructions", 5, seed=1, kinds=("messages",))
    assert len(recs) == 5 and all(isinstance(r.prompt, list) and r.prompt[-1]["role"] == "user" for r in recs)
    assert recs != read_prompts("bundled:instructions", 5, seed=2, kinds=("messages",))
