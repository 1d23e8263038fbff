"""Runs a user can trust, through the real CLI: bad records located, missing local paths, what `validate` checks
(exit 2 for every config error), chat roles, the tokenizer-mismatch hint and the progress lines."""

import json
from pathlib import Path

import pytest
from cli_helpers import stillroom

QUIET = ["eval.before=false", "eval.generations=0"]
TEXT = ("The quick brown fox jumps over the lazy dog near the river bank, and then it runs away into the "
        "forest where the tall trees grow. ")


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ 5. skipped bad records are located


def test_skipped_bad_records_are_shown_in_the_console_and_the_report(recipe_factory, tmp_path):
    rows = [json.dumps({"text": f"{i}. {TEXT}"}) for i in range(40)]
    rows[2] = '{"text": "no closing brace"'            # line 3: invalid JSON
    rows[6] = json.dumps({"body": "wrong field"})      # line 7: no `text` field
    data = _jsonl(tmp_path / "notes.jsonl", rows)
    recipe = recipe_factory(data={"sources": [{"path": str(data)}], "seq_len": 32, "heldout_fraction": 0.2,
                                  "heldout_max": 8, "on_bad_record": "skip"})
    proc = stillroom("run", str(recipe), "train.steps=2", *QUIET)
    assert f"{data}:3: invalid JSON" in proc.stdout, proc.stdout
    run_dir = tmp_path / "runs" / "tiny"
    bad = json.loads((run_dir / "report.json").read_text())["data"]["bad_records"]
    assert bad["count"] == 2
    assert bad["first"][0].startswith(f"{data}:3: invalid JSON")
    assert bad["first"][1].startswith(f"{data}:7: missing field 'text'")
    md = (run_dir / "report.md").read_text()
    assert "## Bad records" in md and f"{data}:7: missing field 'text'" in md


# ------------------------------------------------------------------ 12a. unknown chat roles


