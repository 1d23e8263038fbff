"""method=llava_mod: the router term on the domain objective, the pair-loss player, the reference, the config."""

import copy
import math
import random
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_llama

from stillroom.config.schema import LossConfig, LossTerm, RunConfig
from stillroom.data.batch import Example, collate
from stillroom.domains.lm.forward import StudentForward
from stillroom.losses import LossMix
from stillroom.losses.preference import preference_loss
from stillroom.methods.base import StepCounts
from stillroom.methods.llava_mod import (
    AUX, MimicObjective, PairStepScale, PolicyLogps, PreferenceObjective, RoutedForward, batch_logps,
    reference_model,
)
from stillroom.models.moe import MoeShape, load_balancing_loss, upcycle_to_moe
from stillroom.teachers.signal import OnlineTeacher
from stillroom.train.loop import DistillObjective, Player, forward_backward

V = 64
CPU = torch.device("cpu")


def _examples(n=8, roles=False):
    rng = random.Random(0)
    out = []
    for i in range(n):
        k = rng.randint(6, 14)
        ids = [rng.randrange(2, V) for _ in range(k)]
        start = rng.randint(2, k - 2)
        role = ("chosen", "rejected")[i % 2] if roles else None
        out.append(Example(ids, [False] * start + [True] * (k - start), uid=f"r{i // 2}:{i % 2}:0", role=role))
    return out


def _moe(seed=1):
    return upcycle_to_moe(tiny_llama(V, layers=2, seed=seed), MoeShape(noise_std=0.02, seed=seed)).train()


def _mimic_grads(fused: bool, coef: float):
    student = _moe()
    teacher = OnlineTeacher(tiny_llama(V, layers=3, seed=2), vocab_size=V)
    mix = LossMix(LossConfig(terms=[LossTerm(name="forward_kl"), LossTerm(name="ce")], chunk_tokens=7, fused=fused))
    inner = DistillObjective(StudentForward(student, fused=fused, hidden_layers=[], vocab=V), mix, teacher)
    forward = RoutedForward(inner.forward, student, capacity_factor=1.5)
    player = Player("student", student, MimicObjective(inner, forward, coef))
    micro = [collate(_examples()[i:i + 4], pad_id=1) for i in (0, 4)]
    n = sum(b.num_targets for b in micro)
    loss, _, parts = forward_backward(micro, player, forward, device=CPU, precision="fp32", scale=1.0 / n)
    return loss / n, parts, [p.grad.clone() for p in student.parameters()], micro, student


def test_mimic_fused_and_plain_paths_agree_with_the_router_term():
    loss_p, parts_p, grads_p, _, _ = _mimic_grads(fused=False, coef=0.01)
    loss_f, parts_f, grads_f, _, _ = _mimic_grads(fused=True, coef=0.01)
    assert math.isclose(loss_p, loss_f, rel_tol=1e-5)
    assert math.isclose(parts_p[AUX], parts_f[AUX], rel_tol=1e-5)
    for a, b in zip(grads_p, grads_f):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_router_term_is_the_target_weighted_mean_of_the_micro_batches_aux():
    loss_0, _, _, _, _ = _mimic_grads(fused=False, coef=0.0)
    loss_1, parts, grads, micro, student = _mimic_grads(fused=False, coef=0.5)
    n = sum(b.num_targets for b in micro)
    # recompute each micro-batch's L_aux from its routers (same weights: grads are not applied)
    auxes = []
    for b in micro:
        forward = RoutedForward(StudentForward(student, fused=False, hidden_layers=[], vocab=V), student, 1.5)
        with torch.no_grad():
            out = forward(b)
        auxes.append(float(load_balancing_loss(out["router_logits"], 2)) * b.num_targets)
    assert math.isclose(parts[AUX], sum(auxes), rel_tol=1e-5)
    assert math.isclose(loss_1 - loss_0, 0.5 * sum(auxes) / n, rel_tol=1e-4)
    assert 0.9 < parts[AUX] / n < 2.0  # near-balanced at init (1 = uniform)


def _pref_player(student, reference, loss_type="sigmoid", coef=0.0):
    forward = RoutedForward(PolicyLogps(student, V), student, None)
    scale = PairStepScale()
    mix = LossMix(LossConfig(terms=[LossTerm(name="ce")]))
    objective = PreferenceObjective(forward, mix, reference, V, loss_type, 0.1, coef, scale)
    return Player("student", student, objective, weight_targets=scale), forward, scale


