"""The image-text adapter on the CLIP built here (VisionTextDualEncoderModel + BERT) and on a transformers CLIPModel."""

import json

import pytest
import torch
import torch.nn.functional as F
from clip_helpers import tiny_clip_config, tiny_clip_model_folder, tiny_text_folder

from stillroom.domains.vl.clip_model import CaptionTooLong, load_image_text, save_image_text
from stillroom.domains.vl.clip_teacher import build_clip


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    return tiny_text_folder(tmp_path_factory.mktemp("text"))


def test_dual_encoder_round_trip_and_plain_transformers_load(tmp_path, text_folder):
    from transformers import VisionTextDualEncoderModel

    model, _ = build_clip(tiny_clip_config(text_folder), seed=0)
    model.eval()
    save_image_text(model, tmp_path / "clip")
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["text_pooling"] == "mean"
    again = load_image_text(tmp_path / "clip")
    images, texts = torch.rand(3, 3, 16, 16), ["a red circle at the top left", "a photo of the digit two."]
    with torch.no_grad():
        assert torch.allclose(again.image_features(images), model.image_features(images), atol=1e-6)
        assert torch.allclose(again.text_features(texts), model.text_features(texts), atol=1e-6)
        plain = VisionTextDualEncoderModel.from_pretrained(str(tmp_path / "clip")).eval()
        enc = model.tokenize(texts)
        hidden = plain.text_model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        mean = F.normalize(plain.text_projection((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
    assert torch.allclose(mean, model.text_features(texts), atol=1e-5)


def test_adapter_on_a_transformers_clip_model_matches_its_own_features(tmp_path):
    from transformers import CLIPModel

    folder = tiny_clip_model_folder(tmp_path / "clip")
    adapted = load_image_text(folder)
    plain = CLIPModel.from_pretrained(str(folder)).eval()
    texts = ["a circle", "the digit three in a photo"]
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        enc = adapted.tokenize(texts)
        want_t = F.normalize(plain.get_text_features(**enc).pooler_output, dim=-1)
        normalised = (images - adapted.mean_c) / adapted.std_c
        want_i = F.normalize(plain.get_image_features(pixel_values=normalised).pooler_output, dim=-1)
        assert torch.allclose(adapted.text_features(texts), want_t, atol=1e-5)
        assert torch.allclose(adapted.image_features(images), want_i, atol=1e-5)
    assert adapted.pooling == "eos" and adapted.image_size == 16


def test_grey_and_small_images_are_made_rgb_and_resized(text_folder):
    model, _ = build_clip(tiny_clip_config(text_folder), seed=0)
    model.eval()
    grey = torch.rand(2, 1, 8, 8)
    rgb = F.interpolate(grey.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(model.image_features(grey), model.image_features(rgb), atol=1e-6)
        assert torch.allclose(model.image_features(grey).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_a_caption_longer_than_the_tower_is_refused_naming_it(tmp_path):
    adapted = load_image_text(tiny_clip_model_folder(tmp_path / "clip", max_positions=16))
    with pytest.raises(CaptionTooLong, match=r"record scenes:7: .* 16 positions"):
        adapted.tokenize(["ok", "a red circle " * 10], ["record scenes:1", "record scenes:7"])


def test_logit_scale_is_clamped(text_folder):
    model, _ = build_clip(tiny_clip_config(text_folder, max_logit_scale=50.0), seed=0)
    with torch.no_grad():
        model.model.logit_scale.fill_(10.0)
    assert float(model.logit_scale.detach()) == 50.0


def test_a_frozen_text_tower_stays_in_eval_mode_and_gets_no_gradient(text_folder):
    model, _ = build_clip(tiny_clip_config(text_folder), seed=0)
    model.train()
    assert not model.model.text_model.training and model.model.vision_model.training
    assert not any(p.requires_grad for p in model.model.text_model.parameters())
    assert model.model.text_projection.weight.requires_grad
    tuned, _ = build_clip(tiny_clip_config(text_folder, text_tower="tuned"), seed=0)
    assert tuned.train().model.text_model.training
