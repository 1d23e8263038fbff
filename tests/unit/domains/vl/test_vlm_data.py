"""VLM records through the one data pipeline: image tokens in the prompt (never learned), pixels in every batch,
bad images named before training, and text-only batches exactly as before."""

import json

import pytest
import torch
from vlm_helpers import tiny_vlm, write_tiny_vqa

from stillroom.config.core import DataConfig, DataSource
from stillroom.data import build_splits, collate
from stillroom.data.batch import Example
from stillroom.data.errors import DataError
from stillroom.data.images import ImageError, ImageRef, load_pixels
from stillroom.domains.vl.vlm_model import CLIP_MEAN, CLIP_STD, image_token_count
from stillroom.domains.vl.vlm_teacher import vlm_encoder


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    records = write_tiny_vqa(tmp_path_factory.mktemp("vqa") / "scenes")
    model, tok = tiny_vlm(records)
    return records, model, tok


def _splits(records, model, tok, **data):
    cfg = DataConfig(sources=[DataSource(path=str(records))], seq_len=64, heldout_fraction=0.0, **data)
    return build_splits(cfg, tok, 0, vlm_encoder(model, None, "image"))


def test_image_tokens_lead_the_prompt_and_are_never_targets(vqa):
    records, model, tok = vqa
    data = _splits(records, model, tok)
    n_img, image_id = image_token_count(model.config), model.config.image_token_index
    assert n_img == 4 and len(data.train) == 12
    first = json.loads(records.read_text().splitlines()[0])
    ex = data.train[0]
    assert ex.input_ids[0] == tok.bos_token_id
    assert ex.input_ids[1 : 1 + n_img] == [image_id] * n_img and image_id not in ex.input_ids[1 + n_img :]
    assert not any(ex.target[: 1 + n_img])
    answer = [i for i, t in zip(ex.input_ids, ex.target) if t]
    assert tok.decode(answer, skip_special_tokens=True) == first["completion"]
    assert ex.meta["family"] == first["family"] and ex.image.path.endswith(first["image"])


def test_collate_stacks_normalised_pixels(vqa):
    records, model, tok = vqa
    data = _splits(records, model, tok)
    batch = collate(data.train[:3], tok.pad_token_id)
    assert batch.pixel_values.shape == (3, 3, 16, 16) and batch.pixel_values.dtype == torch.float32
    raw = load_pixels(ImageRef(data.train[0].image.path, 16))
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    assert torch.allclose(batch.pixel_values[0], (raw - mean) / std, atol=1e-6)
    moved = batch.to("cpu")
    assert moved.pixel_values is not None and set(moved.model_inputs()) == {"input_ids", "attention_mask",
                                                                             "pixel_values"}


def test_text_only_batches_are_unchanged():
    examples = [Example([1, 2, 3], [False, True, True], "a"), Example([4, 5], [False, True], "b")]
    batch = collate(examples, pad_id=0)
    assert batch.pixel_values is None and set(batch.model_inputs()) == {"input_ids", "attention_mask"}
    assert batch.target_ids.tolist() == [[2, 3, -100], [5, -100, -100]]


def test_a_batch_mixing_text_and_images_is_refused(vqa):
    records, model, tok = vqa
    ex = _splits(records, model, tok).train[0]
    with pytest.raises(ImageError, match="mixes text-only sequences"):
        collate([ex, Example([1, 2], [False, True], "text-row")], tok.pad_token_id)


@pytest.mark.parametrize("damage, message", [("missing", "does not exist"), ("garbage", "cannot be read as an image")])
def test_bad_images_are_named_before_training(vqa, tmp_path, damage, message):
    records, model, tok = vqa
    lines = [json.dumps({**row, "image": str(records.parent / row["image"])})
             for row in map(json.loads, records.read_text().splitlines())]
    bad = json.loads(lines[1])
    image = tmp_path / "images" / "bad.png"
    image.parent.mkdir()
    if damage == "garbage":
        image.write_bytes(b"not a png")
    bad["image"] = "images/bad.png"
    copy = tmp_path / "records.jsonl"
    copy.write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=rf"records.jsonl:2.*'image'.*bad.png.*{message}"):
        _splits(copy, model, tok)
    skipped = _splits(copy, model, tok, on_bad_record="skip")
    assert skipped.stats["records_bad"] == 1 and len(skipped.train) == 11


def test_a_record_without_its_image_field_is_a_bad_record(vqa, tmp_path):
    records, model, tok = vqa
    lines = records.read_text().splitlines()
    row = json.loads(lines[0])
    del row["image"]
    copy = tmp_path / "records.jsonl"
    copy.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"records.jsonl:1.*missing field 'image'.*vlm.image_field"):
        _splits(copy, model, tok)
