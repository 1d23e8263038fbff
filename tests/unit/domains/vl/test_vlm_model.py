"""The small VLM: a plain Hugging Face LLaVA folder, students built from nested config changes, the fused training
path equal to the plain one with images, the online teacher reading the images, and lossless speculative
decoding of image prompts."""

import pytest
import torch
from vlm_helpers import tiny_vlm, write_tiny_vqa

from stillroom.config.core import DataConfig, DataSource, LossConfig, LossTerm, ModelSource
from stillroom.config.schema import RunConfig
from stillroom.data import build_splits, collate
from stillroom.domains.lm.forward import StudentForward
from stillroom.domains.vl.vlm_eval import prompt_and_pixels
from stillroom.domains.vl.vlm_model import vlm_student, write_preprocessor
from stillroom.domains.vl.vlm_teacher import vlm_encoder
from stillroom.generate.speculative import autoregressive_generate, speculative_generate
from stillroom.losses import LossMix
from stillroom.losses.mix import StudentOutput
from stillroom.models import load_model
from stillroom.teachers.signal import OnlineTeacher


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    records = write_tiny_vqa(tmp_path_factory.mktemp("vqa") / "scenes")
    model, tok = tiny_vlm(records)
    cfg = DataConfig(sources=[DataSource(path=str(records))], seq_len=64, heldout_fraction=0.0)
    data = build_splits(cfg, tok, 0, vlm_encoder(model, None, "image"))
    return model.eval(), tok, data.train


def test_saved_folder_loads_with_plain_transformers_and_stillroom(vlm, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, tok, examples = vlm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    write_preprocessor(tmp_path, 16)
    batch = collate(examples[:2], tok.pad_token_id)
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded = load_model(ModelSource(path=str(tmp_path)))
    assert type(loaded.model) is LlavaForConditionalGeneration and len(loaded.tokenizer) == len(tok)
    with torch.no_grad():
        want = model(**batch.model_inputs()).logits
        assert torch.equal(plain(**batch.model_inputs()).logits, want)
        assert torch.equal(loaded.model(**batch.model_inputs()).logits, want)


def test_student_from_nested_config_changes(vlm):
    model, _, _ = vlm
    student = vlm_student(model, {"text_config": {"num_hidden_layers": 1, "hidden_size": 16}}, seed=0)
    assert type(student) is type(model)
    assert student.config.text_config.num_hidden_layers == 1 and student.config.text_config.head_dim == 4
    assert student.config.vision_config.image_size == 16 and student.config.image_token_index == \
        model.config.image_token_index
    with pytest.raises(ValueError, match="num_hiden_layers: not a field.*num_hidden_layers"):
        vlm_student(model, {"text_config": {"num_hiden_layers": 1}}, seed=0)
    with pytest.raises(ValueError, match="vocab_size cannot change"):
        vlm_student(model, {"text_config": {"vocab_size": 999}}, seed=0)


def test_fused_path_equals_plain_path_with_images(vlm):
    model, tok, examples = vlm
    batch = collate(examples[:4], tok.pad_token_id)
    teacher = vlm_student(model, {"text_config": {"num_hidden_layers": 1}}, seed=1)
    signal = OnlineTeacher(teacher, vocab_size=len(tok)).signal(batch)
    totals = []
    for fused in (True, False):
        mix = LossMix(LossConfig(terms=[LossTerm(name="forward_kl"), LossTerm(name="ce", weight=0.5)], fused=fused))
        out = StudentForward(model, fused=fused, hidden_layers=[], vocab=len(tok))(batch)
        student = StudentOutput(logits_btv=out.get("logits"), hidden_btd=out.get("hidden"), head=out.get("head"))
        totals.append(mix(student, signal, batch.target_ids, batch.loss_mask).total)
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-5, atol=1e-6)


def test_online_teacher_reads_the_images(vlm):
    model, tok, examples = vlm
    batch = collate(examples[:2], tok.pad_token_id)
    teacher = OnlineTeacher(model, vocab_size=len(tok))
    with torch.no_grad():
        torch.testing.assert_close(teacher.signal(batch).logits_btv, model(**batch.model_inputs()).logits)
    batch.pixel_values = batch.pixel_values.flip(-1)
    assert not torch.allclose(teacher.signal(batch).logits_btv, model(**collate(examples[:2], 0).model_inputs()).logits)


def test_speculative_decoding_of_an_image_prompt_is_lossless(vlm):
    model, tok, examples = vlm
    torch.manual_seed(0)
    with torch.no_grad():  # a sharper random target, so greedy tokens are not all ties
        model.lm_head.weight.mul_(20)
    draft = vlm_student(model, {"text_config": {"num_hidden_layers": 1}}, seed=3)
    for ex in examples[:3]:
        ids, pixels = prompt_and_pixels(ex)
        plain = autoregressive_generate(model, ids, max_new_tokens=8, pixel_values=pixels)
        spec = speculative_generate(model, draft, ids, gamma=3, max_new_tokens=8, pixel_values=pixels)
        hf = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=8, do_sample=False,
                            eos_token_id=None, min_new_tokens=8)
        assert spec.tokens == plain.tokens == hf[0, len(ids):].tolist()
        # the target as its own draft accepts every proposal only if the draft saw the image too
        itself = speculative_generate(model, model, ids, gamma=3, max_new_tokens=8, pixel_values=pixels)
        assert itself.tokens == plain.tokens and itself.stats.acceptance_rate == 1.0
        assert itself.stats.target_calls == 2
    # a draft proposing the image token's id: the target's first pass reads the image with the prompt only
    stubborn = vlm_student(model, {"text_config": {"num_hidden_layers": 1}}, seed=4)
    with torch.no_grad():
        stubborn.lm_head.weight.zero_()
        stubborn.lm_head.weight[model.config.image_token_index] = 1.0
    for greedy in (True, False):
        out = speculative_generate(model, stubborn, ids, gamma=3, max_new_tokens=6, pixel_values=pixels,
                                   greedy=greedy, generator=torch.Generator().manual_seed(0))
        assert len(out.tokens) == 6 and (not greedy or out.tokens == plain.tokens[:6])
    with torch.no_grad():
        model.lm_head.weight.div_(20)


def test_vlm_section_rules():
    base = {"vlm": {}, "student": {"from_config": {"text_config": {"num_hidden_layers": 1}}}}
    RunConfig(**base)
    with pytest.raises(ValueError, match="teacher.model is set beside the `vlm` section"):
        RunConfig(**base, teacher={"model": {"path": "x"}})
    with pytest.raises(ValueError, match="student.from_config"):
        RunConfig(vlm={})
    with pytest.raises(ValueError, match="data.sources is set beside vlm.data"):
        RunConfig(**{**base, "vlm": {"data": {}}}, data={"sources": [{"path": "a.jsonl"}]})
    RunConfig(**base, teacher={"source": "store"})  # a store written by cache-teacher read the images
    RunConfig(**base, teacher={"source": "remote", "remote": {"url": "http://127.0.0.1:1/v1", "model": "m"}})
    with pytest.raises(ValueError, match="tokenizer_mode=cross with teacher.source=remote in a VLM run"):
        RunConfig(**base, teacher={"source": "remote", "tokenizer_mode": "cross",
                                   "remote": {"url": "http://127.0.0.1:1/v1", "model": "m"}})
