"""REDI (method: redi): the weighted CE equals the REDI objective, pairs stay together, refusals,
a CLI run on tiny models, the recipes, and D_SFT / D_Pref construction."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama

from pydantic import ValidationError

from stillroom.config.schema import DataConfig, LossConfig, LossTerm, RunConfig
from stillroom.data import build_splits
from stillroom.data.batch import Example, collate
from stillroom.datagen.preference import build_preference_data, preference_data_from_store
from stillroom.domains.lm.forward import StudentForward
from stillroom.losses import LossMix
from stillroom.methods.base import StepCounts
from stillroom.methods.redi import PairEncoder, RediWeights, normalised_logps, redi_weights
from stillroom.train.loop import forward_backward
from stillroom.train.loop import DistillObjective, Player

V = 23


def _model(seed=0):
    """A 2-layer random Llama with an untied head, LlamaConfig's special ids and 64 positions, in train mode."""
    return tiny_llama(V, layers=2, seed=seed, tie=False, max_positions=64, bos=1, eos=2, pad=None).train()


def _pair(i, prompt_len, chosen_len, rejected_len, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, V, (prompt_len,), generator=g).tolist()
    out = []
    for role, n in (("chosen", chosen_len), ("rejected", rejected_len)):
        resp = torch.randint(2, V, (n,), generator=g).tolist()
        out.append(Example(prompt + resp, [False] * prompt_len + [True] * n, uid=f"src:{i}:{role}:h", role=role))
    return out


def _weighted(weights: RediWeights, micro: list, step: int) -> list:
    counts = StepCounts(step=step, targets=sum(b.num_targets for b in micro), all_reduce_sum=lambda v: v)
    for b, w in zip(micro, weights(micro, counts)):
        b.target_weight = w
    return micro


