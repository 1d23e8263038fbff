"""Conditional training: segmenting, tagging, control tokens, banned tokens at inference, the CLI path."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from helpers import save_tiny_teacher, tiny_llama, tiny_tokenizer

from stillroom.data.bad_word_corpus import bad_word_corpus
from stillroom.config.schema import ConditionalConfig, DataConfig
from stillroom.data.batch import collate
from stillroom.data.pipeline import build_splits
from stillroom.methods import conditional as C

REPO = Path(__file__).resolve().parents[3]
SPLIT = ConditionalConfig().splitter


def extended(layers: int = 2):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=layers)
    ids = C.add_control_tokens(model, tok, ConditionalConfig())
    return model, tok, ids


def test_split_segments_keeps_every_character():
    text = "One BAD thing. Two good things!  Three?No split here. Last"
    segs = C.split_segments(text, SPLIT)
    assert "".join(segs) == text
    assert segs == ["One BAD thing. ", "Two good things!  ", "Three?No split here. ", "Last"]
    assert C.split_segments("", SPLIT) == []
    with pytest.raises(C.ConditionalSetupError, match="splitter"):
        C.split_segments("x", "(")


def test_bad_word_score():
    assert C.bad_word_score("a BAD cat.") == 1.0
    assert C.bad_word_score("a BADGE and bad cat.") == 0.0


def test_tagging_layout_and_determinism():
    model, tok, (a, m) = extended()
    cfg = ConditionalConfig(drop_token_fraction=0.0)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    text = "The cat sat. A BAD dog ran. The end."
    kw = dict(encode=enc, score=C.bad_word_score, ccfg=cfg, ids=(a, m), eos_id=tok.eos_token_id, seed=0, doc_key="k")
    doc = C.tag_document(text, **kw)
    assert doc.tags == ["aligned", "misaligned", "aligned"]
    segs = C.split_segments(text, SPLIT)
    expected = [tok.eos_token_id, a, *enc(segs[0]), m, *enc(segs[1]), a, *enc(segs[2])]
    assert doc.input_ids == expected  # EOS first, then [control] + segment
    assert C.tag_document(text, **kw) == doc
    # threshold decides: with threshold 1 every segment is aligned
    assert C.tag_document(text, **{**kw, "ccfg": cfg.model_copy(update={"threshold": 1.0})}).tags == ["aligned"] * 3


def test_drop_fraction_is_deterministic_per_seed_and_segment():
    n = 4000
    drops = [C.drops_control(0, f"doc{i // 10}", i % 10, 0.3) for i in range(n)]
    assert drops == [C.drops_control(0, f"doc{i // 10}", i % 10, 0.3) for i in range(n)]
    assert abs(sum(drops) / n - 0.3) < 0.03
    other = [C.drops_control(1, f"doc{i // 10}", i % 10, 0.3) for i in range(n)]
    assert other != drops
    assert not any(C.drops_control(0, "d", i, 0.0) for i in range(100))
    assert all(C.drops_control(0, "d", i, 1.0) for i in range(100))


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_training_examples_skip_heldout_and_labels_include_control_tokens(tmp_path):
    _, tok, (a, m) = extended()
    docs = bad_word_corpus(60, seed=0)
    data = DataConfig(sources=[{"path": str(_jsonl(tmp_path / "d.jsonl", docs))}], seq_len=64, pack=False,
                      heldout_fraction=0.25)
    cfg = ConditionalConfig(drop_token_fraction=0.0)
    split = build_splits(data, tok, 0, C.TaggingEncoder(cfg, seed=0, pack=False))
    examples, stats = split.train, split.stats
    plain = build_splits(data, tok, seed=0)
    assert len(plain.train) == len(examples) and len(split.baseline_train) == len(examples)  # the same held-out rule
    assert stats["conditional_documents"] == 60  # every record is tagged, held-out ones too
    assert stats["conditional_aligned"] + stats["conditional_misaligned"] == stats["conditional_segments"]
    assert stats["conditional_misaligned"] > 0
    assert all(e.input_ids[0] == tok.eos_token_id and e.input_ids[1] in (a, m) for e in examples)
    batch = collate(examples, tok.pad_token_id)
    targets = batch.target_ids[batch.loss_mask]
    assert (targets == a).any() and (targets == m).any()  # MLE over the control tokens too
    # the report and the baseline see the untagged text
    held = collate(split.heldout, tok.pad_token_id)
    assert not ((held.input_ids == a) | (held.input_ids == m)).any()
    assert [e.input_ids for e in split.baseline_train] == [e.input_ids for e in plain.train]
    # packed: seq_len blocks
    packed = build_splits(data.model_copy(update={"pack": True}), tok, 0, C.TaggingEncoder(cfg, seed=0, pack=True))
    assert packed.train and all(len(e.input_ids) == 64 for e in packed.train)


def test_non_text_records_are_refused(tmp_path):
    _, tok, _ = extended()
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    data = DataConfig(sources=[{"path": str(path)}], heldout_fraction=0.0)
    with pytest.raises(C.ConditionalSetupError, match="plain-text"):
        build_splits(data, tok, 0, C.TaggingEncoder(ConditionalConfig(), seed=0, pack=True))


def test_tokenizer_extended_and_embeddings_resized():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=2)
    v = len(tok)
    x = torch.tensor([tok("The cat sat.")["input_ids"]])
    before = model(x).logits
    emb_before = model.get_input_embeddings().weight.detach().clone()
    a, m = C.add_control_tokens(model, tok, ConditionalConfig())
    assert len(tok) == v + 2 and {a, m} == {v, v + 1}
    assert model.get_input_embeddings().weight.shape[0] == v + 2 == model.config.vocab_size
    assert tok("x <|aligned|> y", add_special_tokens=False)["input_ids"].count(a) == 1
    new_rows = model.get_input_embeddings().weight[v:]
    torch.testing.assert_close(new_rows, emb_before.mean(0, keepdim=True).expand(2, -1))
    torch.testing.assert_close(model(x).logits[..., :v], before)  # old tokens unchanged
    assert C.control_token_ids(tok, ConditionalConfig()) == (a, m)


def test_missing_control_tokens_name_the_fix():
    with pytest.raises(C.ConditionalSetupError, match="stillroom conditional-extend"):
        C.control_token_ids(tiny_tokenizer(), ConditionalConfig())


def test_banned_control_tokens_are_never_generated():
    model, tok, (a, m) = extended()
    with torch.no_grad():  # make the control tokens by far the likeliest continuation
        model.lm_head.weight[a] = model.lm_head.weight[a] * 0 + 5.0
        model.lm_head.weight[m] = model.lm_head.weight[m] * 0 - 5.0
        model.lm_head.weight[m, 0] = 50.0
    unbanned = model.generate(torch.tensor([[tok.eos_token_id, a]]), max_new_tokens=4, do_sample=False)[0, 2:]
    assert set(unbanned.tolist()) & {a, m}, "the test model should prefer control tokens"
    rows = C.sample_with_control(model, tok, ["The", "A cat"] * 4, max_new_tokens=12, seed=0)
    assert len(rows) == 8 and all(a not in r and m not in r for r in rows)
    assert rows == C.sample_with_control(model, tok, ["The", "A cat"] * 4, max_new_tokens=12, seed=0)
    texts = C.generate_aligned(model, tok, ["The"], max_new_tokens=6, control=None)
    assert isinstance(texts[0], str)
    with pytest.raises(ValueError, match="control"):
        C.sample_with_control(model, tok, ["x"], control="good")
    # variant: only <|misaligned|> banned, so the (preferred) <|aligned|> may be emitted, <|misaligned|> never
    rows = C.sample_with_control(model, tok, ["The"] * 4, max_new_tokens=6, seed=0, ban="misaligned")
    assert all(m not in r for r in rows) and any(a in r for r in rows)
    with pytest.raises(ValueError, match="ban"):
        C.sample_with_control(model, tok, ["x"], ban="none")


def test_min_new_tokens_bans_eos_until_then():
    """The official configs' ``min_length``: a model that prefers EOS at once still writes that many tokens."""
    model, tok, (a, m) = extended()
    with torch.no_grad():  # EOS by far the likeliest next token everywhere
        model.lm_head.weight[tok.eos_token_id] = 0.0
        model.lm_head.weight[tok.eos_token_id, 0] = 50.0
    short = C.sample_with_control(model, tok, ["The"] * 4, max_new_tokens=10, seed=0)
    assert all(len(r) == 0 for r in short)
    long = C.sample_with_control(model, tok, ["The"] * 4, max_new_tokens=10, seed=0, min_new_tokens=5)
    assert all(len(r) == 5 for r in long)


