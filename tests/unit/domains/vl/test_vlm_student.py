"""How a VLM student starts (vlm.student): strict settings with named errors; the teacher's tower (and projector
when its shapes match) copied in, frozen, and a CE warm-up stage of the one loop on the chosen families alone;
all before step 0, so the CE baseline (a copy of the initial student) starts from the same weights."""

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file
from vlm_helpers import TINY_ARCH

from stillroom.config.load import load_config
from stillroom.config.vlm import VlmStudentConfig
from stillroom.domains.vl import vlm_teacher
from stillroom.domains.vl.vlm_student import copy_vision
from stillroom.run.training import prepare_run, run


def _recipe(tmp_path, student=None, vlm_student=None, **top):
    recipe = {"name": "t", "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
              "method": "kd", "teacher": {"dtype": "float32"},
              "vlm": {"teacher": {"arch": TINY_ARCH.model_dump(), "steps": 3, "batch_size": 4, "warmup_steps": 0},
                      "data": {"images": 10, "per_image": 3, "scenes": {"image_size": 16}}, "report_images": 0,
                      "student": vlm_student or {}},
              "student": student or {"from_config": {"text_config": {"num_hidden_layers": 1}}},
              "data": {"seq_len": 48, "heldout_fraction": 0.2, "heldout_max": 4},
              "loss": {"terms": [{"name": "forward_kl"}]},
              "train": {"steps": 2, "micro_batch_size": 4, "warmup_steps": 0, "precision": "fp32", "lr": 1e-2},
              "eval": {"heldout_sequences": 4, "batch_size": 4, "max_new_tokens": 2, "speed_tokens": 16,
                       "before": False},
              **top}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_config(path)