def _hand_objective(model, pairs, alpha):
    """Mean over pairs of -log pi(y_w|x)/|y_w| + alpha log pi(y_l|x)/|y_l|, straight from the logits."""
    total = 0.0
    for chosen, rejected in pairs:
        terms = []
        for ex in (chosen, rejected):
            ids = torch.tensor([ex.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits.float()[0], dim=-1)
            resp = [t for t in range(1, len(ex.input_ids)) if ex.target[t]]
            terms.append(sum(logp[t - 1, ex.input_ids[t]] for t in resp) / len(resp))
        total = total + (-terms[0] + alpha * terms[1])
    return total / len(pairs)


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("shape", ["one_pair", "three_pairs_one_micro", "three_pairs_two_micro"])
@pytest.mark.parametrize("fused", [False, True])
def test_weighted_ce_is_the_redi_objective(alpha, shape, fused):
    model = _model()
    specs = [(3, 4, 7), (2, 9, 2), (5, 1, 5)]  # prompt, chosen and rejected lengths differ
    n_pairs = 1 if shape == "one_pair" else 3
    pairs = [tuple(_pair(i, *specs[i], seed=10 + i)) for i in range(n_pairs)]
    flat = [e for p in pairs for e in p]
    micro = [collate(flat, 0)] if shape != "three_pairs_two_micro" else [collate(flat[:2], 0), collate(flat[2:], 0)]
    micro = _weighted(RediWeights(alpha=alpha, model=model, monitor_every=1), micro, 0)
    n_targets = sum(b.num_targets for b in micro)

    mix = LossMix(LossConfig(terms=[LossTerm(name="ce")], fused=fused, chunk_tokens=8))
    fwd = StudentForward(model, fused=fused, hidden_layers=[], vocab=V)
    player = Player("student", model, DistillObjective(fwd, mix, None))
    model.zero_grad()
    loss_sum, _, _ = forward_backward(micro, player, fwd, device=torch.device("cpu"), precision="fp32",
                                      scale=1.0 / n_targets)
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    want = _hand_objective(model, pairs, alpha)
    want.backward()
    assert loss_sum / n_targets == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    if alpha == 0.0 and shape == "one_pair":  # alpha 0 is SFT on the positive: HF's mean token CE
        c = pairs[0][0]
        labels = torch.tensor([[-100 if not f else t for t, f in zip(c.input_ids, c.target)]])
        ref = model(input_ids=torch.tensor([c.input_ids]), labels=labels).loss
        assert loss_sum / n_targets == pytest.approx(float(ref.detach()), rel=1e-5)


def test_weights_and_monitor_values():
    model = _model()
    pairs = [_pair(0, 3, 4, 2, seed=1), _pair(1, 2, 3, 6, seed=2)]
    batch = collate([e for p in pairs for e in p], 0)
    w = redi_weights(batch, alpha=0.5, global_pairs=4, global_targets=30)
    lengths = batch.loss_mask.sum(1).float()
    torch.testing.assert_close(w.sum(1), torch.tensor([30 / 4, -0.5 * 30 / 4] * 2))
    assert (w[~batch.loss_mask] == 0).all() and torch.allclose(w[0][batch.loss_mask[0]], 30 / (4 * lengths[0]))
    model.train()
    prep = RediWeights(alpha=0.5, model=model, monitor_every=2)
    _weighted(prep, [batch], 0)
    lp = normalised_logps(model, batch)
    state = prep.metrics()
    assert state["redi/logp_chosen"] == pytest.approx(float(lp[0::2].mean()), rel=1e-5)
    assert state["redi/logp_rejected"] == pytest.approx(float(lp[1::2].mean()), rel=1e-5)
    assert state["redi/monitor_step"] == 0 and state["redi/pairs"] == 2
    assert model.training  # the monitor restores the mode
    _weighted(prep, [batch], 1)  # not a monitor step: last measurement kept
    assert prep.metrics()["redi/monitor_step"] == 0


def test_batches_must_hold_whole_pairs():
    a, b = _pair(0, 2, 2, 2, seed=0)
    c, _ = _pair(1, 2, 2, 2, seed=1)
    with pytest.raises(ValueError, match="not the chosen and rejected"):
        redi_weights(collate([a, c], 0), alpha=0.8, global_pairs=1, global_targets=4)
    with pytest.raises(ValueError, match="whole pairs"):
        redi_weights(collate([a, b, c], 0), alpha=0.8, global_pairs=1, global_targets=4)


def test_pairs_come_from_the_one_pipeline(tmp_path):
    from helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    rows = [{"prompt": f"q{i} is", "chosen": f" a{i}.", "rejected": " no" * (30 if i == 3 else 1)} for i in range(12)]
    rows[5].pop("rejected")
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = {"path": str(path), "completion_field": "chosen"}
    data = build_splits(DataConfig(sources=[src], seq_len=24, heldout_fraction=0.25, on_bad_record="skip"), tok, 0,
                        PairEncoder("rejected"))
    assert data.group_size == 2 and len(data.train) % 2 == 0
    assert [e.role for e in data.train[:4]] == ["chosen", "rejected", "chosen", "rejected"]
    assert data.stats["records_bad"] == 1  # the record without a rejected trace, named file:line
    assert "p.jsonl:6: missing the rejected trace field 'rejected'" in data.stats["bad_record_examples"][0]
    assert data.stats["dropped_too_long"] == (0 if 3 in {e.meta["record"] for e in data.heldout} else 1)
    held = {e.meta["record"] for e in data.heldout}
    assert not held & {e.meta["record"] for e in data.train}
    assert all(tok.decode([t for t, f in zip(e.input_ids, e.target) if f]).startswith(" a") for e in data.heldout)


def test_refuses_other_loss_terms_and_odd_batches_when_the_recipe_loads():
    with pytest.raises(ValidationError, match=r"loss.terms are \['ce', 'forward_kl'\]"):
        RunConfig(method="redi", loss={"terms": [{"name": "ce"}, {"name": "forward_kl"}]})
    with pytest.raises(ValidationError, match="exactly one 'ce'"):
        RunConfig(method="redi", loss={"terms": [{"name": "forward_kl"}]})
    with pytest.raises(ValidationError, match="weight must be 1"):
        RunConfig(method="redi", loss={"terms": [{"name": "ce", "weight": 0.5}]})
    with pytest.raises(ValidationError, match="micro_batch_size=3"):
        RunConfig(method="redi", loss={"terms": [{"name": "ce"}]}, train={"micro_batch_size": 3})


def test_recipes_validate():
    from stillroom.cli.main import _recipe_path
    from stillroom.config.load import load_config

    stage1 = load_config(_recipe_path("redi_sft"), [])
    stage2 = load_config(_recipe_path("redi"), [])
    assert stage1.method == "sft" and stage2.method == "redi"
    assert stage2.redi.alpha == 0.8 and [t.name for t in stage2.loss.terms] == ["ce"]
    assert stage2.data.sources[0].completion_field == "chosen" and stage2.train.micro_batch_size % 2 == 0


# ---------------------------------------------------------------------------------- CLI
def _pairs_file(tmp_path, tok, n=24):
    rows = []
    for i in range(n):
        a, b = 10 + i, 7 + 2 * i
        rows.append({"prompt": f"{a} plus {b} is", "chosen": f" {a + b}.", "rejected": f" {a + b + 1 + i % 3} maybe."})
    path = tmp_path / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path, teacher_dir):
    from helpers import tiny_tokenizer

    data = _pairs_file(tmp_path, tiny_tokenizer())
    return {
        "name": "redi", "output_dir": str(tmp_path / "runs"), "method": "redi",
        "teacher": {"model": {"path": str(teacher_dir)}, "dtype": "float32"},
        "student": {"from_teacher": {"strategy": "every_n", "every_n": 2}},
        "data": {"sources": [{"path": str(data), "completion_field": "chosen"}], "seq_len": 32,
                 "heldout_fraction": 0.2, "heldout_max": 4},
        "redi": {"alpha": 0.8, "monitor_every": 2},
        "loss": {"terms": [{"name": "ce"}], "chunk_tokens": 64},
        "train": {"steps": 4, "micro_batch_size": 4, "grad_accum": 2, "precision": "fp32", "warmup_steps": 1,
                  "lr": 1e-3},
        "eval": {"heldout_sequences": 4, "batch_size": 4, "generations": 0, "max_new_tokens": 4, "speed_tokens": 64,
                 "before": False},
    }


