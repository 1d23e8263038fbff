"""Visual questions: every family and level gives the exact answer for its scene, levels fall back only when a
scene cannot pose them, answers are checked up to case and spacing, and the folder written is complete."""

import json

import numpy as np
import pytest
from PIL import Image

from stillroom.config.scenes import ScenesConfig
from stillroom.domains.vl.scenes import SceneObject, generate_scenes
from stillroom.domains.vl.vqa import FAMILIES, QA, check_answer, questions, text_record, write_vqa_folder

SCENE = [SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "top right"),
         SceneObject("circle", "green", "bottom right")]


def _asked(family, level, objects=SCENE, seeds=40):
    """{question: answer} over many draws of one family at one level."""
    out = {}
    for seed in range(seeds):
        for qa in questions(objects, ScenesConfig(), np.random.default_rng(seed), [family], level):
            assert qa.family == family
            out[qa.question] = (qa.answer, qa.level)
    return out


def test_answers_are_exact_for_a_known_scene():
    assert _asked("colour_of", 1) == {"what colour is the square?": ("blue", 1)}  # circle is not unique
    lvl3 = _asked("colour_of", 3)
    assert lvl3["what colour is the shape left of the blue square?"] == ("red", 3)
    assert lvl3["what colour is the shape above the green circle?"] == ("blue", 3)
    at = _asked("shape_at", 2)
    assert at["what shape is at the bottom left?"] == ("nothing", 2) and at["what shape is at the top left?"][0] == "circle"
    assert _asked("shape_at", 3)["what shape is below the red circle?"] == ("nothing", 3)
    assert _asked("count", 1) == {"how many shapes are there?": ("three", 1)}
    count2 = _asked("count", 2)
    assert count2.get("how many circles are there?", ("two",))[0] == "two"
    assert count2.get("how many red shapes are there?", ("one",))[0] == "one"
    assert _asked("count", 3)["how many shapes are not red?"] == ("two", 3)
    exists = _asked("exists", 3)
    assert exists["is there a red circle at the top left?"] == ("yes", 3)
    assert exists.get("is there a red circle at the bottom left?", ("no",))[0] == "no"
    assert set(_asked("exists", 1)) >= {"is there a circle?"} and _asked("exists", 1)["is there a circle?"][0] == "yes"
    for level in (1, 2, 3):
        assert {a for a, _ in _asked("unanswerable", level).values()} == {"unknown"}


def test_unanswerable_questions_name_absent_objects():
    for question in _asked("unanswerable", 1):
        assert question.split("the ")[1].rstrip("?") not in {"circle", "square"}
    for question in _asked("unanswerable", 2):
        assert not any(c in question for c in ("red", "blue", "green"))


def test_levels_fall_back_when_the_scene_cannot_pose_them():
    lone = [SceneObject("ring", "red", "top left")]
    cfg = ScenesConfig()
    [qa] = questions(lone, cfg, np.random.default_rng(0), ["colour_of"], level=3)
    assert (qa.level, qa.answer) == (2, "red")  # no pair in a relation: level 2
    with pytest.raises(ValueError, match="families"):
        questions(SCENE, cfg, np.random.default_rng(0), ["colour"])
    with pytest.raises(ValueError, match="level"):
        questions(SCENE, cfg, np.random.default_rng(0), level=4)


def test_every_family_at_every_level_on_random_scenes_is_consistent():
    cfg = ScenesConfig(max_objects=4)
    scenes = generate_scenes(cfg, "train", 60, seed=2)
    rng = np.random.default_rng(0)
    seen = set()
    for objs in scenes.objects:
        for qa in questions(objs, cfg, rng):
            seen.add((qa.family, qa.level))
            assert qa.answer and qa.question.endswith("?")
            if qa.family == "exists":
                assert qa.answer in ("yes", "no")
    assert seen == {(f, lvl) for f in FAMILIES for lvl in (1, 2, 3)}


def test_check_answer_normalises_case_space_stop_and_digits():
    qa = QA("what colour is the star?", "red", "colour_of", 1)
    assert check_answer(qa, "  Red. ") and check_answer(qa, "red") and not check_answer(qa, "reddish")
    count = QA("how many shapes are there?", "two", "count", 1)
    assert check_answer(count, "2") and check_answer(count, "Two") and not check_answer(count, "3")
    assert not check_answer(QA("q?", "two", "shape_at", 1), "2")


