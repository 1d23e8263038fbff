"""MiniPLM difference sampling: score math, top-fraction selection, tokenizer check, text output, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import save_model, tiny_llama, tiny_tokenizer

from stillroom.data.batch import Example, collate
from stillroom.datagen.miniplm import (
    InstanceScore,
    check_same_tokenizer,
    degenerate_reason,
    instance_nll,
    instance_texts,
    score_instances,
    scoring_vocab_size,
    select_top,
    summarize,
)

RECIPES = Path(__file__).resolve().parents[3] / "stillroom" / "recipes"


def _example(ids: list[int], uid: str, target: list[bool] | None = None) -> Example:
    return Example(input_ids=ids, target=target or [True] * len(ids), uid=uid, meta={"source": "s"})


def _hand_nll(model, ids: list[int], target: list[bool]) -> float:
    """Mean -log p(x_t | x_<t) over t >= 1 with target[t], from an unpadded forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    terms = [-logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if target[t]]
    return sum(terms) / len(terms)


def test_instance_nll_matches_hand_computation_and_ignores_padding():
    model = tiny_llama(50, layers=1, hidden=16, seed=0)
    a = _example([5, 7, 9, 11, 13, 2, 4, 6], "a")
    b = _example([3, 8, 12], "b")  # padded to 8 in the batch
    c = _example([4, 9, 10, 20, 21, 22], "c", target=[False, False, False, True, True, True])  # a prompt
    batch = collate([a, b, c], pad_id=1)
    sums, counts = instance_nll(model, batch)
    assert counts.tolist() == [7, 2, 3]
    for row, ex in enumerate([a, b, c]):
        assert float(sums[row] / counts[row]) == pytest.approx(_hand_nll(model, ex.input_ids, ex.target), abs=1e-5)
    # Changing the padding id changes nothing.
    sums2, _ = instance_nll(model, collate([a, b, c], pad_id=0))
    torch.testing.assert_close(sums2, sums, atol=1e-5, rtol=0)


def test_score_is_reference_minus_teacher_nll():
    teacher, ref = tiny_llama(50, layers=1, hidden=16, seed=0), tiny_llama(50, layers=1, hidden=16, seed=1)
    exs = [_example([5, 7, 9, 11, 13], "a"), _example([3, 8, 12], "b"), _example([1, 2, 3, 4], "c")]
    seen = []
    rows = score_instances(teacher, ref, exs, pad_id=0, vocab_size=50, batch_size=2, on_batch=seen.append,
                           log=lambda _m: None)
    assert [len(r) for r in seen] == [2, 1]  # appended per batch
    for r, ex in zip(rows, exs):
        nt, nr = _hand_nll(teacher, ex.input_ids, ex.target), _hand_nll(ref, ex.input_ids, ex.target)
        assert (r.nll_teacher, r.nll_ref) == (pytest.approx(nt, abs=1e-5), pytest.approx(nr, abs=1e-5))
        assert r.score == pytest.approx(nr - nt, abs=1e-5)
        assert r.n_tokens == len(ex.input_ids) - 1 and r.id == ex.uid


def test_resume_reuses_known_scores():
    teacher, ref = tiny_llama(50, layers=1, hidden=16, seed=0), tiny_llama(50, layers=1, hidden=16, seed=1)
    exs = [_example([5, 7, 9], "a"), _example([3, 8, 12], "b")]
    known = InstanceScore("a", 0, "s", None, 2, 1.0, 3.0, 2.0)
    seen = []
    rows = score_instances(teacher, ref, exs, pad_id=0, vocab_size=50, done={"a": known}, on_batch=seen.append,
                           log=lambda _m: None)
    assert rows[0].score == 2.0 and [r.id for batch in seen for r in batch] == ["b"]


def test_select_top_keeps_floor_fraction_in_corpus_order_with_stable_ties():
    scores = [0.1, 0.9, -2.0, 0.5, 0.9, 0.3, 0.0]
    assert select_top(scores, 0.5) == [1, 3, 4]  # floor(3.5) = 3: 0.9, 0.9, 0.5, back in corpus order
    assert select_top(scores, 1.0) == list(range(7))
    assert select_top([1.0, 1.0, 1.0, 1.0], 0.5) == [0, 1]  # ties: earlier first
    assert select_top(scores, 0.1) == []
    with pytest.raises(ValueError, match="fraction"):
        select_top(scores, 0.0)


def test_degenerate_instances():
    special = {0, 1}
    assert degenerate_reason(_example([0, 1, 1, 1], "pad"), special) == "only special tokens (padding/EOS)"
    assert degenerate_reason(_example([5, 6], "p", target=[True, False]), special) == "no target tokens"
    assert degenerate_reason(_example([5], "one"), special) == "no target tokens"
    assert degenerate_reason(_example([5, 6, 1], "ok"), special) is None


def test_tokenizer_mismatch_is_refused():
    tok = tiny_tokenizer(320)
    other = tiny_tokenizer(300, seed_text="a different corpus entirely")
    ref = tiny_llama(len(other), layers=1, hidden=16)
    with pytest.raises(ValueError, match="different tokenizers"):
        check_same_tokenizer(tok, other, ref, teacher="T", reference="R")
    check_same_tokenizer(tok, tiny_tokenizer(320), tiny_llama(len(tok), layers=1, hidden=16), teacher="T", reference="R")
    with pytest.raises(ValueError, match="output logits"):
        check_same_tokenizer(tok, tiny_tokenizer(320), tiny_llama(len(tok) - 10, layers=1, hidden=16), teacher="T", reference="R")


def test_instance_texts_split_packed_documents_at_eos():
    tok = tiny_tokenizer(320)
    eos = tok.eos_token_id
    one, two = tok("def f(x): return x")["input_ids"], tok("class A: pass")["input_ids"]
    ex = _example(one + [eos] + two + [eos, eos], "blk")
    assert instance_texts(ex, tok) == ["def f(x): return x", "class A: pass"]


def test_summary_counts_per_domain():
    rows = [InstanceScore(f"i{i}", i, "src", d, 10, 1.0, 1.0 + s, s, kept=k)
            for i, (d, s, k) in enumerate([("easy", 0.1, False), ("hard", 2.0, True), ("hard", 1.5, True), ("noise", -1, False)])]
    s = summarize(rows, fraction=0.5, degenerate={"no target tokens": 2})
    assert s["instances_kept"] == 2 and s["degenerate_removed"] == 2 and s["tokens_kept"] == 20
    assert s["per_domain"]["hard"] == {"instances": 2, "kept": 2, "tokens": 20, "kept_tokens": 20,
                                       "kept_fraction": 1.0, "share_of_selection": 1.0}
    assert s["score"]["kept"]["mean"] == pytest.approx(1.75) and s["score"]["dropped"]["min"] == -1


def test_shipped_recipes_validate():
    from stillroom.config.load import load_config

    sel = load_config(RECIPES / "miniplm_select.yaml")
    assert sel.select.reference is not None and sel.select.fraction == 0.5
    train = load_config(RECIPES / "miniplm_train.yaml")
    assert train.method == "sft" and train.data.sources[0].path == sel.select.output


def _char_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *sorted(set(text))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def test_cli_select_writes_text_that_a_training_recipe_reads(tmp_path, capsys):
    from stillroom.cli.main import main
    from stillroom.config.load import load_config
    from stillroom.data import build_splits

    tok = tiny_tokenizer(320)
    teacher = save_model(tiny_llama(len(tok), layers=2, hidden=32, seed=0), tok, tmp_path / "teacher")
    ref = save_model(tiny_llama(len(tok), layers=1, hidden=16, seed=1), tok, tmp_path / "ref")
    rows = [{"text": f"item {i}: the value of x is {i * 7 % 13} and y is {i}.", "id": i} for i in range(40)]
    rows.append({"text": "   "})  # empty: dropped by the reader
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "select.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "sel", "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": {"path": str(teacher)}, "dtype": "float32"},
        "data": {"sources": [{"path": str(data), "domain": "facts"}], "seq_len": 32, "pack": True, "heldout_fraction": 0.0},
        "select": {"reference": {"path": str(ref)}, "fraction": 0.5, "batch_size": 4},
    }))
    assert main(["select", str(recipe)]) == 0
    out = tmp_path / "runs" / "sel"
    scores = [json.loads(l) for l in (out / "selected.scores.jsonl").read_text().splitlines()]
    n = len(scores)
    assert n >= 8 and sum(r["kept"] for r in scores) == n // 2
    kept_scores = sorted((r["score"] for r in scores if r["kept"]), reverse=True)
    assert min(kept_scores) >= max(r["score"] for r in scores if not r["kept"])
    for r in scores:
        assert r["score"] == pytest.approx(r["nll_ref"] - r["nll_teacher"], abs=1e-9)
    summary = json.loads((out / "selected.summary.json").read_text())
    assert summary["per_domain"]["facts"]["kept"] == n // 2
    assert not (out / "selected.scores.partial.jsonl").exists()
    selected = [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]
    kept_ids = [r["id"] for r in scores if r["kept"]]
    assert list(dict.fromkeys(r["instance"] for r in selected)) == kept_ids  # corpus order
    assert all(set(r) == {"text", "instance"} and r["text"].strip() for r in selected)

    # A training recipe (miniplm_train) reads the selection, with another tokenizer too (text is portable).
    cfg = load_config(RECIPES / "miniplm_train.yaml", [f"data.sources=[{{path: {out / 'selected.jsonl'}}}]",
                                                       "data.seq_len=16", "data.heldout_fraction=0"])
    for t in (tok, _char_tokenizer("".join(r["text"] for r in rows))):
        splits = build_splits(cfg.data, t, seed=0)
        assert len(splits.train) > 0

    # Same models and data again: the scores are identical (deterministic ranking).
    capsys.readouterr()
    assert main(["select", str(recipe), "select.precision=fp32"]) == 0
    again = [json.loads(l) for l in (out / "selected.scores.jsonl").read_text().splitlines()]
    assert [r["kept"] for r in again] == [r["kept"] for r in scores]


