"""CoMD: its config checks, the pool encoded as the data pipeline encodes records, the judge, rounds that assess
and augment the failing families one level harder, the one-shot arm's equal budget, and exact resume."""

import numpy as np
import pytest
import torch

from stillroom.config.comd import ComdConfig
from stillroom.config.load import ConfigError, load_config
from stillroom.config.scenes import VqaLmConfig
from stillroom.data.formats import TextEncoder, encode_record
from stillroom.config.core import DataSource
from stillroom.domains.vl.vqa import QA
from stillroom.domains.vl.vqa_lm import build_vqa_lm
from stillroom.methods.comd import ComdRounds, heldout_questions
from stillroom.methods.comd_pool import Answerer, Instruction, accuracy_table, judge_failures

SMALL = dict(rounds=2, initial_per_family=2, augment_per_round=6, probe_per_family=3, eval_per_level=1,
             generation_batch_size=16, max_answer_tokens=3)


@pytest.fixture(scope="module")
def models():
    tiny = dict(out="unused", hidden=16, layers=1, heads=2, kv_heads=1, mlp_ratio=2)
    teacher, tok = build_vqa_lm(VqaLmConfig(**tiny, seed=0))
    student, _ = build_vqa_lm(VqaLmConfig(**tiny, seed=1))
    return teacher.eval(), student, tok


def _rounds(models, steps=4, student=None, **changes):
    teacher, own_student, tok = models
    cfg = ComdConfig(**{**SMALL, **changes})
    return ComdRounds(cfg, seed=0, steps=steps, student=student or own_student, teacher=teacher,
                      answerer=Answerer(cfg, tok, add_eos=True, seq_len=128), pad_id=tok.pad_token_id, rank=0,
                      world_size=1, log=lambda line: None)


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="comd.rounds"):
        load_config(None, ["method=comd", "train.steps=7", "comd.rounds=2"])
    with pytest.raises(ConfigError, match="comd.families"):
        load_config(None, ["method=comd", "train.steps=8", "comd.families=[colours]"])
    with pytest.raises(ConfigError, match="initial_per_family"):
        load_config(None, ["method=comd", "train.steps=8", "train.micro_batch_size=64", "comd.initial_per_family=2"])
    with pytest.raises(ConfigError, match="domain: lm"):
        load_config(None, ["method=comd", "train.steps=8", "domain=classifier"])
    cfg = load_config(None, ["method=comd", "train.steps=8"]).comd
    assert cfg.budget == cfg.initial_per_family * 5 + 3 * cfg.augment_per_round


def test_pool_items_are_encoded_as_the_data_pipeline_encodes_the_record(models):
    rounds = _rounds(models)
    rounds.ensure_round(0)
    _, _, tok = models
    enc = TextEncoder(tok, add_eos=True)
    assert len(rounds.pool) == 2 * 5 and rounds.teacher_answers == 10
    for item in rounds.pool:
        plain = encode_record({"prompt": item.prompt, "completion": item.answer}, "prompt_completion",
                              DataSource(path="x.jsonl"), enc)
        assert item.input_ids[:item.n_prompt] == plain.input_ids[:item.n_prompt]
        assert plain.target[:item.n_prompt] == [False] * item.n_prompt and all(plain.target[item.n_prompt:])
        assert tok.decode(item.input_ids[item.n_prompt:], skip_special_tokens=True) == item.answer
        assert item.prompt not in rounds.exclude  # never a held-out question
    batch = rounds.replace_batches([_fake_batch(4)], 0)[0]
    assert batch.input_ids.shape[0] == 4 and int((batch.target_ids != -100).sum()) == batch.num_targets > 0


def _fake_batch(n):
    from stillroom.data.batch import Example, collate
    return collate([Example([1, 2], [False, True], f"u{i}") for i in range(n)], 0)


def test_judge_and_accuracy_table():
    ins = [Instruction("p", QA("q?", "red", "colour_of", 3)), Instruction("p", QA("q?", "two", "count", 1))]
    assert judge_failures(ins, [" red", "two"], ["Red.", "2"]) == [False, False]
    assert judge_failures(ins, [" blue", "two"], ["red", "three"]) == [True, True]  # the judge's reference: teacher
    table = accuracy_table(ins, ["red", "three"])
    assert table["families"] == {"colour_of": {"3": 1.0}, "count": {"1": 0.0}} and table["hard"] == 1.0
    assert table["overall"] == 0.5