def test_cli_run_on_tiny_models(tmp_path, tiny_teacher_dir, capsys):
    import yaml

    from stillroom.cli.main import main

    recipe = _recipe(tmp_path, tiny_teacher_dir)
    path = tmp_path / "redi.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) in (0, None)
    rows = [json.loads(l) for l in (tmp_path / "runs" / "redi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["redi/pairs"] == 4 and r["redi/logp_chosen"] < 0 and r["redi/logp_rejected"] < 0
    assert [r["redi/monitor_step"] for r in rows] == [0, 0, 2, 2]
    # the logged loss is the REDI objective measured before the step's update (monitor steps, same batch)
    assert rows[0]["loss"] == pytest.approx(rows[0]["redi/objective_before_step"], rel=1e-4, abs=1e-5)
    assert (tmp_path / "runs" / "redi" / "student" / "config.json").is_file()

    recipe["loss"]["terms"] = [{"name": "forward_kl"}]
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "name=bad"]) == 2  # refused when the recipe loads
    assert "exactly one 'ce' term; loss.terms are ['forward_kl']" in capsys.readouterr().err


def test_cli_resume_continues_the_pair_order_exactly(tmp_path, tiny_teacher_dir, capsys):
    import shutil

    import yaml

    from stillroom.cli.main import main

    recipe = _recipe(tmp_path, tiny_teacher_dir)
    recipe["train"].update(save_every=2, keep_checkpoints=2)
    recipe["eval"].update(heldout_sequences=2)
    path = tmp_path / "redi.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "name=full"]) in (0, None)
    full_dir = tmp_path / "runs" / "full"
    full = [json.loads(l) for l in (full_dir / "metrics.jsonl").read_text().splitlines()]
    resumed_dir = tmp_path / "runs" / "resumed"
    shutil.copytree(full_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_000004")
    (resumed_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:2]))
    capsys.readouterr()
    assert main(["run", str(path), "name=resumed", "--resume"]) in (0, None)
    assert "at step 2" in capsys.readouterr().out  # really resumed (a restart would give the same numbers)
    resumed = [json.loads(l) for l in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], abs=1e-6)
    assert [r["targets"] for r in resumed] == [r["targets"] for r in full]


