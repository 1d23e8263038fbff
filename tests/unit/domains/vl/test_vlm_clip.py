"""The VLM teacher's vision tower started from a CLIP (vlm.teacher.vision: clip): the copied tower computes the CLIP's
image features, the cache key follows the CLIP, a frozen tower stays fixed through training, the projector-only stage
trains the projector alone, and a CLIP of another image size is refused before training."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from clip_helpers import tiny_clip_config, tiny_clip_model_folder, tiny_text_folder
from safetensors.torch import load_file
from vlm_helpers import TINY_ARCH, write_tiny_vqa

from stillroom.config.load import load_config
from stillroom.data import build_splits
from stillroom.domains.vl.clip_model import load_image_text, save_image_text
from stillroom.domains.vl.clip_teacher import build_clip
from stillroom.domains.vl.vlm_data import record_texts
from stillroom.domains.vl.vlm_model import image_ref, vlm_from_clip, write_preprocessor
from stillroom.domains.vl.vlm_teacher import (_set_trainable, load_vlm_teacher, run_stage, teacher_key,
                                              vlm_data_config, vlm_encoder)
from stillroom.domains.vl.vlm_tokenizer import train_tokenizer
from stillroom.train.distributed import Topology


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny VisionTextDualEncoderModel CLIP (16-pixel images, 4-pixel patches, mean/std 0.5) saved as a folder."""
    root = tmp_path_factory.mktemp("clip")
    model, _ = build_clip(tiny_clip_config(tiny_text_folder(root / "text")), seed=0)
    save_image_text(model.eval(), root / "clip")
    return root / "clip"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(record_texts(write_tiny_vqa(tmp_path_factory.mktemp("vqa") / "s")), TINY_ARCH.vocab_size)


def _recipe(tmp_path, image_size=16, **teacher):
    recipe = {"name": "t", "cache_dir": str(tmp_path / "cache"), "method": "kd", "teacher": {"dtype": "float32"},
              "vlm": {"teacher": {"arch": TINY_ARCH.model_dump(), "steps": 3, "batch_size": 4, "warmup_steps": 0,
                                  **teacher},
                      "data": {"images": 8, "per_image": 2, "scenes": {"image_size": image_size}}},
              "student": {"from_config": {"text_config": {"num_hidden_layers": 1}}},
              "data": {"seq_len": 48, "heldout_fraction": 0.25}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_config(path)


@pytest.mark.parametrize("kind", ["dual_encoder", "clip_model"])
def test_copied_tower_gives_the_clips_image_features(clip_folder, tokenizer, tmp_path, kind):
    folder = clip_folder if kind == "dual_encoder" else tiny_clip_model_folder(tmp_path / "clip")
    clip = load_image_text(folder)
    vlm = vlm_from_clip(TINY_ARCH, tokenizer, clip, seed=0).eval()
    write_preprocessor(tmp_path, 16, clip.mean_c.flatten().tolist(), clip.std_c.flatten().tolist())
    ref = image_ref(vlm, "x.png", tmp_path)
    assert ref.size == clip.image_size and torch.allclose(torch.tensor(ref.mean), clip.mean_c.flatten())
    images = torch.rand(3, 3, 16, 16)
    pixels = (images - torch.tensor(ref.mean).view(1, 3, 1, 1)) / torch.tensor(ref.std).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = vlm.model.vision_tower(pixel_values=pixels).pooler_output
        got = F.normalize(clip.model.visual_projection(pooled), dim=-1)
        assert torch.allclose(got, clip.image_features(images), atol=1e-6)
    assert vlm.config.vision_config.patch_size == 4 and vlm.config.image_seq_length == 16


def test_cache_key_follows_the_clip(clip_folder, tmp_path):
    other = tmp_path / "other"
    clip = load_image_text(clip_folder)
    with torch.no_grad():
        clip.model.vision_model.embeddings.patch_embedding.weight.add_(0.01)
    save_image_text(clip, other)

    def key(**teacher):
        cfg = _recipe(tmp_path, **teacher)
        return teacher_key(cfg, vlm_data_config(cfg), 0)

    keys = {key(), key(vision="clip", clip={"path": str(clip_folder)}), key(vision="clip", clip={"path": str(other)}),
            key(vision="clip", clip={"steps": 5, "clip": {"image_size": 16}}),
            key(vision="clip", clip={"steps": 6, "clip": {"image_size": 16}})}
    assert len(keys) == 5
    assert key() == key(clip={"steps": 5}, freeze_vision=False)  # unused from scratch
    assert key(vision="clip", clip={"path": str(other)}) == key(vision="clip", clip={"path": str(other)})


def test_frozen_tower_is_unchanged_by_training_and_the_projector_stage_trains_the_projector_alone(
        clip_folder, tmp_path):
    cfg = _recipe(tmp_path, vision="clip", clip={"path": str(clip_folder)}, projector_steps=2)
    loaded, folder = load_vlm_teacher(cfg, vlm_data_config(cfg), Topology(), torch.device("cpu"), lambda _: None)
    weights = load_file(str(folder / "model.safetensors"))
    tower = {k.split("vision_tower.", 1)[1]: v for k, v in weights.items() if "vision_tower." in k}
    source = load_image_text(clip_folder).model.vision_model.state_dict()
    assert tower and tower.keys() == source.keys()
    assert all(torch.equal(tower[k], source[k]) for k in tower)
    assert "vision_tower" in (folder / "teacher.json").read_text()

    model = loaded.model.train()
    data = build_splits(vlm_data_config(cfg), loaded.tokenizer, 0, vlm_encoder(model, folder, "image"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _set_trainable(model, projector_only=True, freeze_vision=True)
    run_stage(cfg, model, loaded.tokenizer, data.train, 0, tmp_path / "stage", 2, cfg.vlm.teacher.lr,
               torch.device("cpu"), lambda _: None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


def test_a_clip_of_another_image_size_is_refused_before_training(clip_folder, tmp_path):
    with pytest.raises(ValueError, match="clip.image_size=32 differs from vlm.data.scenes.image_size=16"):
        _recipe(tmp_path, vision="clip", clip={"steps": 5})
    cfg = _recipe(tmp_path, image_size=32, vision="clip", clip={"path": str(clip_folder)})
    with pytest.raises(ValueError, match="takes 16-pixel images but vlm.data.scenes.image_size is 32"):
        load_vlm_teacher(cfg, vlm_data_config(cfg), Topology(), torch.device("cpu"), lambda _: None)
    assert not list((tmp_path / "cache" / "vlms").glob("*/model.safetensors"))
    with pytest.raises(ValueError, match="projector_steps=5 but vlm.teacher.vision is 'scratch'"):
        _recipe(tmp_path, projector_steps=5)