@pytest.mark.parametrize("micro_pairs", [4, 2, 1])
def test_preference_step_is_the_mean_pair_loss_whatever_the_micro_batches(micro_pairs):
    student, teacher = tiny_llama(V, layers=2, seed=1).train(), tiny_llama(V, layers=2, seed=2).eval()
    exs = _examples(8, roles=True)
    whole = collate(exs, pad_id=1)
    with torch.no_grad():
        ref = batch_logps(teacher, whole, V)
    pol = batch_logps(student, whole, V)
    want, pairs = preference_loss("sigmoid", pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=0.1)
    (want / pairs).backward()
    want_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    player, forward, scale = _pref_player(student, teacher)
    micro = [collate(exs[i:i + 2 * micro_pairs], pad_id=1) for i in range(0, 8, 2 * micro_pairs)]
    n = sum(b.num_targets for b in micro)
    for b, w in zip(micro, scale(micro, StepCounts(step=0, targets=n, all_reduce_sum=lambda x: x))):
        b.target_weight = w
    loss, _, _ = forward_backward(micro, player, forward, device=CPU, precision="fp32", scale=1.0 / n)
    assert math.isclose(loss / n, float(want.detach()) / pairs, rel_tol=1e-5)
    for a, b in zip(want_grads, [p.grad for p in student.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert player.objective.metrics()["llava_mod/pairs"] == micro_pairs


def test_preference_with_an_moe_student_adds_the_router_term_and_kto_pair_runs():
    student, teacher = _moe(), tiny_llama(V, layers=2, seed=2).eval()
    player, forward, scale = _pref_player(student, teacher, loss_type="kto_pair", coef=0.01)
    micro = [collate(_examples(4, roles=True), pad_id=1)]
    n = micro[0].num_targets
    scale(micro, StepCounts(step=0, targets=n, all_reduce_sum=lambda x: x))
    loss, _, parts = forward_backward(micro, player, forward, device=CPU, precision="fp32", scale=1.0 / n)
    assert AUX in parts and 0 < parts["preference"] / n < 1  # KTO halves are in (0, 1)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_reference_student_is_a_frozen_copy_and_teacher_reference_needs_a_teacher():
    student = tiny_llama(V, layers=1, seed=1)
    cfg = SimpleNamespace(llava_mod=SimpleNamespace(reference="student"))
    ref = reference_model(SimpleNamespace(cfg=cfg, model=student, teacher_model=None))
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(ref.parameters()))
    cfg.llava_mod.reference = "teacher"
    with pytest.raises(ValueError, match="teacher in process"):
        reference_model(SimpleNamespace(cfg=cfg, model=student, teacher_model=None))


def _run(**llava_mod):
    extra = llava_mod.pop("run", {})
    return RunConfig.model_validate({"method": "llava_mod", "llava_mod": llava_mod, **extra})


def test_config_checks_name_the_key_to_fix():
    assert _run().llava_mod.aux_coef == 0.01 and _run().llava_mod.capacity_factor == 1.5
    with pytest.raises(ValueError, match=r"loss.terms: \[\{name: ce\}\]"):
        _run(stage="preference", run={"loss": {"terms": [{"name": "forward_kl"}]}})
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        _run(stage="preference", run={"loss": {"terms": [{"name": "ce"}]}, "train": {"micro_batch_size": 3}})
    with pytest.raises(ValueError, match="top_k=5"):
        _run(moe={"experts": 4, "top_k": 5})
    with pytest.raises(ValueError, match="llava_mod"):
        RunConfig.model_validate({"method": "kd", "llava_mod": {}})


def test_sampled_pairs_make_each_row_a_pair_with_the_students_own_answer():
    from stillroom.methods.llava_mod_sampled import SampledPairs
    from stillroom.methods.redi import check_pairs

    class Tok:  # what the sampler reads of a tokenizer
        eos_token_id, pad_token_id = 1, 1

    section = SimpleNamespace(chosen="record", tries=3, max_new_tokens=4, sampling_temperature=1.0)
    student = tiny_llama(V, layers=1, seed=3)
    pairs = SampledPairs(student, None, Tok(), section, seed=0, pad_id=1)
    batch = collate(_examples(4), pad_id=1)
    out = pairs([batch], step=0)
    again = pairs([batch], step=0)
    [paired] = out
    assert check_pairs(paired) == 4 and paired.roles == ["chosen", "rejected"] * 4
    assert torch.equal(paired.input_ids, again[0].input_ids)  # seeded by (seed, step, micro-batch)
    for i, ex in enumerate(_examples(4)):  # chosen rows are the records as they were
        n = len(ex.input_ids)
        assert paired.input_ids[2 * i, :n].tolist() == ex.input_ids
        start = ex.target.index(True)
        assert paired.input_ids[2 * i + 1, :start].tolist() == ex.input_ids[:start]  # same prompt
    share = pairs.metrics()["llava_mod/wrong_share"]
    assert share == 1.0  # a random student never reproduces a random completion
    with pytest.raises(ValueError, match="teacher in process"):
        SampledPairs(student, None, Tok(), SimpleNamespace(chosen="teacher"), seed=0, pad_id=1)


def test_a_pair_record_without_its_rejected_answer_is_named_with_the_llava_mod_key(tmp_path):
    import json

    from helpers import tiny_tokenizer

    from stillroom.config.schema import DataConfig
    from stillroom.data import build_splits
    from stillroom.methods.llava_mod import LlavaModPairs

    rows = [{"prompt": f"q{i} is", "chosen": f" a{i}", "wrong": " no"} for i in range(8)]
    rows[2].pop("wrong")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = {"path": str(path), "completion_field": "chosen"}
    data = build_splits(DataConfig(sources=[src], seq_len=24, heldout_fraction=0.25, on_bad_record="skip"),
                        tiny_tokenizer(), 0, LlavaModPairs("wrong"))
    assert data.group_size == 2 and data.stats["records_bad"] == 1
    message = data.stats["bad_record_examples"][0]
    assert "pairs.jsonl:3" in message and "llava_mod.rejected_field" in message and "redi" not in message


def test_pair_logprobs_run_a_llava_with_images_and_its_upcycled_moe_agrees():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    vision = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text.to_dict(),
                                                      image_token_id=V - 1)).eval()
    ids = torch.tensor([[V - 1] * 4 + [5, 6, 7, 8, 9, 10]] * 2)  # 4 image tokens (2 x 2 patches), then text
    targets = torch.full_like(ids, -100)
    targets[:, 6:9] = ids[:, 7:10]
    batch = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids), target_ids=targets,
                            loss_mask=targets != -100, pixel_values=torch.rand(2, 3, 8, 8))
    with torch.no_grad():
        dense = batch_logps(llava, batch, V)
        moe = batch_logps(upcycle_to_moe(llava, MoeShape()).eval(), batch, V)
        other = batch_logps(llava, SimpleNamespace(**{**vars(batch), "pixel_values": torch.rand(2, 3, 8, 8)}), V)
    torch.testing.assert_close(moe, dense, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, other)  # the images reach the log-probs