def test_text_record_has_the_scene_as_text():
    qa = QA("what colour is the star?", "red", "colour_of", 1)
    rec = text_record("a red star at the top left", qa)
    assert rec["prompt"] == "Scene: a red star at the top left\nQuestion: what colour is the star?\nAnswer:"
    assert rec["completion"] == " red" and rec["family"] == "colour_of" and rec["level"] == 1


def test_write_vqa_folder_writes_pngs_and_records_atomically(tmp_path):
    cfg = ScenesConfig(image_size=16)
    folder = write_vqa_folder(cfg, tmp_path / "vqa", n_images=4, split="heldout", seed=0, per_image=3)
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert len(records) == 12 and len({r["id"] for r in records}) == 12
    scenes = generate_scenes(cfg, "heldout", 4, seed=0)
    for r in records:
        assert set(r) == {"id", "image", "prompt", "completion", "family", "level", "caption"}
        png = np.asarray(Image.open(folder / r["image"]))
        index = int(r["image"].split("-")[1].split(".")[0])
        assert png.shape == (16, 16, 3) and png.dtype == np.uint8
        assert np.abs(png.transpose(2, 0, 1) / 255.0 - scenes.images[index]).max() <= 0.5 / 255 + 1e-6
        assert r["caption"] == scenes.captions[index] and r["family"] in FAMILIES
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="vqa"):
        write_vqa_folder(cfg, tmp_path / "vqa", 1, "train", 0, 1)
    captions = write_vqa_folder(cfg, tmp_path / "pairs", 3, "train", 0, per_image=0)
    rows = [json.loads(line) for line in (captions / "records.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [{"id", "image", "caption"}] * 3


def test_vqa_data_command_writes_text_and_image_sets(tmp_path, capsys):
    from stillroom.cli.main import main

    text = tmp_path / "qa.jsonl"
    assert main(["vqa-data", str(text), "--format", "text", "--images", "3", "--per-image", "2", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in text.read_text().splitlines()]
    assert len(rows) == 6 and all(r["prompt"].startswith("Scene: ") and r["prompt"].endswith("\nAnswer:")
                                  for r in rows)
    assert f"wrote 3 scenes (6 questions) to {text}" in capsys.readouterr().out
    folder = tmp_path / "vqa"
    assert main(["vqa-data", str(folder), "--images", "2", "--per-image", "2", "--seed", "1", "--image-size", "16"]) == 0
    image_rows = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in image_rows] == [r["prompt"].split("Question: ")[1][:-len("\nAnswer:")]
                                                 for r in rows[:4]]  # the same questions in both formats
    assert main(["vqa-data", str(tmp_path / "bad.jsonl"), "--format", "text", "--per-image", "0"]) == 2
    assert "per_image" in capsys.readouterr().err


def test_instance_asks_exactly_the_level_and_refuses_what_scenes_cannot_pose():
    from stillroom.domains.vl.vqa import instance

    cfg, rng = ScenesConfig(), np.random.default_rng(0)
    for family in FAMILIES:
        for level in (1, 2, 3):
            text, qa = instance(cfg, rng, family, level)
            assert (qa.family, qa.level) == (family, level) and text.startswith("a")
    with pytest.raises(ValueError, match="max_objects"):
        instance(ScenesConfig(max_objects=1), rng, "colour_of", 3)


def test_vqa_lm_folder_loads_without_stillroom_and_keeps_scene_words_short(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.config.scenes import VqaLmConfig
    from stillroom.domains.vl.vqa_lm import write_vqa_lm

    cfg = VqaLmConfig(out=str(tmp_path / "lm"), hidden=16, layers=1, heads=2, kv_heads=1, mlp_ratio=2)
    folder = write_vqa_lm(cfg)
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == len(tok) <= cfg.vocab_size
    words = " what colour is the shape left of the magenta triangle at the bottom right"
    assert len(tok(words, add_special_tokens=False)["input_ids"]) <= 16  # scene words are whole tokens
    assert tok("a")["input_ids"][0] == tok.bos_token_id and tok.eos_token_id == model.config.eos_token_id
    with pytest.raises(FileExistsError, match="lm"):
        write_vqa_lm(cfg)
