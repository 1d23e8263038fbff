"""The flag-driven commands through the real CLI (`stillroom.cli.main.main`), on tiny models: each one is
its config section plus one library function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_model, tiny_llama

from stillroom.cli.main import main
from stillroom.config.commands import ConditionalDemoDataConfig, SpecEvalConfig
from stillroom.run.spec_eval import heartbeat, model_slug, output_folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    """A tiny target and a 1-layer-shorter draft sharing its tokenizer (chat template included)."""
    root = tmp_path_factory.mktemp("flag_commands")
    target = save_model(tiny_llama(len(tok), layers=2, seed=0), tok, root / "target")
    draft = save_model(tiny_llama(len(tok), layers=1, seed=1), tok, root / "draft")
    return tok, target, draft


CHAT = [
    {"messages": [{"role": "user", "content": "Name a keyword."}, {"role": "assistant", "content": "def"}]},
    {"id": "q2", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"prompt": "plain text prompt"},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ spec-eval

def test_spec_eval_default_folder_names_both_models_and_progress_is_shown(models, tmp_path, monkeypatch, capsys):
    _, target, draft = models
    monkeypatch.chdir(tmp_path)
    data = _jsonl(tmp_path / "prompts.jsonl", CHAT)
    argv = ["spec-eval", "--target", str(target), "--draft", str(draft), "--gamma", "2", "--data", str(data),
            "--prompts", "3", "--max-new-tokens", "3", "--modes", "greedy", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    folder = Path("runs/spec-eval") / f"{model_slug(str(draft))}-vs-{model_slug(str(target))}"
    assert folder.name.endswith("_draft-vs-" + target.parent.name + "_target")
    report = json.loads((tmp_path / folder / "report.json").read_text())
    assert report["settings"]["prompts"] == 3 and report["settings"]["modes"] == ["greedy"]
    assert [r["gamma"] for r in report["results"]] == [2] and report["results"][0]["matches_target_greedy"]
    for line in ("loading the target", "loading the draft", "3 prompts from", "measuring: greedy x",
                 "greedy gamma=2: alpha=", f"report: {folder / 'report.md'}"):
        assert line in out, line


def test_spec_eval_refuses_bad_flags_with_exit_2(models, capsys):
    _, target, draft = models
    assert main(["spec-eval", "--target", str(target), "--draft", str(draft), "--gamma", "0"]) == 2
    assert "--gamma" in capsys.readouterr().err
    assert main(["spec-eval", "--target", str(target), "--draft", "builtin:nope"]) == 2
    assert "--draft" in capsys.readouterr().err


def test_output_folder_and_model_slugs():
    assert model_slug("builtin:smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert model_slug("runs/draft_tvd_pp/student") == "draft_tvd_pp_student"
    assert model_slug("./student/") == "student"
    assert model_slug("/models/SmolLM2.Q4_K_M.gguf") == "SmolLM2.Q4_K_M"
    cfg = SpecEvalConfig(target="builtin:smollm2-135m-instruct", draft="runs/draft_forward_kl/student")
    assert output_folder(cfg) == Path("runs/spec-eval/draft_forward_kl_student-vs-smollm2-135m-instruct")
    assert output_folder(cfg.model_copy(update={"out": "elsewhere"})) == Path("elsewhere")


def test_heartbeat_reports_forward_passes_and_unhooks():
    model, lines = torch.nn.Linear(2, 2), []
    with heartbeat(model, lines.append, every_s=0.0):
        model(torch.zeros(1, 2))
        model(torch.zeros(1, 2))
    model(torch.zeros(1, 2))
    assert len(lines) == 2 and "2 target forward passes" in lines[-1]


# ------------------------------------------------------------------ draft-data

def test_draft_data_writes_and_resumes(models, tmp_path, capsys):
    _, target, _ = models
    data = _jsonl(tmp_path / "chat.jsonl", CHAT[:2])
    out = tmp_path / "draft" / "target_data.jsonl"
    argv = ["draft-data", "--target", str(target), "--data", str(data), "--prompts", "2", "--max-new-tokens", "4",
            "--batch-size", "1", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "2 chat prompts from" in text and "1 prompt(s) generated this run" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["id"].split("#")[0] for r in rows} <= {"0", "q2"}
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
    assert main(argv) == 0  # resumed: nothing left to generate
    assert "0 generated now, 2 already stored" in capsys.readouterr().out


def test_draft_data_needs_chat_records(models, tmp_path, capsys):
    _, target, _ = models
    data = _jsonl(tmp_path / "plain.jsonl", [{"prompt": "no messages"}])
    assert main(["draft-data", "--target", str(target), "--data", str(data), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "plain.jsonl:1: a prompt record needs a `messages` field" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["draft-data", "--target", str(target)])  # --out is required: argparse says so
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


# ------------------------------------------------------------------ merge

def test_merge_through_the_cli_and_its_flag_errors(models, tmp_path, capsys):
    _, target, _ = models
    out = tmp_path / "merged"
    assert main(["merge", str(target), str(target), "--out", str(out)]) == 0  # t from the schema: 0.5
    assert json.loads((out / "stillroom_merge.json").read_text())["t"] == 0.5
    assert "merged" in capsys.readouterr().out
    assert main(["merge", str(target), str(target), "--out", str(out), "--t", "1.5"]) == 2
    assert "--t: Input should be less than or equal to 1" in capsys.readouterr().err


# ------------------------------------------------------------------ conditional

def test_conditional_commands_through_the_cli(models, tmp_path, capsys):
    from transformers import AutoTokenizer

    _, target, _ = models
    dst = tmp_path / "extended"
    assert main(["conditional-extend", str(target), str(dst), "--aligned-token", "<|ok|>"]) == 0
    tok = AutoTokenizer.from_pretrained(dst)
    assert "<|ok|>" in tok.get_vocab() and "<|misaligned|>" in tok.get_vocab()  # the other from the schema
    data = tmp_path / "demo" / "docs.jsonl"
    assert main(["conditional-demo-data", str(data), "--docs", "12", "--seed", "3"]) == 0
    docs = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    assert len(docs) == 12 and "wrote 12 documents" in capsys.readouterr().out
    assert ConditionalDemoDataConfig(out="x").docs == 2000  # the default lives in the schema only
    assert main(["conditional-demo-data", str(data), "--toxic-doc-fraction", "1"]) == 2
    assert "--toxic-doc-fraction" in capsys.readouterr().err


# ------------------------------------------------------------------ preference-data

def test_preference_data_from_a_store_and_its_items(tmp_path, capsys):
    from stillroom.datagen.store import GenerationStore, make_key

    items = _jsonl(tmp_path / "items.jsonl", [{"id": "a", "prompt": "Q1\n", "answer": 5},
                                              {"id": "b", "prompt": "Q2\n", "answer": 7}])
    texts = {"a": ["The answer is 6.", "The answer is 5.", "The answer is 5."], "b": ["The answer is 7."]}
    store_path = tmp_path / "gen.jsonl"
    with GenerationStore(store_path) as store:
        store.append([{"key": make_key(pid, s), "prompt_id": pid, "sample_index": s, "teacher": "t",
                       "settings": {}, "text": t} for pid, outs in texts.items() for s, t in enumerate(outs)])
    out = tmp_path / "redi"
    assert main(["preference-data", "--store", str(store_path), "--items", str(items), "--out", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["pref_rows"] == 1 and stats["sft_rows"] == 2 and stats["duplicates"] == 1
    assert main(["preference-data", "--store", str(store_path), "--items", str(items), "--out", str(out),
                 "--no-dedupe"]) == 0
    assert json.loads(capsys.readouterr().out)["sft_rows"] == 3
    assert main(["preference-data", "--store", str(store_path), "--out", str(out)]) == 2
    assert "--store with --items" in capsys.readouterr().err
