"""`stillroom transfer` through the CLI, and its output recycled: the shipped corda_kpm recipe (LoRA with a
CorDA knowledge-preserving init) fine-tunes the transferred folder for a few steps."""

import json
from pathlib import Path

import torch
from cli_helpers import stillroom
from helpers import save_model, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

RECIPE = Path(__file__).resolve().parents[2] / "stillroom" / "recipes" / "corda_kpm.yaml"


def _folders(tmp_path: Path) -> tuple[str, str, str]:
    tok = tiny_tokenizer()
    return tuple(str(save_model(tiny_llama(len(tok), layers=2, hidden=32, seed=s), tok, tmp_path / n))
                 for s, n in ((1, "ft"), (2, "base"), (3, "new")))


def test_transfer_then_corda_kpm_recipe_fine_tunes_the_result(tmp_path, tiny_teacher_dir):
    ft, base, new = _folders(tmp_path)
    out = tmp_path / "transferred"
    stillroom("transfer", "--fine-tuned", ft, "--base", base, "--new-base", new, "--out", str(out), "--scale", "0.5")
    w = {k: load_file(f"{f}/model.safetensors") for k, f in (("ft", ft), ("base", base), ("new", new), ("out", out))}
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(w["out"][name], w["new"][name] + 0.5 * (w["ft"][name] - w["base"][name]), atol=1e-6)
    assert json.loads((out / "transfer.json").read_text())["inputs"]["new_base"]["path"] == new

    deeper = str(save_model(tiny_llama(320, layers=3, hidden=32, seed=4), tiny_tokenizer(), tmp_path / "deeper"))
    bad = stillroom("transfer", "--fine-tuned", ft, "--base", base, "--new-base", deeper, "--out",
                    str(tmp_path / "bad"), check=False)
    assert bad.returncode != 0 and "num_hidden_layers: 2 vs 3" in bad.stderr
    assert not (tmp_path / "bad").exists()

    proc = stillroom(
        "run", str(RECIPE), f"output_dir={tmp_path / 'runs'}", f"teacher.model={{path: {tiny_teacher_dir}}}",
        "teacher.dtype=float32", f"student.model={{path: {out}}}", "student.lora.r=4", "student.lora.alpha=8",
        "student.lora.corda.sources=[{bundled: instructions, limit: 20}]", "student.lora.corda.samples=4",
        "student.lora.corda.seq_len=32", "data.sources=[{bundled: pydoc, limit: 40}]", "data.seq_len=32",
        "data.heldout_fraction=0.2", "data.heldout_max=4", "train.steps=3", "train.micro_batch_size=2",
        "train.warmup_steps=1", "train.precision=fp32", "eval.heldout_sequences=4", "eval.generations=0",
        "eval.speed_tokens=16", "eval.batch_size=2",
    )
    assert "CorDA (kpm)" in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "runs" / "corda_kpm" / "report.json").read_text())
    assert 0 < report["student_after"]["trainable_params"] < report["student_after"]["params"] / 4
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "corda_kpm" / "student")
    assert not any("lora" in n for n, _ in saved.named_parameters())
    start = AutoModelForCausalLM.from_pretrained(out).state_dict()
    moved = [n for n, p in saved.state_dict().items() if not torch.allclose(p, start[n], atol=1e-6)]
    assert moved and all(("proj" in n) for n in moved)  # only adapted linears changed