def test_cli_select_refuses_other_tokenizer_and_missing_reference(tmp_path, capsys):
    from stillroom.cli.main import main

    tok, other = tiny_tokenizer(320), tiny_tokenizer(300, seed_text="a different corpus entirely")
    teacher = save_model(tiny_llama(len(tok), layers=1, hidden=16), tok, tmp_path / "teacher")
    ref = save_model(tiny_llama(len(other), layers=1, hidden=16), other, tmp_path / "ref")
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(10)))
    base = ["teacher.model.path=" + str(teacher), "teacher.dtype=float32", f"data.sources=[{{path: {data}}}]",
            "data.seq_len=8", f"output_dir={tmp_path / 'runs'}"]
    recipe = str(RECIPES / "miniplm_select.yaml")
    assert main(["select", recipe, *base, "teacher.model.builtin=null", f"select.reference.path={ref}"]) == 1
    assert "different tokenizers" in capsys.readouterr().err
    assert main(["select", recipe, *base, "teacher.model.builtin=null", "select.reference=null"]) == 1
    assert "select.reference is not set" in capsys.readouterr().err


def test_interrupted_select_resumes_from_partial_scores(tmp_path, monkeypatch):
    import stillroom.datagen.miniplm as mp
    from stillroom.config.schema import RunConfig

    tok = tiny_tokenizer(320)
    teacher = save_model(tiny_llama(len(tok), layers=1, hidden=16, seed=0), tok, tmp_path / "teacher")
    ref = save_model(tiny_llama(len(tok), layers=1, hidden=16, seed=1), tok, tmp_path / "ref")
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} says {i * 3} things"}) + "\n" for i in range(12)))
    cfg = RunConfig.model_validate({
        "name": "sel", "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": {"path": str(teacher)}, "dtype": "float32"},
        "data": {"sources": [{"path": str(data)}], "seq_len": 64, "pack": False, "heldout_fraction": 0.0},
        "select": {"reference": {"path": str(ref)}, "batch_size": 4},
    })
    clean = mp.run_select(cfg, log=lambda _m: None)
    expected = clean.scores.read_text()
    clean.scores.unlink()

    real, calls = mp.instance_nll, []

    def failing(model, batch, precision="fp32", **kw):
        calls.append(1)
        if len(calls) == 3:  # teacher + reference of batch 1 done, then the second batch fails
            raise KeyboardInterrupt
        return real(model, batch, precision, **kw)

    monkeypatch.setattr(mp, "instance_nll", failing)
    with pytest.raises(KeyboardInterrupt):
        mp.run_select(cfg, log=lambda _m: None)
    partial = tmp_path / "runs" / "sel" / "selected.scores.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 4  # header + the first batch
    monkeypatch.setattr(mp, "instance_nll", real)
    logs = []
    mp.run_select(cfg, log=logs.append)
    assert any("resuming, 4 of 12" in m for m in logs)
    assert clean.scores.read_text() == expected and not partial.exists()