def test_wrong_answer_pairs_keep_only_sampled_answers_that_differ_and_write_atomically(tmp_path):
    import json

    from helpers import tiny_tokenizer

    from stillroom.methods.llava_mod_pairs import normalise, wrong_answer_pairs, write_pairs

    tok = tiny_tokenizer()
    student = tiny_llama(len(tok), layers=1, seed=4)
    prompts = [f"Question {i}: what colour? Answer:" for i in range(6)]
    chosen = [" red"] * 6
    pairs = wrong_answer_pairs(student, tok, prompts, chosen, tries=2, max_new_tokens=3, seed=0)
    assert pairs == wrong_answer_pairs(student, tok, prompts, chosen, tries=2, max_new_tokens=3, seed=0)
    assert 1 <= len(pairs) <= 6
    assert all(normalise(p["rejected"]) != "red" and p["rejected"].startswith(" ") for p in pairs)
    path = write_pairs(pairs, tmp_path / "out" / "pairs.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == pairs
    assert sorted(x.name for x in path.parent.iterdir()) == ["pairs.jsonl"]  # no temporary file left
    with pytest.raises(ValueError, match="answered every prompt right"):
        write_pairs([], tmp_path / "empty.jsonl")


def _greedy_with_image(model, prompt, pixels_13hw, n, eos):
    """The plain path: ``n`` argmax steps, each a full forward over the sequence with the image (no KV cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels_13hw).logits
            ids.append(int(logits[0, -1].argmax()))
            if ids[-1] in eos:
                break
    return ids[len(prompt):]


def test_sampled_pairs_on_image_prompts_answer_with_the_image_and_pairs_carry_it(tmp_path):
    from vlm_helpers import tiny_vlm, write_tiny_vqa

    from stillroom.domains.vl.vlm_model import image_token_count
    from stillroom.methods.llava_mod_sampled import SampledPairs
    from stillroom.methods.redi import check_pairs

    records = write_tiny_vqa(tmp_path / "vqa", images=2, per_image=1)
    student, tok = tiny_vlm(records, seed=1)
    teacher, _ = tiny_vlm(records, seed=2)
    image = [int(student.config.image_token_index)] * image_token_count(student.config)
    examples = [Example([tok.bos_token_id] + image + [10 + i, 11, 12, 13 + i], [False] * (len(image) + 3) + [True] * 2,
                        uid=f"q{i}") for i in range(3)]
    batch = collate(examples, pad_id=tok.pad_token_id)
    batch.pixel_values = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    section = SimpleNamespace(chosen="teacher", tries=2, max_new_tokens=3, sampling_temperature=1.0)
    pairs = SampledPairs(student, teacher, tok, section, seed=0, pad_id=tok.pad_token_id)
    [paired] = pairs([batch], step=0)
    assert check_pairs(paired) == 3 and paired.roles == ["chosen", "rejected"] * 3
    torch.testing.assert_close(paired.pixel_values, batch.pixel_values.repeat_interleave(2, dim=0))
    assert torch.equal(pairs([batch], step=0)[0].input_ids, paired.input_ids)  # seeded by (seed, step, micro-batch)
    eos = set(pairs.eos)
    for i, ex in enumerate(examples):  # chosen = the teacher's greedy answer with this row's image (plain path)
        prompt = ex.input_ids[:-2]
        want = _greedy_with_image(teacher.eval(), prompt, batch.pixel_values[i:i + 1], 3, eos)
        n = int(paired.attention_mask[2 * i].sum())
        assert paired.input_ids[2 * i, :n].tolist() == prompt + want
        assert paired.input_ids[2 * i + 1, :len(prompt)].tolist() == prompt
    with torch.no_grad():  # the DPO log-probs run on the pair batch, images included
        logps = batch_logps(student, paired, student.config.text_config.vocab_size)
    assert logps.shape == (6,) and torch.isfinite(logps).all()
