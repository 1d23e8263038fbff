"""A transformers ViT student distilled from the cached digits teacher through the real CLI: the report has the
confusion matrix and the reliability diagrams, the saved student is a Hugging Face folder transformers loads
alone. (A ViT whose patch does not divide the images is refused naming the key: tests/unit/domains/
test_vision_hf_models.py.)"""

import json

import torch
from cli_helpers import stillroom

SHORT = ["classifier.teacher.steps=60", "train.steps=6", "train.warmup_steps=1", "train.save_every=0",
         "train.eval_every=0"]
VIT = ["classifier.student.kind=vit", "classifier.student.hidden_size=16", "classifier.student.layers=1",
       "classifier.student.patch_size=4"]


def test_vit_student_through_the_cli(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    proc = stillroom("run", "classifier_digits", f"output_dir={out}", f"cache_dir={cache}", *SHORT, *VIT)
    assert "student: vit {patch_size 4, hidden_size 16, layers 1, heads 2}" in proc.stdout
    run_dir = out / "classifier_digits"
    md = (run_dir / "report.md").read_text()
    for png in ("confusion_matrix.png", "reliability.png"):
        assert f"![{png}]({png})" in md and (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["student_after"]["steps"] == 6 and report["student_after"]["params"] < 10_000

    from transformers import AutoModelForImageClassification

    student = AutoModelForImageClassification.from_pretrained(run_dir / "student").eval()
    assert type(student).__name__ == "ViTForImageClassification" and student.config.id2label[7] == "7"
    assert student(pixel_values=torch.zeros(1, 1, 8, 8)).logits.shape == (1, 10)