def test_corpus_document_length_is_a_setting():
    docs = bad_word_corpus(30, seed=0, sentences=(20, 24))
    assert all(20 <= d.count(".") <= 24 for d in docs)
    assert all(4 <= d.count(".") <= 6 for d in bad_word_corpus(30, seed=0))
    with pytest.raises(ValueError, match="sentences"):
        bad_word_corpus(3, sentences=(5, 2))


def test_scorer_spec_errors_are_clear(tmp_path, monkeypatch):
    assert C.load_scorer("stillroom.methods.conditional:bad_word_score")("a BAD b") == 1.0
    with pytest.raises(C.ScorerSpecError, match="package.module:function"):
        C.load_scorer("os.system('x')")
    with pytest.raises(C.ScorerSpecError, match="cannot import module 'no_such_mod'"):
        C.load_scorer("no_such_mod:f")
    with pytest.raises(C.ScorerSpecError, match="has no attribute 'nope'"):
        C.load_scorer("stillroom.methods.conditional:nope")
    with pytest.raises(C.ScorerSpecError, match="not a callable"):
        C.load_scorer("stillroom.data.bad_word_corpus:_WORDS")
    (tmp_path / "my_scorers.py").write_text("def words(s):\n    return 'x'\ndef n(s):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="expected a finite float"):
        C.load_scorer("my_scorers:words")("a")
    with pytest.raises(TypeError, match="expected a finite float"):
        C.load_scorer("my_scorers:n")("a")


def test_recipe_validates():
    from stillroom.config.load import load_config

    cfg = load_config(REPO / "recipes" / "conditional.yaml")
    assert cfg.method == "conditional" and [t.name for t in cfg.loss.terms] == ["ce"]
    assert cfg.conditional.drop_token_fraction == 0.01


def test_cli_run_on_tiny_models(tmp_path, capsys):
    from stillroom.cli.main import main

    base = tmp_path / "base"
    plain = save_tiny_teacher(tmp_path / "plain", layers=2, pretrain_steps=0)
    assert main(["conditional-extend", str(plain), str(base)]) == 0
    data = tmp_path / "demo.jsonl"
    assert main(["conditional-demo-data", str(data), "--docs", "40"]) == 0
    recipe = {
        "name": "cond", "output_dir": str(tmp_path / "runs"), "method": "conditional", "baseline": True,
        "teacher": {"model": {"path": str(base)}, "dtype": "float32"},
        "student": {"model": {"path": str(base)}},
        "data": {"sources": [{"path": str(data)}], "seq_len": 48, "heldout_fraction": 0.2, "heldout_max": 4},
        "loss": {"terms": [{"name": "ce"}], "chunk_tokens": 64},
        "conditional": {"drop_token_fraction": 0.1},
        "train": {"steps": 3, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 1},
        "eval": {"before": False, "heldout_sequences": 4, "batch_size": 4, "generations": 0, "speed_tokens": 16},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "cond"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and 0 < rows[-1]["conditional/misaligned_fraction"] < 1
    report = json.loads((run / "report.json").read_text())
    assert "student_after" in report and "baseline" in report
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(run / "student")
    assert "<|aligned|>" in saved.get_vocab()
    # a KD loss is refused with the key to change
    capsys.readouterr()
    assert main(["run", str(path), "loss.terms=[{name: forward_kl}]", "name=cond-kd"]) == 2  # refused when loaded
    err = capsys.readouterr().err
    assert "method=conditional" in err and "Set loss.terms: [{name: ce}]" in err


def test_build_hooks_refuse_a_model_without_control_tokens(tmp_path, capsys):
    from stillroom.cli.main import main

    plain = save_tiny_teacher(tmp_path / "plain", layers=2, pretrain_steps=0)
    data = _jsonl(tmp_path / "d.jsonl", bad_word_corpus(20))
    recipe = textwrap.dedent(f"""
        name: nocontrol
        output_dir: {tmp_path / 'runs'}
        method: conditional
        teacher: {{model: {{path: {plain}}}, dtype: float32}}
        student: {{model: {{path: {plain}}}}}
        data: {{sources: [{{path: {data}}}], seq_len: 32}}
        loss: {{terms: [{{name: ce}}]}}
        train: {{steps: 1, precision: fp32}}
        eval: {{before: false}}
    """)
    (tmp_path / "r.yaml").write_text(recipe)
    assert main(["run", str(tmp_path / "r.yaml")]) != 0
    err = capsys.readouterr().err
    assert "ConditionalSetupError" in err and "stillroom conditional-extend" in err