def test_settings_are_strict_with_named_errors(tmp_path):
    sc = VlmStudentConfig()
    assert (sc.vision_from_teacher, sc.freeze_vision, sc.vision_warmup) == (False, False, None)
    with pytest.raises(ValueError, match="vision_from_techer.*vision_from_teacher"):  # the nearest valid name
        _recipe(tmp_path, vlm_student={"vision_from_techer": True})
    with pytest.raises(ValidationError, match=r"vision_warmup.families: unknown families \['color'\]"):
        VlmStudentConfig(vision_warmup={"families": ["color"]})
    with pytest.raises(ValueError, match="vision_from_teacher=true with student.model"):
        _recipe(tmp_path, student={"model": {"path": str(tmp_path)}}, vlm_student={"vision_from_teacher": True})
    changed = {"from_config": {"vision_config": {"num_hidden_layers": 2}}}
    with pytest.raises(ValueError, match="vision_from_teacher=true with student.from_config.vision_config"):
        _recipe(tmp_path, student=changed, vlm_student={"vision_from_teacher": True})


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tower_and_projector_copied_frozen_and_warmed_up_on_their_families(tmp_path, monkeypatch):
    calls = []
    real = vlm_teacher.run_stage

    def spy(cfg, model, tokenizer, examples, seed, run_dir, steps, lr, device, log, **kw):
        if kw.get("player") == "student":
            calls.append((steps, lr, kw["batch_size"], sorted({e.meta["family"] for e in examples}),
                          [n for n, p in model.named_parameters() if p.requires_grad and "vision_tower" in n]))
            before = {k: v.clone() for k, v in model.state_dict().items()}
            result = real(cfg, model, tokenizer, examples, seed, run_dir, steps, lr, device, log, **kw)
            changed = {k.split(".")[1] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
            calls.append(changed)
            return result
        return real(cfg, model, tokenizer, examples, seed, run_dir, steps, lr, device, log, **kw)

    monkeypatch.setattr(vlm_teacher, "run_stage", spy)
    cfg = _recipe(tmp_path, vlm_student={"vision_from_teacher": True, "freeze_vision": True,
                                         "vision_warmup": {"steps": 2, "families": ["colour_of"], "lr": 5e-3}})
    prep, _ = prepare_run(cfg, log=lambda _: None)
    (steps, lr, batch, families, trainable_tower), changed = calls
    assert (steps, lr, batch, families, trainable_tower) == (2, 5e-3, 4, ["colour_of"], [])
    assert "vision_tower" not in changed and {"multi_modal_projector", "language_model"} <= changed
    student, teacher = prep.student.model, prep.teacher_model.model
    assert _equal(student.vision_tower, teacher.vision_tower)
    assert not _equal(student.multi_modal_projector, teacher.multi_modal_projector)  # copied, then warmed up
    assert not any(p.requires_grad for p in student.vision_tower.parameters())

    plain, _ = prepare_run(_recipe(tmp_path), log=lambda _: None)  # the default: a random tower, trainable
    assert not _equal(plain.student.model.vision_tower, teacher.vision_tower)
    assert all(p.requires_grad for p in plain.student.model.vision_tower.parameters())


def test_projector_of_another_width_stays_the_students_own(tmp_path):
    cfg = _recipe(tmp_path)
    prep, _ = prepare_run(cfg, log=lambda _: None)
    from stillroom.domains.vl.vlm_model import vlm_student

    narrow = vlm_student(prep.teacher_model, {"text_config": {"hidden_size": 16, "num_hidden_layers": 1}}, seed=0)
    own = {k: v.clone() for k, v in narrow.model.multi_modal_projector.state_dict().items()}
    assert copy_vision(narrow, prep.teacher_model) == ["vision tower"]
    assert _equal(narrow.model.vision_tower, prep.teacher_model.model.vision_tower)
    assert all(torch.equal(v, own[k]) for k, v in narrow.model.multi_modal_projector.state_dict().items())


def test_the_baseline_starts_from_the_same_warmed_up_student_with_the_frozen_teacher_tower(tmp_path):
    cfg = _recipe(tmp_path, baseline=True, vlm_student={
        "vision_from_teacher": True, "freeze_vision": True, "vision_warmup": {"steps": 2}})
    folder = run(cfg, log=lambda _: None)
    teacher_dir = next((tmp_path / "cache" / "vlms").iterdir())
    towers = [{k: v for k, v in load_file(f / "model.safetensors").items() if "vision_tower" in k}
              for f in (teacher_dir, folder / "student", folder / "baseline" / "student")]
    assert towers[0] and all(t.keys() == towers[0].keys() for t in towers[1:])
    assert all(torch.equal(t[k], towers[0][k]) for t in towers[1:] for k in t)  # frozen through both runs


def test_the_distillation_recipes_start_students_that_read_colour():
    """vlm_scenes and llava_mod_vlm start the student (and so the baseline) from the teacher's frozen tower with a
    500-step colour_of warm-up, and train at lr 1e-3 (3e-3 lost shape_at after the warm-up); llava_mod_vlm_dpo
    keeps its loaded student's tower frozen; comd_vlm does not warm up (its 120-step students got worse)."""
    import stillroom

    folder = Path(stillroom.__file__).parent / "recipes"
    for name in ("vlm_scenes", "llava_mod_vlm"):
        cfg = load_config(folder / f"{name}.yaml")
        sc = cfg.vlm.student
        assert sc.vision_from_teacher and sc.freeze_vision and cfg.train.lr == 1e-3, name
        assert (sc.vision_warmup.steps, sc.vision_warmup.families, sc.vision_warmup.lr) == (500, ["colour_of"], 1e-3)
    dpo = load_config(folder / "llava_mod_vlm_dpo.yaml").vlm.student
    assert dpo.freeze_vision and not dpo.vision_from_teacher and dpo.vision_warmup is None
    assert load_config(folder / "comd_vlm.yaml").vlm.student == VlmStudentConfig()


def test_the_saved_student_reads_images_as_its_teacher_did(tmp_path):
    """The student folder's preprocessor_config.json carries the mean/std the run's images were normalised with
    (the teacher folder's), not CLIP's defaults: loaded later as a teacher or a target, it reads them the same."""
    import json
    import shutil

    run(_recipe(tmp_path, name="first"), log=lambda _: None)  # trains and caches a teacher folder
    teacher = tmp_path / "teacher"
    shutil.copytree(next((tmp_path / "cache" / "vlms").iterdir()), teacher)
    settings = json.loads((teacher / "preprocessor_config.json").read_text())
    settings.update(image_mean=[0.25, 0.5, 0.75], image_std=[0.2, 0.3, 0.4])
    (teacher / "preprocessor_config.json").write_text(json.dumps(settings))
    cfg = _recipe(tmp_path, name="second")
    cfg.vlm.teacher.path = str(teacher)
    saved = json.loads((run(cfg, log=lambda _: None) / "student" / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == [0.25, 0.5, 0.75] and saved["image_std"] == [0.2, 0.3, 0.4]
