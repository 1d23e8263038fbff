"""collate on real encoded examples: the one causal shift and padding."""

from __future__ import annotations

import json

import torch

from stillroom.config.schema import DataConfig, DataSource
from stillroom.data import IGNORE, build_splits, collate


def test_collate_shifts_targets_once(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Q: name one?", "completion": " assert."}, {"prompt": "Q:", "completion": " pass and yield."}]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    splits = build_splits(DataConfig(sources=[DataSource(path=str(path))], seq_len=64, heldout_fraction=0.0),
                          tiny_tokenizer, seed=0)
    examples = splits.train
    batch = collate(examples, pad_id=tiny_tokenizer.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    assert batch.input_ids.shape == batch.target_ids.shape == (2, width)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (width - n)
        for t in range(width):
            want = e.input_ids[t + 1] if t + 1 < n and e.target[t + 1] else IGNORE
            assert batch.target_ids[b, t].item() == want
        # the targets are exactly the completion tokens + EOS
        completion = tiny_tokenizer(rows[b]["completion"], add_special_tokens=False)["input_ids"]
        got = batch.target_ids[b][batch.loss_mask[b]].tolist()
        assert got == completion + [tiny_tokenizer.eos_token_id]
    assert batch.num_targets == sum(sum(e.target[1:]) for e in examples)
    assert torch.equal(batch.n_bytes, torch.tensor([len(r["completion"].encode()) for r in rows]))
