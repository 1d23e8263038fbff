"""build_splits: packing exactness, held-out determinism and disjointness, caps, truncation, bytes."""

from __future__ import annotations

import json

import pytest

from stillroom.config.schema import DataConfig, DataSource
from stillroom.data import DataError, build_splits
from stillroom.data.records import is_heldout, record_key

WORDS = "assert class def return yield lambda import global while break continue pass raise".split()


def _docs(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(5 + (i * 7) % 23)) + "." for i in range(n)]


def _jsonl(tmp_path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_text_packing_is_exact(tmp_path, tiny_tokenizer):
    docs = _docs(40)
    path = _jsonl(tmp_path, "docs.jsonl", [{"text": d} for d in docs])
    cfg = DataConfig(sources=[DataSource(path=path)], seq_len=32, heldout_fraction=0.25, heldout_max=1000)
    splits = build_splits(cfg, tiny_tokenizer, seed=0)
    eos = tiny_tokenizer.eos_token_id
    encoded = [tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in docs]
    keys = [record_key("docs", i, {"text": d}) for i, d in enumerate(docs)]
    held = [i for i in range(len(docs)) if is_heldout(keys[i], 0.25)]
    assert 0 < len(held) < len(docs)
    train_stream = [t for i, ids in enumerate(encoded) if i not in held for t in ids]
    held_stream = [t for i in sorted(held, key=lambda i: keys[i]) for t in encoded[i]]

    assert all(len(e.input_ids) == 32 and all(e.target) for e in splits.train + splits.heldout)
    got_train = [t for e in splits.train for t in e.input_ids]
    got_held = [t for e in splits.heldout for t in e.input_ids]
    assert got_train == train_stream[: len(train_stream) // 32 * 32]
    assert got_held == held_stream[: len(held_stream) // 32 * 32]
    s = splits.stats
    assert s["packed_tail_tokens_dropped"] == len(train_stream) % 32 + len(held_stream) % 32
    assert s["train_tokens"] == len(got_train) and s["heldout_records"] == len(held)
    assert s["train_target_tokens"] == 31 * len(splits.train)
    assert len({e.uid for e in splits.train + splits.heldout}) == len(splits.train) + len(splits.heldout)


def test_heldout_is_deterministic_disjoint_and_seed_independent(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Question {i}:", "completion": f" answer {i}."} for i in range(200)]
    path = _jsonl(tmp_path, "qa.jsonl", rows)
    cfg = DataConfig(sources=[DataSource(path=path)], seq_len=32, heldout_fraction=0.2, heldout_max=1000)
    a = build_splits(cfg, tiny_tokenizer, seed=0)
    b = build_splits(cfg, tiny_tokenizer, seed=123)
    assert [e.uid for e in a.heldout] == [e.uid for e in b.heldout]
    assert [e.uid for e in a.train] == [e.uid for e in b.train]
    train_recs = {e.meta["record"] for e in a.train}
    held_recs = {e.meta["record"] for e in a.heldout}
    assert not train_recs & held_recs and train_recs | held_recs == set(range(200))
    assert 20 <= len(held_recs) <= 60  # about 20% of 200
    # Appending records never moves an existing record across the split.
    path2 = _jsonl(tmp_path, "qa.jsonl", rows + [{"prompt": f"Extra {i}:", "completion": " x."} for i in range(50)])
    c = build_splits(DataConfig(sources=[DataSource(path=path2)], seq_len=32, heldout_fraction=0.2, heldout_max=1000),
                     tiny_tokenizer, seed=0)
    assert held_recs <= {e.meta["record"] for e in c.heldout}


def test_heldout_cap_keeps_first_by_hash_and_does_not_refill_train(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Question {i}:", "completion": f" answer {i}."} for i in range(200)]
    path = _jsonl(tmp_path, "qa.jsonl", rows)
    full = build_splits(DataConfig(sources=[DataSource(path=path)], seq_len=32, heldout_fraction=0.3, heldout_max=1000),
                        tiny_tokenizer, seed=0)
    capped = build_splits(DataConfig(sources=[DataSource(path=path)], seq_len=32, heldout_fraction=0.3, heldout_max=5),
                          tiny_tokenizer, seed=0)
    assert [e.uid for e in capped.heldout] == [e.uid for e in full.heldout[:5]]
    assert [e.uid for e in capped.train] == [e.uid for e in full.train]
    assert capped.stats["heldout_sequences_over_cap"] == len(full.heldout) - 5
    keys = [record_key("qa", e.meta["record"], rows[e.meta["record"]]) for e in full.heldout]
    assert keys == sorted(keys)


def test_train_cap_keeps_the_first_by_hash_and_leaves_the_heldout_set(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Question {i}:", "completion": f" answer {i}."} for i in range(200)]
    path = _jsonl(tmp_path, "qa.jsonl", rows)
    full = build_splits(DataConfig(sources=[DataSource(path=path)], seq_len=32, heldout_fraction=0.3), tiny_tokenizer,
                        seed=0)
    capped = build_splits(DataConfig(sources=[DataSource(path=path)], seq_len=32, heldout_fraction=0.3, train_max=7),
                          tiny_tokenizer, seed=0)
    assert len(capped.train) == 7 and capped.stats["train_sequences"] == 7
    assert capped.stats["train_sequences_over_cap"] == len(full.train) - 7
    keys = {e.uid: record_key("qa", e.meta["record"], rows[e.meta["record"]]) for e in full.train}
    assert [e.uid for e in capped.train] == sorted(keys, key=keys.get)[:7]  # a spread over the records
    assert [e.uid for e in capped.heldout] == [e.uid for e in full.heldout]


def test_truncation_and_no_target_drops_are_counted(tmp_path, tiny_tokenizer):
    long_prompt = " ".join(["assert"] * 40)
    rows = [
        {"prompt": "Short:", "completion": " " + " ".join(["class"] * 30)},  # truncated, keeps targets
        {"prompt": long_prompt, "completion": " pass"},  # truncated inside the prompt: nothing to learn
        {"prompt": "Q:", "completion": " A."},
    ]
    path = _jsonl(tmp_path, "t.jsonl", rows)
    splits = build_splits(DataConfig(sources=[DataSource(path=path)], seq_len=16, heldout_fraction=0.0),
                          tiny_tokenizer, seed=0)
    s = splits.stats
    assert s["truncated_sequences"] == 2
    assert s["dropped_no_targets"] == 1 and s["records_skipped"] == 1
    assert len(splits.train) == 2 and max(len(e.input_ids) for e in splits.train) == 16
    full_len = len(tiny_tokenizer("Short:", add_special_tokens=False)["input_ids"]) + len(
        tiny_tokenizer(rows[0]["completion"], add_special_tokens=False)["input_ids"]) + 1
    assert s["truncated_tokens"] >= full_len - 16


def test_unpacked_text_is_truncated_and_counted(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path, "t.jsonl", [{"text": " ".join(["lambda"] * 50)}, {"text": "pass."}])
    splits = build_splits(DataConfig(sources=[DataSource(path=path)], seq_len=8, pack=False, heldout_fraction=0.0),
                          tiny_tokenizer, seed=0)
    assert splits.stats["truncated_sequences"] == 1
    assert [len(e.input_ids) for e in splits.train] == [8, len(tiny_tokenizer("pass.")["input_ids"]) + 1]


def test_n_bytes_counts_predicted_completion_bytes(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Say it:", "completion": " naïve café ☕ done."}, {"prompt": "Q:", "completion": " plain."}]
    path = _jsonl(tmp_path, "b.jsonl", rows)
    splits = build_splits(DataConfig(sources=[DataSource(path=path)], seq_len=64, heldout_fraction=0.0),
                          tiny_tokenizer, seed=0)
    assert [e.n_bytes for e in splits.train] == [len(r["completion"].encode("utf-8")) for r in rows]


def test_uids_stable_domains_and_duplicate_tags(tmp_path, tiny_tokenizer):
    a = _jsonl(tmp_path, "same.jsonl", [{"text": d} for d in _docs(10)])
    sub = tmp_path / "sub"
    sub.mkdir()
    b = _jsonl(sub, "same.jsonl", [{"prompt": "P:", "completion": f" c{i}."} for i in range(4)])
    cfg = DataConfig(
        sources=[DataSource(path=a, domain="code"), DataSource(path=b, domain="qa")],
        seq_len=16,
        heldout_fraction=0.0,
    )
    s1 = build_splits(cfg, tiny_tokenizer, seed=0)
    s2 = build_splits(cfg, tiny_tokenizer, seed=0)
    assert [e.uid for e in s1.train] == [e.uid for e in s2.train]
    assert set(s1.stats["per_source"]) == {"same", "same#2"}
    assert {e.domain for e in s1.train if e.uid.startswith("same:")} == {"code"}
    assert {e.domain for e in s1.train if e.uid.startswith("same#2:")} == {"qa"}
    assert s1.stats["per_source"]["same#2"]["format"] == "prompt_completion"


def test_bundled_pydoc_default_split(tiny_tokenizer):
    splits = build_splits(DataConfig(seq_len=256), tiny_tokenizer, seed=0)
    s = splits.stats
    assert s["records_read"] == s["per_source"]["pydoc"]["records_read"] > 50
    assert len(splits.heldout) == 40 and s["heldout_sequences_over_cap"] >= 0
    assert all(len(e.input_ids) == 256 for e in splits.train)
    assert all(e.uid.startswith("pydoc:pack-train") for e in splits.train)


def test_no_training_sequences_is_an_error(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path, "tiny.jsonl", [{"text": "pass."}])
    with pytest.raises(DataError, match="no training sequences.*lower data.seq_len"):
        build_splits(DataConfig(sources=[DataSource(path=path)], seq_len=64, heldout_fraction=0.0),
                     tiny_tokenizer, seed=0)


def test_messages_source_end_to_end(tiny_tokenizer):
    from stillroom.data.bundled import generate_instructions

    cfg = DataConfig(sources=[DataSource(bundled="instructions", limit=30)], seq_len=1024, heldout_fraction=0.2)
    splits = build_splits(cfg, tiny_tokenizer, seed=3)
    assert splits.stats["per_source"]["instructions"]["format"] == "messages"
    assert len(splits.train) + len(splits.heldout) == 30
    records = generate_instructions(30, seed=3)
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for e in splits.train + splits.heldout:
        messages = records[e.meta["record"]]["messages"]
        assistants = [m["content"] for m in messages if m["role"] == "assistant"]
        target_im_ends = sum(1 for i, f in zip(e.input_ids, e.target) if f and i == im_end)
        assert target_im_ends == len(assistants)  # one closing token per assistant turn, none for others
        assert not e.target[0]
        # bytes of the assistant contents plus one "\n" after each <|im_end|>
        assert e.n_bytes == sum(len(a.encode("utf-8")) + 1 for a in assistants)