def test_second_round_augments_the_failed_families_one_level_harder(models):
    teacher, student, _ = models
    rounds = _rounds(models)
    answer = rounds.answerer.answer

    def counts_wrong(model, prompts, images=None):  # the student fails the count questions only (the judge sees it)
        out = answer(teacher, prompts)
        if model is student:
            out = [(p, c, "nonsense" if "Question: how many" in q else t) for q, (p, c, t) in zip(prompts, out)]
        return out

    rounds.answerer.answer = counts_wrong
    rounds.ensure_round(0)
    assert len(rounds.rounds) == 1 and rounds.rounds[0]["failure_rate"] is None
    rounds.ensure_round(1)
    assert len(rounds.rounds) == 1  # steps 0..1 are round 1
    failed_seen = []
    original = rounds._augment
    rounds._augment = lambda rng, failed: failed_seen.append(list(failed)) or original(rng, failed)
    rounds.ensure_round(2)
    entry = rounds.rounds[1]
    assert entry["pool"] == 10 + 6 and rounds.teacher_answers == 16 and rounds.judge_answers == 15
    assert entry["failure_rate"] == {"colour_of": 0.0, "shape_at": 0.0, "count": 1.0, "exists": 0.0,
                                     "unanswerable": 0.0}
    failed = failed_seen[0]
    assert len(failed) == 3 and {f for f, _ in failed} == {"count"}
    for item in rounds.pool[10:]:
        assert item.family == "count" and any(min(lvl + 1, 3) == item.level for _, lvl in failed)
    assert sum(entry["added"].values()) == 6


def test_a_student_that_answers_as_the_teacher_fails_nothing(models):
    teacher, _, _ = models
    rounds = _rounds(models, student=teacher)
    rounds.ensure_round(2)
    assert set(rounds.rounds[1]["failure_rate"].values()) == {0.0}
    assert len(rounds.pool) == 16  # nothing failed: the budget is spent uniformly


def test_one_shot_draws_the_same_budget_uniformly_at_step_zero(models):
    rounds = _rounds(models, one_shot=True, rounds=3)
    rounds.ensure_round(0)
    rounds.ensure_round(3)
    assert len(rounds.rounds) == 1 and len(rounds.pool) == ComdConfig(**{**SMALL, "rounds": 3}).budget == 22
    counts = [sum(p.family == f for p in rounds.pool) for f in ComdConfig().families]
    assert max(counts) - min(counts) <= 1 and rounds.judge_answers == 0


def test_resume_from_the_state_gives_the_same_pool_and_batches(models):
    a = _rounds(models)
    for step in range(3):
        a.replace_batches([_fake_batch(4)], step)
    state = a.state_dict()
    b = _rounds(models)
    b.load_state_dict(state)
    for step in (3,):
        x, y = a.replace_batches([_fake_batch(4)], step)[0], b.replace_batches([_fake_batch(4)], step)[0]
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.target_ids, y.target_ids)
    assert b.state_dict() == a.state_dict()
    fresh = _rounds(models)  # a round redone after a resume at its boundary is the same round
    fresh.load_state_dict({**state, "pool": state["pool"][:10], "rounds": state["rounds"][:1],
                           "teacher_answers": 10, "judge_answers": 0})
    fresh.ensure_round(2)
    assert fresh.state_dict() == a.state_dict()


def test_heldout_questions_do_not_depend_on_the_run_seed():
    cfg = ComdConfig(**SMALL)
    a, b = heldout_questions(cfg, 0), heldout_questions(cfg, 5)
    assert [i.prompt for i in a] == [i.prompt for i in b] and len(a) == 5 * 3
    assert {(i.qa.family, i.qa.level) for i in a} == {(f, lvl) for f in cfg.families for lvl in (1, 2, 3)}
    assert np.all([i.prompt.startswith("Scene: ") for i in a])


