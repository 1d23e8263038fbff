"""Quantization-aware distillation through the real CLI: a Q4_0 student (the teacher's every other layer)
distilled from the full-precision tiny teacher, with the CE baseline (QAT-CE); the saved students are exported
on the grid (HF folder + GGUF) and compute what was trained; a run stopped half way and resumed logs the same
losses as one that was not. `stillroom quantize` (PTQ) writes the same two forms of a folder."""

import json

import pytest
import torch
from cli_helpers import run_losses, stillroom
from transformers import AutoModelForCausalLM

QUANT = {"quantize": {"format": "q4_0"}}
FAST = ["eval.generations=0", "eval.heldout_sequences=4", "eval.speed_tokens=16"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_qad_run_exports_the_trained_grid_and_resumes(recipe_factory, tmp_path, tiny_teacher_dir):
    recipe = recipe_factory(student={"from_teacher": {"strategy": "every_n", "every_n": 2}, **QUANT},
                            train={"steps": 4, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 1,
                                   "lr": 1e-3, "save_every": 2, "schedule": "constant"}, baseline=True)
    proc = stillroom("run", str(recipe), "name=full", *FAST)
    assert "train on the q4_0 grid" in proc.stdout
    run_dir = tmp_path / "runs" / "full"
    report = json.loads((run_dir / "report.json").read_text())
    assert {"student_before", "student_after", "baseline"} <= set(report)
    assert "q4_0-quantized student" in (run_dir / "report.md").read_text()

    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    for folder in (run_dir / "student", run_dir / "baseline" / "student"):
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        gguf_file = folder.name + ".gguf"
        gg = AutoModelForCausalLM.from_pretrained(folder.parent, gguf_file=gguf_file, dtype=torch.float32).eval()
        assert torch.equal(_logits(hf, ids), _logits(gg, ids))
        w = hf.model.layers[0].self_attn.q_proj.weight.view(-1, 32)
        assert w.unique(dim=None).numel() > 1 and (w.abs().amax(-1) > 0).all()
        d = w.gather(-1, w.abs().argmax(-1, keepdim=True)) / -8  # every weight sits on its block's Q4_0 grid
        codes = w / d
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= -8 - 1e-3 and codes.max() <= 7.001

    half = tmp_path / "runs" / "half"
    stillroom("run", str(recipe), "name=half", "train.steps=2", "baseline=false", *FAST)
    stillroom("run", str(recipe), "name=half", "--resume", "train.steps=4", "baseline=false", *FAST)
    assert run_losses(half) == pytest.approx(run_losses(run_dir), abs=1e-6)

    stillroom("quantize", str(tiny_teacher_dir), "--out", str(tmp_path / "ptq"), "--format", "q8_0")
    ptq = AutoModelForCausalLM.from_pretrained(tmp_path / "ptq", dtype=torch.float32).eval()
    ptq_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="ptq.gguf", dtype=torch.float32).eval()
    assert torch.equal(_logits(ptq, ids), _logits(ptq_gguf, ids))
    refused = stillroom("quantize", str(tiny_teacher_dir), "--out", str(tmp_path / "ptq"), check=False)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr
