"""spec-eval: the report files, their numbers, and the CLI on tiny saved models."""

from __future__ import annotations

import json

import pytest
from generate_models import drop_layers
from helpers import tiny_llama, tiny_tokenizer

from stillroom.data.prompts import prompt_ids
from stillroom.generate.spec_eval import run_spec_eval
from stillroom.generate.speculative import expected_block_efficiency


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(320)


@pytest.fixture(scope="module")
def pair(tok):
    target = tiny_llama(len(tok), layers=4, seed=0)
    return target, drop_layers(target, 1)


PROMPTS = ["The for statement is used to", [{"role": "user", "content": "Reverse the words: a b c"}]]


def test_run_spec_eval_writes_reports(tmp_path, tok, pair):
    target, draft = pair
    report = run_spec_eval(target, draft, tok, PROMPTS, [1, 3], max_new_tokens=8, seed=0, out_dir=tmp_path / "out")
    for name in ("report.json", "report.md", "block_efficiency.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temporary files left behind
    assert (tmp_path / "out" / "block_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["results"] == report["results"]
    assert [(r["mode"], r["gamma"]) for r in report["results"]] == [
        ("greedy", 1), ("greedy", 3), ("sampling", 1), ("sampling", 3)
    ]
    for r in report["results"]:
        assert r["generated_tokens"] == 8 * len(PROMPTS)  # stop_at_eos=False: every run emits max_new_tokens
        assert 1.0 <= r["block_efficiency"] <= r["gamma"] + 1
        assert r["expected_block_efficiency"] == pytest.approx(expected_block_efficiency(r["acceptance_rate"], r["gamma"]))
        assert r["speedup"] > 0 and r["mbsu"] > 0
        if r["mode"] == "greedy":
            assert r["matches_target_greedy"] is True
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| greedy | 3 |" in md and "E[tau]" in md
    assert report["target"] == {"ref": None, "identity": None, "params": sum(p.numel() for p in target.parameters())}
    assert report["data"] == {"source": None, "prompts": 2, "seed": 0, "records_skipped": 0}
    assert "- Target: a model passed in memory" in md and "- Data: 2 prompts from prompts passed in memory" in md


def test_report_names_models_and_data_given(tmp_path, tok, pair):
    target, draft = pair
    report = run_spec_eval(target, draft, tok, PROMPTS[:1], [2], max_new_tokens=2, modes=("greedy",), seed=3,
                           out_dir=tmp_path, warmup=False, target_ref="builtin:t", draft_ref="runs/d/student",
                           target_identity="t@1", draft_identity="d@2", data_source="bundled:instructions",
                           records_skipped=1)
    assert report["target"]["ref"] == "builtin:t" and report["draft"]["identity"] == "d@2"
    assert report["data"] == {"source": "bundled:instructions", "prompts": 1, "seed": 3, "records_skipped": 1}
    assert report["settings"]["warmup"] is False and report["settings"]["modes"] == ["greedy"]
    md = (tmp_path / "report.md").read_text()
    assert "- Target: `builtin:t`, identity `t@1`" in md and "- Draft: `runs/d/student`, identity `d@2`" in md
    assert "- Data: 1 prompts from `bundled:instructions` (seed 3), 1 malformed record(s) skipped" in md


def test_self_draft_reaches_the_upper_bound(tmp_path, tok, pair):
    target, _ = pair
    report = run_spec_eval(
        target, target, tok, PROMPTS[:1], [3], max_new_tokens=8, modes=("greedy",), out_dir=tmp_path, warmup=False
    )
    (row,) = report["results"]
    assert row["acceptance_rate"] == 1.0
    assert row["block_efficiency"] == 4.0  # 8 tokens in 2 target calls
    assert row["expected_block_efficiency"] == 4.0
    assert row["mbsu"] == pytest.approx(4.0 / (1 + 3))


def test_bad_arguments(tmp_path, tok, pair):
    target, draft = pair
    with pytest.raises(ValueError, match="unknown mode"):
        run_spec_eval(target, draft, tok, PROMPTS, [1], max_new_tokens=2, modes=("beam",), out_dir=tmp_path)
    with pytest.raises(ValueError, match="gammas"):
        run_spec_eval(target, draft, tok, PROMPTS, [0], max_new_tokens=2, out_dir=tmp_path)
    small = tiny_llama(64, layers=1)
    with pytest.raises(ValueError, match="share the tokenizer"):
        run_spec_eval(target, small, tok, PROMPTS, [1], max_new_tokens=2, out_dir=tmp_path)


def test_prompt_ids_use_the_chat_template(tok):
    ids = prompt_ids(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    tok_no_template = tiny_tokenizer(320)
    tok_no_template.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        prompt_ids(tok_no_template, [{"role": "user", "content": "hi"}])


def test_cli_spec_eval_on_saved_models(tmp_path, tok, pair):
    from stillroom.cli.main import main

    target, draft = pair
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        json.dumps({"prompt": "Explain the with statement"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Count the words"}, {"role": "assistant", "content": "3"}]})
        + "\n"
    )
    out = tmp_path / "report"
    rc = main([
        "spec-eval", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
        "--gamma", "1", "2", "--data", str(data), "--prompts", "2", "--max-new-tokens", "4", "--out", str(out),
        "--threads", "1",
    ])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["prompts"] == 2
    # the report names what it measured: the two models, the data and the settings
    assert report["target"]["ref"] == str(tmp_path / "target") and report["draft"]["ref"] == str(tmp_path / "draft")
    assert report["target"]["identity"].startswith("local:") and report["draft"]["identity"].startswith("local:")
    assert report["target"]["identity"] != report["draft"]["identity"]
    assert report["data"] == {"source": str(data), "prompts": 2, "seed": 0, "records_skipped": 0}
    assert report["settings"]["gammas"] == [1, 2] and report["settings"]["dtype"] == "float32"
    assert report["settings"]["torch_threads"] == 1 and report["settings"]["max_new_tokens"] == 4
    md = (out / "report.md").read_text()
    assert f"- Target: `{tmp_path / 'target'}`, identity `{report['target']['identity']}`" in md
    assert f"- Draft: `{tmp_path / 'draft'}`" in md and f"- Data: 2 prompts from `{data}` (its first readable records)" in md
    assert "- Settings: gamma 1 2; modes greedy, sampling; 4 new tokens per prompt" in md
    assert {(r["mode"], r["gamma"]) for r in report["results"]} == {
        ("greedy", 1), ("greedy", 2), ("sampling", 1), ("sampling", 2)
    }
    assert all(r["matches_target_greedy"] for r in report["results"] if r["mode"] == "greedy")


def test_cli_prompt_loading_from_bundled_and_errors(tmp_path):
    from stillroom.data.prompts import prompt_of, read_prompts
    from stillroom.models import model_source

    prompts = [p.prompt for p in read_prompts("bundled:instructions", 3)]
    assert len(prompts) == 3
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
    assert prompt_of({"text": "one two three"}, "x") == "one two three"
    with pytest.raises(ValueError, match="x:3: a prompt record needs"):
        prompt_of({"answer": 1}, "x:3")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_prompts(str(bad), 2)
    assert model_source("builtin:smollm2-135m-instruct").builtin == "smollm2-135m-instruct"
    assert model_source("/x/model.Q4.gguf").gguf == "/x/model.Q4.gguf"
    assert model_source("./folder").path == "./folder"


def test_speedup_is_a_throughput_ratio(tmp_path, tok, pair):
    target, draft = pair
    report = run_spec_eval(target, draft, tok, PROMPTS[:1], [2], max_new_tokens=4, modes=("greedy",), out_dir=tmp_path)
    (row,) = report["results"]
    assert row["speedup"] == pytest.approx(row["tokens_per_s"] / report["baseline"]["greedy"]["tokens_per_s"])
    assert row["wall_s"] > 0