def test_prompts_longer_than_the_sequence_are_refused_before_training(models):
    teacher, student, tok = models
    cfg = ComdConfig(**SMALL)
    with pytest.raises(ValueError, match="data.seq_len=24"):
        ComdRounds(cfg, seed=0, steps=4, student=student, teacher=teacher,
                   answerer=Answerer(cfg, tok, add_eos=True, seq_len=24), pad_id=tok.pad_token_id, rank=0,
                   world_size=1, log=lambda line: None)


def test_the_sampler_checkpoints_the_pool_with_the_data_position(models):
    from stillroom.data.batch import ExampleSampler
    from stillroom.methods.comd import ComdSampler

    a = _rounds(models)
    a.ensure_round(0)
    sampler = ComdSampler(ExampleSampler(n=20, batch_size=4, seed=0), a)
    sampler.next_indices()
    state = sampler.state_dict()
    b = ComdSampler(ExampleSampler(n=20, batch_size=4, seed=0), _rounds(models))
    b.load_state_dict(state)
    assert b.rounds.state_dict() == a.state_dict() and b.next_indices() == sampler.next_indices()


def _greedy_with_image(model, prompt, pixels_13hw, n, eos):
    """The plain path: ``n`` argmax steps, each a full forward over the sequence with the image (no KV cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids]), pixel_values=pixels_13hw).logits[0, -1].argmax()))
            if ids[-1] in eos:
                break
    return ids[len(prompt):]


def test_vlm_pool_items_carry_rendered_scenes_encoded_as_vqa_records_and_resume(tmp_path):
    from vlm_helpers import tiny_vlm, write_tiny_vqa

    from stillroom.data.images import load_pixels
    from stillroom.domains.vl.vlm_teacher import vlm_encoder
    from stillroom.methods.comd_pool import PoolImages, PoolItem

    teacher, tok = tiny_vlm(write_tiny_vqa(tmp_path / "vqa", images=2, per_image=1), seed=0)
    student, _ = tiny_vlm(tmp_path / "vqa" / "records.jsonl", seed=1)
    encoder = vlm_encoder(teacher, None, "image")
    images = PoolImages(tmp_path / "run" / "comd_images", tuple(encoder.image_ids), encoder.ref_of)
    cfg = ComdConfig(**{**SMALL, "initial_per_family": 1, "eval_per_level": 1, "max_answer_tokens": 2})

    def rounds():
        return ComdRounds(cfg, seed=0, steps=4, student=student, teacher=teacher.eval(), pad_id=tok.pad_token_id,
                          answerer=Answerer(cfg, tok, add_eos=True, seq_len=64, images=images), rank=0,
                          world_size=1, log=lambda line: None)

    first = rounds()
    assert all(i.image is not None and i.key.startswith("Scene: ") for i in first.heldout)
    first.ensure_round(0)
    assert len(first.pool) == 5 and len({item.image for item in first.pool}) == 5
    text = TextEncoder(tok, add_eos=True)
    eos = set(tok.all_special_ids) & {tok.eos_token_id}
    for item in first.pool:  # the pool item is the VQA record the data pipeline would encode
        record = {"image": item.image, "prompt": item.prompt, "completion": item.answer}
        src = DataSource(path=str(tmp_path / "r.jsonl"))
        seq = encoder.encode(record, "prompt_completion", src, text, "k").eval
        prompt = item.input_ids[:item.n_prompt]
        assert prompt == seq.input_ids[:item.n_prompt] and seq.target[:item.n_prompt] == [False] * item.n_prompt
        assert seq.image == item.example("u", encoder.ref_of).image
        pixels = load_pixels(encoder.ref_of(item.image))[None]  # the teacher answered with the scene's image
        assert item.input_ids[item.n_prompt:] == _greedy_with_image(teacher, prompt, pixels, 2, eos)
    batch = first.replace_batches([_fake_batch(3)], 1)[0]
    assert batch.pixel_values.shape == (3, 3, 16, 16)
    state = first.state_dict()
    assert all(p["image"].startswith(str(images.folder)) for p in state["pool"])
    resumed = rounds()
    resumed.load_state_dict(state)
    again = resumed.replace_batches([_fake_batch(3)], 1)[0]
    assert torch.equal(again.input_ids, batch.input_ids) and torch.equal(again.pixel_values, batch.pixel_values)
    assert "image" not in PoolItem("p", "a", "count", 1, [1, 2], 1).state()  # text pools: the state as before
