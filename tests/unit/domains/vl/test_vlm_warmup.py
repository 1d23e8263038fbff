"""The VLM teacher's vision warm-up (vlm.teacher.vision_warmup): strict settings with named errors, a stage of the
one loop on the chosen families' records alone between the projector stage and the mixed steps, recorded in
teacher.json, part of the cache key, and refused when no record has a chosen family."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from vlm_helpers import TINY_ARCH

from stillroom.config.load import load_config
from stillroom.config.vlm import VisionWarmupConfig, VlmTeacherConfig
from stillroom.data.batch import Example
from stillroom.domains.vl import vlm_teacher
from stillroom.domains.vl.vlm_teacher import load_vlm_teacher, teacher_key, vlm_data_config, warmup_examples
from stillroom.train.distributed import Topology


def _recipe(tmp_path, **teacher):
    recipe = {"name": "t", "cache_dir": str(tmp_path / "cache"), "method": "kd", "teacher": {"dtype": "float32"},
              "vlm": {"teacher": {"arch": TINY_ARCH.model_dump(), "steps": 3, "batch_size": 4, "warmup_steps": 0,
                                  **teacher},
                      "data": {"images": 10, "per_image": 3, "scenes": {"image_size": 16}}},
              "student": {"from_config": {"text_config": {"num_hidden_layers": 1}}},
              "data": {"seq_len": 48, "heldout_fraction": 0.2}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_config(path)


def test_settings_are_strict_with_named_errors():
    assert VlmTeacherConfig().vision_warmup is None
    warm = VlmTeacherConfig(vision_warmup={"steps": 5}).vision_warmup
    assert warm.families == ["colour_of"] and warm.lr == 1e-3 and VisionWarmupConfig().steps == 1500
    with pytest.raises(ValidationError, match=r"vision_warmup.families: unknown families \['colour'\]"):
        VisionWarmupConfig(families=["colour"])
    for bad in ({"steps": 0}, {"families": []}, {"lr": 0.0}, {"step": 5}):
        with pytest.raises(ValidationError):
            VisionWarmupConfig(**bad)


def test_the_warm_up_stage_runs_on_its_families_alone_before_the_mix(tmp_path, monkeypatch):
    calls = []
    real = vlm_teacher.run_stage

    def spy(cfg, model, tokenizer, examples, seed, run_dir, steps, lr, device, log):
        calls.append((run_dir.name, steps, lr, sorted({e.meta["family"] for e in examples}), len(examples)))
        return real(cfg, model, tokenizer, examples, seed, run_dir, steps, lr, device, log)

    monkeypatch.setattr(vlm_teacher, "run_stage", spy)
    warm = {"steps": 2, "families": ["colour_of", "count"], "lr": 1e-3}
    cfg = _recipe(tmp_path, vision_warmup=warm)
    _, folder = load_vlm_teacher(cfg, vlm_data_config(cfg), Topology(), torch.device("cpu"), lambda _: None)
    (stage, steps, lr, families, n), mixed = calls
    assert (stage, steps, lr, families) == ("warmup_stage", 2, 1e-3, ["colour_of", "count"])
    assert mixed[1:3] == (3, cfg.vlm.teacher.lr) and len(mixed[3]) > 2 and mixed[4] > n
    record = json.loads((folder / "teacher.json").read_text())
    assert record["stages"]["vision_warmup"] == {"steps": 2, "sequences": n, "families": ["colour_of", "count"]}
    assert record["stages"]["mixed"]["sequences"] == mixed[4]
    assert not (folder / "warmup_stage").exists()
    plain = _recipe(tmp_path)
    assert teacher_key(cfg, vlm_data_config(cfg), 0) != teacher_key(plain, vlm_data_config(plain), 0)


def test_a_warm_up_matching_no_record_is_refused():
    ex = Example(input_ids=[1, 2], target=[False, True], uid="u", meta={"family": "count"})
    assert warmup_examples(None, [ex]) == []
    with pytest.raises(ValueError, match=r"vision_warmup.families=\['colour_of'\]: no training record .*\['count'\]"):
        warmup_examples(VisionWarmupConfig(), [ex])


def test_the_scratch_vlm_recipes_share_one_warmed_up_teacher():
    """Every shipped recipe that trains its VLM teacher from scratch warms it up on colour_of, with the same
    `vlm` settings, so they share one cached teacher."""
    import stillroom

    folder = Path(stillroom.__file__).parent / "recipes"
    names = ["llava_mod_vlm", "llava_mod_vlm_dpo", "comd_vlm", "specvlm_scenes", "specvlm_eagle_scenes"]
    teachers = [load_config(folder / f"{name}.yaml").vlm for name in names]
    assert all(t.teacher.vision == "scratch" and t.teacher.vision_warmup is not None for t in teachers)
    assert teachers[0].teacher.vision_warmup.families == ["colour_of"]
    assert all(t.teacher == teachers[0].teacher and t.data == teachers[0].data for t in teachers)
    clip_teachers = [load_config(folder / f"{name}.yaml").vlm.teacher for name in ("vlm_scenes", "vlm_teacher_scenes")]
    assert all(t.vision == "clip" and t.vision_warmup is not None for t in clip_teachers)
    assert clip_teachers[0] == clip_teachers[1]
