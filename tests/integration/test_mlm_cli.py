"""The mlm domain through the real CLI with a tiny BERT (MiniLM's tokenizer, offline): plain MLM further
pre-training (theta_0 of the other tests), self-distillation for further pre-training (the [CLS] regression
onto a teacher further pre-trained here, and the L2-SP ablation), each resumed exactly after a kill, the
teacher of another width refused before step 0, and the saved classifier fine-tuned on few labels."""

import json

import pytest
from cli_helpers import assert_same_losses, stillroom

TINY = ["mlm.student_path=null", "mlm.student.hidden_size=32", "mlm.student.layers=2", "mlm.seq_len=32",
        "mlm.probe_per_class=8", "mlm.probe_max_iter=100", "mlm.eval_max_sequences=32", "train.micro_batch_size=8",
        "train.log_every=1", "train.keep_checkpoints=2", "eval.before=false"]
CONST = ["train.schedule=constant", "train.warmup_steps=0", "train.save_every=3"]


def _report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def theta0(tmp_path_factory):
    """A plain MLM run (method sft) of a tiny BERT: its student/ is theta_0 of the other tests."""
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    stillroom("run", "mlm_further_pretrain_pydoc", "name=theta0", f"output_dir={out}", f"cache_dir={cache}", *TINY,
              "train.steps=6", *CONST)
    return out / "theta0", cache


def _resumes_exactly(tmp_path, recipe, *args):
    """The run of 6 steps, and the same run stopped after its step-3 checkpoint then --resume'd: same losses."""
    common = (recipe, f"output_dir={tmp_path}", *args, *CONST)
    stillroom("run", *common, "name=full", "train.steps=6")
    stillroom("run", *common, "name=part", "train.steps=3")
    resumed = stillroom("run", *common, "name=part", "train.steps=6", "--resume")
    assert "resumed from" in resumed.stdout
    assert_same_losses(tmp_path / "part", tmp_path / "full", abs=1e-6, steps=6)
    return tmp_path / "full"


def test_plain_mlm_saves_folders_that_auto_classes_load(theta0):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _ = theta0
    row = _report(run_dir)["student_after"]
    assert row["mlm_loss"] > 0 and 0 <= row["probe_accuracy"] <= 1 and row["sequences_per_s"] > 0
    AutoModelForMaskedLM.from_pretrained(run_dir / "student")
    clf = AutoModelForSequenceClassification.from_pretrained(run_dir / "student_classifier")
    assert clf.config.num_labels == 8 and AutoTokenizer.from_pretrained(run_dir / "student").mask_token == "[MASK]"
    assert "MLM loss (held-out)" in (run_dir / "report.md").read_text()


def test_plain_mlm_resumes_exactly(tmp_path, theta0):
    _resumes_exactly(tmp_path, "mlm_further_pretrain_pydoc", f"cache_dir={theta0[1]}", *TINY)


def test_self_distill_regression_resumes_exactly(tmp_path, theta0):
    run_dir, cache = theta0
    full = _resumes_exactly(tmp_path, "self_distill_fpt_text", f"cache_dir={cache}", *TINY[1:],
                            f"mlm.student_path={run_dir / 'student'}", f"mlm.teacher.init_path={run_dir / 'student'}",
                            "mlm.teacher.steps=4", "mlm.teacher.batch_size=8")
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/cls_regression" in m and "loss/mlm" in m for m in metrics)
    assert metrics[0]["loss/cls_regression"] > 0  # the teacher moved away from theta_0
    assert any("further pre-trained from" in str(n) for n in _report(full)["notes"])


def test_self_distill_l2sp_resumes_exactly(tmp_path, theta0):
    run_dir, cache = theta0
    full = _resumes_exactly(tmp_path, "self_distill_fpt_text", f"cache_dir={cache}", *TINY[1:],
                            f"mlm.student_path={run_dir / 'student'}", "self_distill_fpt.regularizer=l2sp",
                            "self_distill_fpt.weight=0.1")
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss/l2sp"] == 0 and metrics[-1]["loss/l2sp"] > 0  # zero at theta_0, then it moves


def test_teacher_of_another_width_is_refused_before_training(tmp_path, theta0):
    run_dir, cache = theta0
    stillroom("run", "mlm_further_pretrain_pydoc", "name=wide", f"output_dir={tmp_path}", f"cache_dir={cache}",
              *TINY, "mlm.student.hidden_size=64", "train.steps=1")
    proc = stillroom("run", "self_distill_fpt_text", f"output_dir={tmp_path}", f"cache_dir={cache}", *TINY[1:],
                     f"mlm.student_path={run_dir / 'student'}", f"mlm.teacher.path={tmp_path / 'wide' / 'student'}",
                     check=False)
    assert proc.returncode != 0 and "mlm.teacher.path: the teacher has vocabulary 30522 and width 64" in \
        proc.stdout + proc.stderr
    assert not (tmp_path / "self_distill_fpt_text" / "metrics.jsonl").exists()


def test_kd_and_a_bad_text_file_are_refused(tmp_path):
    proc = stillroom("run", "mlm_further_pretrain_pydoc", "method=kd", f"output_dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "domain: mlm takes method" in proc.stdout + proc.stderr
    bad = tmp_path / "texts.jsonl"
    bad.write_text('{"text": "a fine line of text with words"}\n{"label": "no text here"}\n')
    proc = stillroom("run", "mlm_further_pretrain_pydoc", f"mlm.dataset={bad}", f"output_dir={tmp_path}", *TINY,
                     check=False)
    assert proc.returncode != 0 and "texts.jsonl line 2: no \"text\" string" in proc.stdout + proc.stderr


def test_few_label_finetuning_of_the_saved_classifier(tmp_path, theta0):
    from stillroom.domains.text_encoder.data import build_text_splits
    from stillroom.domains.text_encoder.models import load_tokenizer
    from stillroom.domains.text_encoder.probe import finetune

    run_dir, _ = theta0
    data = build_text_splits("pydoc", load_tokenizer(str(run_dir / "student"), "t"), classes=8, min_words=8,
                             heldout_fraction=0.2, seq_len=32)
    out = finetune(run_dir / "student_classifier", data.train, data.heldout, per_class=4, steps=3, seed=0,
                   work=tmp_path / "ft", batch_size=8, warmup_steps=1)
    again = finetune(run_dir / "student_classifier", data.train, data.heldout, per_class=4, steps=3, seed=0,
                     work=tmp_path / "ft2", batch_size=8, warmup_steps=1)
    assert out["train_texts"] == 32 and out["heldout_texts"] == 208 and 0 <= out["accuracy"] <= 1
    assert out == again  # seeded: the same texts, dropout and head give the same result