def test_a_chat_turn_with_an_unknown_role_is_a_bad_record_naming_the_line(recipe_factory, tmp_path):
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    rows = [json.dumps({"messages": [turn("user", f"What is {i} and {i}?"), turn("assistant", f"It is {2 * i}.")]})
            for i in range(40)]
    rows[1] = json.dumps({"messages": [turn("user", "Hi"), turn("wizard", "I cast a spell"), turn("assistant", "Ok")]})
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    recipe = recipe_factory(data={"sources": [{"path": str(data)}], "seq_len": 64, "heldout_fraction": 0.2,
                                  "heldout_max": 8})
    proc = stillroom("run", str(recipe), "train.steps=1", *QUIET, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{data}:2: messages[1].role is 'wizard'" in proc.stderr
    assert "system, user, assistant, tool" in proc.stderr and "data.on_bad_record=skip" in proc.stderr


# ------------------------------------------------------------------ 6. a missing local path is not a hub id


def test_a_missing_run_folder_is_reported_as_a_folder_not_a_hub_id(recipe_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative path resolves against the folder stillroom runs in
    (tmp_path / "runs").mkdir(exist_ok=True)
    recipe = recipe_factory()
    for command in ("validate", "run"):
        proc = stillroom(command, str(recipe), "student.model.path=runs/nothere/student", check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        resolved = tmp_path.resolve() / "runs" / "nothere" / "student"
        assert f"student.model.path: no such folder: runs/nothere/student (resolved to {resolved})" in proc.stderr
        assert "check the run name or the path" in proc.stderr
        assert "hub id" not in proc.stderr and "hf download" not in proc.stderr
        assert "teacher:" not in proc.stdout  # refused before any model loads


# ------------------------------------------------------------------ 7. validate checks what it can


@pytest.mark.parametrize("overrides,key", [
    (["data.sources=[{path: missing/notes.jsonl}]"], "data.sources[0].path: no such file: missing/notes.jsonl"),
    (["teacher.source=remote"], "teacher.remote.url is not set"),
    (["teacher.source=ensemble"], "teacher.ensemble is empty"),
    (["teacher.source=ensemble", "teacher.ensemble=[{source: store}]"], "teacher.ensemble.0.store.path is required"),
    (["teacher.model.gguf=/no/such/model.gguf", "teacher.model.path=null"],
     "teacher.model.gguf: no such file: /no/such/model.gguf"),
    (["teacher.source=store", "loss.terms=[{name: taid}]"], "loss.terms[0] (taid) needs the teacher's dense logits"),
])
def test_validate_refuses_what_the_run_would_fail_on_later(recipe_factory, overrides, key):
    proc = stillroom("validate", str(recipe_factory()), *overrides, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert key in proc.stderr


def test_every_config_error_exits_2_without_a_python_exception_name(tmp_path):
    recipe = tmp_path / "digits.yaml"
    recipe.write_text("domain: classifier\nmethod: onpolicy\n")
    proc = stillroom("validate", str(recipe), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "method 'onpolicy' works in the lm domain(s)" in proc.stderr and "ValueError" not in proc.stderr
    proc = stillroom("validate", str(recipe), "method=kd", "classifier.teacher.path=no/such/teacher", check=False)
    assert proc.returncode == 2 and "classifier.teacher.path: no such folder: no/such/teacher" in proc.stderr


def test_a_run_with_a_missing_data_file_stops_before_loading_a_model(recipe_factory):
    proc = stillroom("run", str(recipe_factory()), "data.sources=[{path: missing/notes.jsonl}]", check=False)
    assert proc.returncode == 2 and "data.sources[0].path: no such file" in proc.stderr
    assert "teacher:" not in proc.stdout


def test_validate_reads_the_store_manifest_or_says_where_the_store_will_be(recipe_factory, tmp_path):
    store = tmp_path / "store"
    recipe = recipe_factory()
    proc = stillroom("validate", str(recipe), "teacher.source=store", f"teacher.store.path={store}")
    assert f"the run will read the teacher store in {store}, not written yet" in proc.stdout
    assert f"`stillroom cache-teacher {recipe} teacher.source=store teacher.store.path={store}` writes it" in proc.stdout
    store.mkdir()
    (store / "manifest.json").write_text("{not json")
    proc = stillroom("validate", str(recipe), "teacher.source=store", f"teacher.store.path={store}", check=False)
    assert proc.returncode == 2 and f"teacher.store: {store / 'manifest.json'}: not valid JSON" in proc.stderr


# ------------------------------------------------------------------ 12b. the tokenizer mismatch names commands


def test_a_tokenizer_mismatch_names_the_commands_that_distill_through_text(recipe_factory, tmp_path):
    from helpers import save_tiny_teacher

    other = save_tiny_teacher(tmp_path / "other", layers=2, vocab_size=300, seed_text="another corpus",
                              pretrain_steps=0)
    proc = stillroom("run", str(recipe_factory(student={"model": {"path": str(other)}})), check=False)
    assert proc.returncode == 1 and "VocabularyMismatch" in proc.stderr
    assert "`stillroom generate`" in proc.stderr and "`stillroom select`" in proc.stderr
    assert "stillroom.datagen" not in proc.stderr


# ------------------------------------------------------------------ 12d. progress lines off a terminal


def test_log_every_one_prints_every_step_of_a_short_run(recipe_factory):
    proc = stillroom("run", str(recipe_factory()), "train.steps=6", "train.log_every=1", *QUIET)
    printed = [n for n in range(1, 7) if f"step {n}/6 loss" in proc.stdout]
    assert printed == [1, 2, 3, 4, 5, 6], proc.stdout


def test_progress_prints_every_max_of_log_every_and_a_twentieth_of_the_steps():
    from stillroom.train.progress import Progress

    def lines(total, every, start=0):
        out = []
        progress = Progress(total, start, enabled=True, log=out.append, every=every)
        for step in range(start + 1, total + 1):
            progress.update(step, 1.0, 10.0)
        return [int(line.split()[1].split("/")[0]) for line in out]

    assert lines(6, every=3) == [1, 3, 6]
    assert lines(100, every=1) == [1] + list(range(5, 101, 5))
    assert lines(100, every=30) == [1, 30, 60, 90, 100]
    assert lines(10, every=4, start=5) == [6, 8, 10]  # resumed: the first step of this process, then the grid
