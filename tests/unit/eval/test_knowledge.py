"""The knowledge-injection suite (stillroom knowledge-data) and its scoring (eval.knowledge)."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_llama

from stillroom.config.knowledge import KnowledgeDataConfig
from stillroom.datagen import knowledge as K
from stillroom.eval.generations import greedy_generations
from stillroom.eval.knowledge import answer_matches, batched_greedy, knowledge_accuracy, load_items, row_metrics


def _suite(tmp_path, **kw):
    cfg = KnowledgeDataConfig(out=str(tmp_path / "suite"), new_people=6, known_people=5, companies=4, cities=6,
                              countries=3, **kw)
    return K.write_knowledge_suite(cfg, log=lambda _m: None), cfg


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_suite_is_deterministic_and_paraphrases_never_trained(tmp_path):
    folder, cfg = _suite(tmp_path)
    again = K.write_knowledge_suite(cfg.model_copy(update={"out": str(tmp_path / "b")}), log=lambda _m: None)
    for name in ("background.jsonl", "train.jsonl", "train_augmented.jsonl", "eval.jsonl"):
        assert (folder / name).read_text() == (again / name).read_text()
    items = _rows(folder / "eval.jsonl")
    trained = {r["prompt"] for r in _rows(folder / "train_augmented.jsonl")}
    background = "\n".join(r["text"] for r in _rows(folder / "background.jsonl"))
    for it in items:
        if it["kind"] in ("new", "update") and it["form"] != "trained":
            assert it["prompt"] not in trained  # paraphrases and implications are never fine-tuned on
        if it["kind"] == "new":
            assert it["entity"] not in background  # new people exist only in the fine-tuning data
    assert {(it["kind"], it["form"]) for it in items} == {
        ("new", f) for f in K.FORMS} | {("update", f) for f in K.FORMS} | {("known", "trained")}
    world = K.make_world(cfg)
    for it in items:  # an implication is the second fact applied to the first
        if it["form"] == "implication" and it["attribute"] == "headquarters":
            assert it["answer"] == world.country_of[world.companies[it["entity"]][1]]
        if it["form"] == "implication" and it["attribute"] == "profession":
            assert it["answer"] == K.PROFESSIONS[world.new[it["entity"]]["profession"]]
    for company, (old, new) in world.companies.items():  # an update moves to a city the background never says
        assert f"{company} is headquartered in {old}." in background and old != new
    with pytest.raises(FileExistsError, match="--overwrite"):
        K.write_knowledge_suite(cfg, log=lambda _m: None)


def test_answers_match_on_the_first_words_only():
    assert answer_matches(" Pepeia.\nQ: more", "Pepeia")
    assert answer_matches("pepeia is right", "Pepeia")
    assert not answer_matches("Pepeian", "Pepeia")
    assert not answer_matches("\nPepeia", "Pepeia")  # the first line is empty
    assert answer_matches("New Town hall", "New Town")


def test_bad_items_name_the_line(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text('{"kind": "new", "form": "trained", "prompt": "Q", "answer": "A"}\n{"kind": "new", "form": "x"}\n')
    with pytest.raises(ValueError, match=r"e.jsonl:2: .*\['prompt', 'answer'\]"):
        load_items(f)
    with pytest.raises(FileNotFoundError, match="knowledge-data"):
        load_items(tmp_path / "missing")


def test_batched_greedy_equals_one_prompt_at_a_time(tok):
    model = tiny_llama(len(tok), layers=2, seed=0).eval()
    prompts = ["Q: Where was Ka Lo born?\nA:", "The", "Q: In which country is a very long city name?\nA:"]
    assert batched_greedy(model, tok, prompts, 5, batch_size=3) == greedy_generations(model, tok, prompts, 5)


def test_accuracy_per_kind_and_form_and_pooled_rows(monkeypatch):
    items = [{"kind": "new", "form": "trained", "prompt": "a", "answer": "x"},
             {"kind": "new", "form": "trained", "prompt": "b", "answer": "y"},
             {"kind": "update", "form": "trained", "prompt": "c", "answer": "z"},
             {"kind": "new", "form": "paraphrase", "prompt": "e", "answer": "v"},
             {"kind": "known", "form": "trained", "prompt": "d", "answer": "w"}]
    said = {"a": " x.", "b": " q", "c": " Z\n", "e": " u", "d": " w"}
    monkeypatch.setattr("stillroom.eval.knowledge.batched_greedy",
                        lambda model, tok, prompts, n, bs: [said[p] for p in prompts])
    result = knowledge_accuracy(None, None, items)
    assert {k: (g["accuracy"], g["n"]) for k, g in result.items()} == {
        "new/trained": (0.5, 2), "update/trained": (1.0, 1), "new/paraphrase": (0.0, 1), "known/trained": (1.0, 1)}
    assert result["new/trained"]["wrong"] == [{"prompt": "b", "answer": "y", "model": "q"}]
    assert row_metrics(result) == pytest.approx({"knowledge_trained": 2 / 3, "knowledge_paraphrase": 0.0,
                                                 "knowledge_known": 1.0})