def _padded(model, extra: int, scale: float = 50.0, seed: int = 0):
    """``model`` with ``extra`` head rows past the tokenizer (as checkpoints pad to a multiple of 64),
    set so that their logits are large: no token id reaches them, yet a full-head softmax gives them most mass."""
    real = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(real + extra, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[real:] = scale * torch.randn(extra, head.shape[1], generator=g)
    assert model.get_output_embeddings().weight.shape[0] == real + extra
    return model


def test_scoring_vocab_is_the_tokenizers_ids_and_refuses_short_heads():
    tok = tiny_tokenizer(320)
    wide, exact = _padded(tiny_llama(len(tok), layers=1, hidden=16), 24), tiny_llama(len(tok), layers=1, hidden=16)
    assert scoring_vocab_size(tok, wide, exact) == len(tok)
    assert scoring_vocab_size(tok, wide, _padded(tiny_llama(len(tok), layers=1, hidden=16), 24)) == len(tok)
    with pytest.raises(ValueError, match="output logits but the tokenizer has"):
        scoring_vocab_size(tok, wide, tiny_llama(len(tok) - 5, layers=1, hidden=16))


def test_select_scores_ignore_padded_head_rows(tmp_path):
    """A teacher whose head has 24 padding rows with large logits scores exactly like the same teacher
    without them: the padding rows never enter the log-softmax."""
    from stillroom.config.schema import RunConfig
    from stillroom.datagen.miniplm import run_select

    tok = tiny_tokenizer(320)
    plain = save_model(tiny_llama(len(tok), layers=1, hidden=16, seed=0), tok, tmp_path / "plain")
    padded = save_model(_padded(tiny_llama(len(tok), layers=1, hidden=16, seed=0), 24), tok, tmp_path / "padded")
    ref = save_model(_padded(tiny_llama(len(tok), layers=1, hidden=16, seed=1), 8), tok, tmp_path / "ref")
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": f"entry {i} holds {i * 5 % 7} items"}) + "\n" for i in range(10)))

    def scores(teacher: Path, name: str) -> list[dict]:
        cfg = RunConfig.model_validate({
            "name": name, "output_dir": str(tmp_path / "runs"),
            "teacher": {"model": {"path": str(teacher)}, "dtype": "float32"},
            "data": {"sources": [{"path": str(data)}], "seq_len": 64, "pack": False, "heldout_fraction": 0.0},
            "select": {"reference": {"path": str(ref)}, "batch_size": 4, "resume": False},
        })
        result = run_select(cfg, log=lambda _m: None)
        return [json.loads(line) for line in result.scores.read_text().splitlines()]

    want, got = scores(plain, "plain"), scores(padded, "padded")
    assert len(got) == 10
    for w, g in zip(want, got):
        assert g["nll_teacher"] == pytest.approx(w["nll_teacher"], abs=1e-5)
        assert g["nll_ref"] == pytest.approx(w["nll_ref"], abs=1e-5) and g["score"] == pytest.approx(w["score"], abs=1e-5)
    # and the hand computation over the tokenizer's ids agrees (the reference's own padding cut too)
    exs = [_example(tok(f"entry {i} holds {i * 5 % 7} items")["input_ids"], str(i)) for i in range(2)]
    ref_model = _padded(tiny_llama(len(tok), layers=1, hidden=16, seed=1), 8)
    for ex in exs:
        with torch.no_grad():
            logits = ref_model(input_ids=torch.tensor([ex.input_ids])).logits[0, :, : len(tok)].double()
        logp = torch.log_softmax(logits, -1)
        hand = -sum(logp[t - 1, ex.input_ids[t]].item() for t in range(1, len(ex.input_ids))) / (len(ex.input_ids) - 1)
        (row,) = score_instances(ref_model, ref_model, [ex], pad_id=0, vocab_size=len(tok), log=lambda _m: None)
        assert row.nll_ref == pytest.approx(hand, abs=1e-5)

@pytest.mark.slow
def test_select_with_the_real_smollm2_teacher(tmp_path):
    """The shipped recipe's path on a small slice: SmolLM2 teacher, a 2-layer reference derived from it
    (same tokenizer, untrained beyond the kept layers, so much weaker)."""
    from stillroom.config.load import load_config
    from stillroom.config.schema import LayerSelection
    from stillroom.datagen.miniplm import run_select
    from stillroom.models import derive_student, load_model
    from stillroom.config.schema import ModelSource

    torch.set_num_threads(2)
    teacher = load_model(ModelSource(builtin="smollm2-135m-instruct"))
    ref, _ = derive_student(teacher.model, LayerSelection(strategy="explicit", layers=[0, 29]))
    save_model(ref, teacher.tokenizer, tmp_path / "ref")
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for v in list(topics.values())[:6] for p in v.split("\n\n") if len(p.strip()) > 80][:8]
    data = tmp_path / "prose.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    cfg = load_config(RECIPES / "miniplm_select.yaml", [
        f"select.reference.path={tmp_path / 'ref'}", f"select.output={tmp_path / 'sel.jsonl'}",
        f"data.sources=[{{path: {data}}}]", "data.seq_len=32", "data.pack=false", "teacher.dtype=float32",
        "select.batch_size=4",
    ])
    result = run_select(cfg, log=print)
    rows = [json.loads(l) for l in result.scores.read_text().splitlines()]
    assert len(rows) == 8 and sum(r["kept"] for r in rows) == 4
    # the pretrained teacher predicts prose far better than a 2-layer cut of itself
    assert all(r["nll_teacher"] < r["nll_ref"] for r in rows)
    assert all(1.0 < r["nll_teacher"] < 6.0 for r in rows)
    assert result.selected.read_text().strip()
