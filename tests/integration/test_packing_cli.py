"""``data.attention: within_documents`` and ``train.activation_checkpointing`` through the real CLI: a tiny KD
run on packed text and packed chat records trains, evaluates and reports its packing counts; a remote teacher
is refused before step 0."""

import json

from cli_helpers import stillroom

QUIET = ["eval.before=false", "eval.generations=0"]


def test_a_run_packs_documents_apart_with_activation_checkpointing(recipe_factory, tmp_path):
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [turn("user", "Add " + f"{i} " * (1 + i % 3)),
                                                     turn("assistant", f"It is {2 * i}.")]}) + "\n" for i in range(48)))
    recipe = recipe_factory(data={"sources": [{"bundled": "pydoc", "limit": 40}, {"path": str(chat)}], "seq_len": 96,
                                  "heldout_fraction": 0.2, "heldout_max": 8, "attention": "within_documents"},
                            train={"activation_checkpointing": True})
    proc = stillroom("run", str(recipe), "train.steps=3", *QUIET)
    run_dir = tmp_path / "runs" / "tiny"
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(loss == loss for loss in losses), proc.stdout  # finite, not NaN
    report = (run_dir / "report.md").read_text()
    stats = dict(item.split("=") for item in report.split("data: ", 1)[1].splitlines()[0].split(", "))
    assert int(stats["boundary_targets_excluded"]) > 0 and int(stats["packed_records"]) > 0
    assert float(stats["padding_fraction_packed"]) < float(stats["padding_fraction_unpacked"])
    resolved = (run_dir / "config.resolved.yaml").read_text()
    assert "attention: within_documents" in resolved and "activation_checkpointing: true" in resolved


def test_a_remote_teacher_is_refused_for_packing_within_documents(recipe_factory, tmp_path):
    recipe = recipe_factory(data={"sources": [{"bundled": "pydoc", "limit": 40}], "seq_len": 32,
                                  "attention": "within_documents"},
                            teacher={"source": "remote", "remote": {"url": "http://127.0.0.1:9/v1"}})
    proc = stillroom("run", str(recipe), "train.steps=1", *QUIET, check=False)
    assert proc.returncode != 0
    assert "data.attention=within_documents: a remote teacher" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()  # refused before step 0