# ---------------------------------------------------------------------------------- data
def test_build_preference_data(tmp_path):
    from stillroom.datagen.store import GenerationStore, make_key

    items = [{"id": "p1", "prompt": "1+1=", "answer": 2}, {"id": "p2", "prompt": "2+2=", "answer": 4},
             {"id": "p3", "prompt": "3+3=", "answer": 6}, {"id": "p4", "prompt": "5+5=", "answer": 10}]
    texts = {"p1": ["The answer is 3.", "The answer is 2.", "The answer is 2.", "The answer is 5."],
             "p2": ["The answer is 4.", "4"],                 # correct only
             "p3": ["The answer is 7.", None]}                # incorrect only, plus an error record
    records = []
    for pid, outs in texts.items():
        for s, t in enumerate(outs):
            rec = {"key": make_key(pid, s), "prompt_id": pid, "sample_index": s, "teacher": "t", "settings": {},
                   "text": t}
            if t is None:
                rec["error"] = "empty output"
            records.append(rec)
    stats = {}
    sft, pref = build_preference_data(reversed(records), items, "numeric", stats=stats)
    assert [(r["id"], r["completion"], r["sample_index"]) for r in sft] == [
        ("p1", "The answer is 2.", 1), ("p2", "The answer is 4.", 0), ("p2", "4", 1)]
    assert pref == [{"id": "p1", "prompt": "1+1=", "chosen": "The answer is 2.", "rejected": "The answer is 3.",
                     "chosen_index": 1, "rejected_index": 0}]
    assert stats["error_records"] == 1 and stats["duplicates"] == 1 and stats["correct"] == 4
    assert stats["incorrect"] == 3 and stats["pref_rows"] == 1

    with pytest.raises(KeyError, match="'px' is not among the items"):
        build_preference_data([{**records[0], "prompt_id": "px"}], items, "numeric")

    store = tmp_path / "gen.jsonl"
    with GenerationStore(store) as s:
        s.append(records)
    out = preference_data_from_store(store, items, "numeric", tmp_path / "out")
    lines = (tmp_path / "out" / "pref.jsonl").read_text().splitlines()
    assert out["pref_rows"] == 1 and json.loads(lines[0])["chosen"] == "The answer is 2."
    assert len((tmp_path / "out" / "sft.jsonl").read_text().splitlines()) == 3


def test_preference_data_from_the_generate_export(tmp_path):
    """The chain of recipe redi_sft: `stillroom generate`'s export (keep: all, numeric verifier) -> D_SFT, D_Pref."""
    from stillroom.cli.main import _recipe_path
    from stillroom.config.load import load_config
    from stillroom.datagen.export import export_rows
    from stillroom.datagen.store import make_key
    from stillroom.cli.main import main
    from stillroom.datagen.verifiers import load_verifier

    gcfg = load_config(_recipe_path("redi_sft"), []).generate
    items = [{"id": "a", "prompt": "Q1\n", "answer": 5}, {"id": "b", "prompt": "Q2\n", "answer": 7}]
    texts = {"a": ["2 + 3 = 6. The answer is 6.", "2 + 3 = 5. The answer is 5."], "b": ["The answer is 7."]}
    records = [{"key": make_key(p, s), "prompt_id": p, "sample_index": s, "teacher": "t", "settings": {}, "text": t}
               for p, outs in texts.items() for s, t in enumerate(outs)]
    rows, _ = export_rows(items, records, gcfg, load_verifier(gcfg.verifier))
    export = tmp_path / "all_samples.jsonl"
    export.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["preference-data", "--export", str(export), "--out", str(tmp_path / "d")]) == 0
    pref = [json.loads(l) for l in (tmp_path / "d" / "pref.jsonl").read_text().splitlines()]
    sft = [json.loads(l) for l in (tmp_path / "d" / "sft.jsonl").read_text().splitlines()]
    assert pref == [{"id": "a", "prompt": "Q1\n", "chosen": "2 + 3 = 5. The answer is 5.",
                     "rejected": "2 + 3 = 6. The answer is 6.", "chosen_index": 1, "rejected_index": 0}]
    assert [(r["id"], r["sample_index"]) for r in sft] == [("a", 1), ("b", 0)]
    # CoPG's groups: problems with exactly --group-size samples, rewards from the verdicts, in sample order
    assert main(["preference-data", "--export", str(export), "--out", str(tmp_path / "g"), "--group-size", "2"]) == 0
    groups = [json.loads(l) for l in (tmp_path / "g" / "groups.jsonl").read_text().splitlines()]
    assert groups == [{"id": "a", "prompt": "Q1\n", "completions": texts["a"], "rewards": [0.0, 1.0]}]
    assert main(["preference-data", "--store", str(export), "--items", str(export), "--out", str(tmp_path / "x"),
                 "--group-size", "2"]) == 2  # groups need the export's verdicts
    unverified = [{**r, "verified": None} for r in rows]
    with pytest.raises(ValueError, match="generate.verifier"):
        from stillroom.datagen.preference import preference_data_from_export

        preference_data_from_export(unverified)
