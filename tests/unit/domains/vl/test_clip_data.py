"""Captioned image data of the clip domain: class phrases, caption folders, the caption table, named errors."""

import json

import numpy as np
import pytest
from clip_helpers import tiny_clip_config

from stillroom.config.clip import ClipConfig
from stillroom.domains.vl.clip_data import build_clip_splits, class_phrases, collate_clip


def test_class_phrases_and_a_prompt_set_missing_a_class():
    assert class_phrases("digits", ["3", "8"], {}) == ["the digit three", "the digit eight"]
    assert class_phrases("shapes", ["circle", "ring"], {}) == ["a circle", "a ring"]
    assert class_phrases("shapes", ["circle"], {"shapes": {"circle": "a round blob"}}) == ["a round blob"]
    with pytest.raises(ValueError, match=r"clip.class_prompts.digits has no prompt for class\(es\) \['1'\]"):
        class_phrases("digits", ["0", "1"], {"digits": {"0": "a zero"}})


def test_splits_caption_every_image_and_share_one_caption_table(tmp_path):
    data = build_clip_splits(tiny_clip_config(tmp_path), None, run_seed=0)
    assert {e.dataset for e in data.train} == {"scenes", "digits"}
    assert not {e.uid for e in data.train} & {e.uid for e in data.heldout}
    for e in data.train + data.heldout:
        assert data.captions[e.caption_id] == e.caption and e.image.shape == (3, 16, 16)
    digits = [e for e in data.train if e.dataset == "digits"]
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    templates = ["a photo of {}.", "a picture of {}.", "an image showing {}."]
    assert [e.caption for e in digits] == [templates[i % 3].format(f"the digit {words[e.label]}")
                                           for i, e in enumerate(digits)]
    assert data.sets["digits"].phrases[3] == "the digit three" and data.sets["scenes"].phrases is None
    batch = collate_clip(data.train[:5])
    assert batch.inputs.shape == (5, 3, 16, 16) and batch.num_targets == 5 and batch.caption_ids.shape == (5,)


def _folder(tmp_path, records):
    from PIL import Image

    (tmp_path / "images").mkdir(parents=True)
    for r in records:
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / r["image"])
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_caption_folder_records_and_an_image_without_a_caption(tmp_path):
    good = [{"id": f"r{i}", "image": f"images/r{i}.png", "caption": f"a red circle number {i}"} for i in range(6)]
    folder = _folder(tmp_path / "good", good)
    data = build_clip_splits(ClipConfig(datasets=[], caption_folders=[str(folder)], image_size=16,
                                        vision={"patch_size": 4}), None, 0)
    assert len(data.train) + len(data.heldout) == 6 and data.train[0].image.shape == (3, 16, 16)
    bad = _folder(tmp_path / "bad", good[:2] + [{"id": "r9", "image": "images/r9.png"}])
    with pytest.raises(ValueError, match=r"records.jsonl:3 \(id 'r9'\): the image 'images/r9.png' has no caption"):
        build_clip_splits(ClipConfig(datasets=[], caption_folders=[str(bad)], image_size=16,
                                     vision={"patch_size": 4}), None, 0)


def test_config_refuses_templates_without_a_slot_and_unknown_prompt_sets():
    with pytest.raises(ValueError, match="exactly one"):
        ClipConfig(templates=["a photo"])
    with pytest.raises(ValueError, match="only shapes, digits and mnist have classes"):
        ClipConfig(class_prompts={"scenes": {"x": "y"}})
    with pytest.raises(ValueError, match="does not divide"):
        ClipConfig(image_size=30)


def test_prepare_refuses_a_caption_longer_than_the_text_tower_naming_its_record(tmp_path):
    from clip_helpers import tiny_text_folder

    from stillroom.config.schema import RunConfig
    from stillroom.domains.vl.clip_domain import ClipDomain
    from stillroom.domains.vl.clip_model import CaptionTooLong
    from stillroom.methods import METHODS
    from stillroom.train.distributed import Topology

    records = [{"id": "ok", "image": "images/ok.png", "caption": "a red circle"},
               {"id": "long", "image": "images/long.png", "caption": "a red circle and " * 30}]
    folder = _folder(tmp_path / "caps", records)
    text = tiny_text_folder(tmp_path / "text", max_positions=64)
    cfg = RunConfig(domain="clip", method="sft", clip=tiny_clip_config(text, datasets=[], caption_folders=[str(folder)],
                                                                       heldout_fraction=0.01))
    with pytest.raises(CaptionTooLong, match=r"record caps:long: the caption .* 64 positions"):
        ClipDomain().prepare(cfg, Topology(), METHODS["sft"], lambda s: None)
