"""Self-data distillation: SLERP math, the merge command, rewrite-with-fallback, recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stillroom.datagen.store import GenerationStore
from stillroom.compress.merge import merge_model_folders, merge_state_dicts, slerp
from stillroom.datagen.self_data import rewrite_with_fallback
from stillroom.datagen.verifiers import load_verifier
from helpers import save_model, tiny_llama, tiny_tokenizer

RECIPES = Path(__file__).resolve().parents[3] / "stillroom" / "recipes"


# ---------------------------------------------------------------- SLERP math

def test_slerp_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_sphere():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0])
    for t in (0.1, 0.25, 0.5, 0.9):
        m = slerp(a, b, t)
        assert m.norm().item() == pytest.approx(1.0, abs=1e-6)
        # the angle to a is t * 90 degrees
        assert math.degrees(math.acos(float(m @ a))) == pytest.approx(90 * t, abs=1e-4)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0]), atol=1e-6)


def test_slerp_matches_the_formula_on_random_matrices():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    t = 0.3
    fa, fb = a.double().flatten(), b.double().flatten()
    omega = torch.arccos(fa @ fb / (fa.norm() * fb.norm()))
    want = (torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / torch.sin(omega)
    assert torch.allclose(slerp(a, b, t).double().flatten(), want, atol=1e-6)


def test_parallel_and_zero_tensors_use_lerp():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = 3 * a  # parallel: sin(Omega) = 0
    assert torch.allclose(slerp(a, b, 0.25), 0.75 * a + 0.25 * b)
    z = torch.zeros(3)
    assert torch.allclose(slerp(z, a, 0.5), 0.5 * a)
    assert torch.isfinite(slerp(a, -a, 0.5)).all()  # anti-parallel: lerp as well, no NaN


def test_slerp_keeps_dtype_and_rejects_bad_t():
    a, b = torch.randn(3, dtype=torch.bfloat16), torch.randn(3, dtype=torch.bfloat16)
    assert slerp(a, b, 0.5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="t must be in"):
        slerp(a, b, 1.5)


def test_merge_state_dicts_names_the_mismatched_tensor():
    sd_a = {"w": torch.randn(2, 3), "steps": torch.tensor([4])}
    with pytest.raises(ValueError, match=r"tensor 'w' has shape \(2, 3\) in A but \(3, 2\) in B"):
        merge_state_dicts(sd_a, {"w": torch.randn(3, 2), "steps": torch.tensor([4])}, 0.5)
    with pytest.raises(ValueError, match="only in B: \\['x'\\]"):
        merge_state_dicts(sd_a, {**sd_a, "x": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="non-floating tensor 'steps'"):
        merge_state_dicts(sd_a, {"w": torch.randn(2, 3), "steps": torch.tensor([5])}, 0.5)
    merged = merge_state_dicts(sd_a, {"w": torch.randn(2, 3), "steps": torch.tensor([4])}, 0.5)
    assert torch.equal(merged["steps"], torch.tensor([4]))


# ---------------------------------------------------------------- merge command

@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("merge")
    a = save_model(tiny_llama(len(tok), layers=2, seed=0), tok, root / "a")
    b = save_model(tiny_llama(len(tok), layers=2, seed=1), tok, root / "b")
    return tok, a, b, root


def test_cli_merge_of_two_saved_models(two_models, capsys):
    from transformers import AutoModelForCausalLM

    from stillroom.cli.main import main

    tok, a, b, root = two_models
    out = root / "merged"
    assert main(["merge", str(a), str(b), "--t", "0.5", "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out.with_name("merged.tmp")).exists()
    sd_a, sd_b, sd_m = (load_file(str(p / "model.safetensors")) for p in (a, b, out))
    assert set(sd_m) == set(sd_a)
    for name in sd_a:
        assert torch.allclose(sd_m[name], slerp(sd_a[name], sd_b[name], 0.5), atol=1e-6), name
    model = AutoModelForCausalLM.from_pretrained(out)  # loads as a regular HF model
    ids = torch.tensor([tok("hello world")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert json.loads((out / "stillroom_merge.json").read_text())["t"] == 0.5
    # t=0 reproduces A exactly; an existing --out is refused without --overwrite
    assert main(["merge", str(a), str(b), "--t", "0", "--out", str(out), "--overwrite"]) == 0
    assert all(torch.equal(v, sd_a[k]) for k, v in load_file(str(out / "model.safetensors")).items())
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err


def test_merge_refuses_different_architectures(two_models, tmp_path):
    tok, a, _, _ = two_models
    c = save_model(tiny_llama(len(tok), layers=3, seed=2), tok, tmp_path / "c")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        merge_model_folders(a, c, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_merge_names_a_mismatched_tensor_and_leaves_nothing_behind(two_models, tmp_path):
    import shutil

    from safetensors.torch import save_file

    _, a, _, _ = two_models
    x = tmp_path / "x"
    shutil.copytree(a, x)
    sd = load_file(str(x / "model.safetensors"))
    name = sorted(k for k in sd if k.endswith("q_proj.weight"))[0]
    sd[name] = sd[name][:-1].contiguous()  # same config, one tensor of another shape
    save_file(sd, str(x / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape"):
        merge_model_folders(a, x, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_merge_refuses_pickled_weights(two_models, tmp_path):
    _, a, _, _ = two_models
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text((a / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickled weights are never loaded"):
        merge_model_folders(a, d, tmp_path / "out")


# ---------------------------------------------------------------- rewrite with fallback

ITEMS = [
    {"id": "p1", "question": "2+2", "completion": "Two and two make 4.", "answer": 4},
    {"id": "p2", "question": "3+3", "completion": "Three and three make 6.", "answer": 6},
    {"id": "p3", "question": "5+5", "completion": "Five and five make 10.", "answer": 10},
]


def _fake_complete(prompts: list[str], n: int) -> list[list[str]]:
    out = []
    for p in prompts:
        if "2+2" in p:
            out.append(["The answer is 4."])  # verified -> kept
        elif "3+3" in p:
            out.append(["The answer is 7."])  # wrong -> original
        else:
            out.append([""])  # malformed -> original
    return out


def test_rewrite_with_fallback_keeps_verified_and_falls_back(tmp_path):
    calls = []

    def complete(prompts, n):
        calls.append(list(prompts))
        return _fake_complete(prompts, n)

    template = "Q: {question}\nReference: {completion}\nRewrite:"
    with GenerationStore(tmp_path / "store.jsonl") as store:
        records, stats = rewrite_with_fallback(
            complete, ITEMS, template=template, verifier=load_verifier("numeric"), store=store,
            teacher_id="fake", settings={"greedy": True}, batch_size=2,
        )
    assert [r["completion"] for r in records] == ["The answer is 4.", ITEMS[1]["completion"], ITEMS[2]["completion"]]
    assert [r["target_source"] for r in records] == ["rewrite", "original", "original"]
    assert all(r["original_completion"] == i["completion"] for r, i in zip(records, ITEMS))
    assert stats["rewritten"] == 1 and stats["fallback_unverified"] == 1 and stats["fallback_malformed"] == 1
    assert stats["rewrite_rate"] == pytest.approx(1 / 3)
    assert "Reference: Two and two make 4." in calls[0][0]  # the template sees the reference
    # a rerun resumes from the store: no new teacher calls, same records
    with GenerationStore(tmp_path / "store.jsonl") as store:
        again, stats2 = rewrite_with_fallback(
            complete, ITEMS, template=template, verifier=load_verifier("numeric"), store=store,
            teacher_id="fake", settings={"greedy": True},
        )
    assert len(calls) == 2 and again == records and stats2["generation"]["samples_written"] == 0


def test_rewrite_with_fallback_survives_a_failing_teacher(tmp_path):
    def broken(prompts, n):
        raise RuntimeError("server down")

    with GenerationStore(tmp_path / "s.jsonl") as store:
        records, stats = rewrite_with_fallback(
            broken, ITEMS, template="{question}", verifier=load_verifier("numeric"), store=store,
            teacher_id="t", settings={},
        )
    assert stats["fallback_malformed"] == 3 and [r["completion"] for r in records] == [i["completion"] for i in ITEMS]


def test_rewrite_with_fallback_needs_the_reference():
    with pytest.raises(ValueError, match="needs a string 'completion'"):
        rewrite_with_fallback(_fake_complete, [{"id": "x", "question": "1+1"}], template="{question}",
                              verifier=load_verifier("numeric"), store=None, teacher_id="t", settings={})


def test_rewrite_with_a_real_tiny_model(tmp_path):
    from stillroom.datagen.complete import hf_complete_fn

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=2)
    complete = hf_complete_fn(model, tok, sampling_temperature=0.0, top_p=1.0, max_new_tokens=4, seed=0,
                              use_chat_template=False)
    with GenerationStore(tmp_path / "s.jsonl") as store:
        records, stats = rewrite_with_fallback(
            complete, ITEMS, template="{question} =", verifier=lambda text, item: True, store=store,
            teacher_id="tiny", settings={"max_new_tokens": 4},
        )
    # an always-true verifier keeps every well-formed rewrite
    assert stats["rewritten"] + stats["fallback_malformed"] == 3
    assert all(r["target_source"] == "rewrite" for r in records if r["completion"] != r["original_completion"])


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize("name", ["self_data_recover", "self_data_rewrite"])
def test_recipes_validate(name):
    from stillroom.config.load import load_config

    cfg = load_config(RECIPES / f"{name}.yaml")
    if name == "self_data_recover":
        assert cfg.method == "sft"
        assert cfg.student.from_teacher.strategy == "angular"
    else:
        assert cfg.generate.mode == "rewrite" and cfg.generate.export.fallback_to_original


def test_rewrite_recipe_runs_through_stillroom_generate(tmp_path):
    """The shipped rewrite recipe, with a tiny teacher and 4 problems: every record is exported once,
    as a verified rewrite or as its original target (a random tiny model rarely gets a number right)."""
    from stillroom.cli.main import main

    tok = tiny_tokenizer()
    teacher = save_model(tiny_llama(len(tok), layers=2), tok, tmp_path / "teacher")
    export = tmp_path / "rewrites.jsonl"
    assert main(["generate", str(RECIPES / "self_data_rewrite.yaml"), f"teacher.model.path={teacher}",
                 "teacher.model.builtin=null", "teacher.dtype=float32", "generate.input.n=4",
                 "generate.max_new_tokens=4", f"generate.output={tmp_path / 'store.jsonl'}",
                 f"generate.export.path={export}", f"output_dir={tmp_path}"]) == 0
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert len({r["prompt_id"] for r in rows}) == 4 and len(rows) == 4
    assert all(r["source"] in ("teacher", "original") and r["completion"] for r in rows)
