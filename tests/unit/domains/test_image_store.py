"""The image soft-label store: views and top-k labels round trip, a SIGKILLed write resumed is byte-identical,
a run whose settings differ is refused naming each field, and with k = classes and one view a store-fed run
trains exactly as the online teacher on the same views."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stillroom.config.load import load_config
from stillroom.domains.vision.data import ImageExample, build_image_splits
from stillroom.domains.vision.models import build_classifier
from stillroom.domains.vision.prepare import ClassifierRun
from stillroom.domains.vision.soft_labels import (
    ImageSoftLabels, StoredSoftLabels, StoredViews, image_header, open_store_for_run, view_compute,
)
from stillroom.domains.vision.views import ViewSettings, apply_view, sample_views
from stillroom.methods import METHODS
from stillroom.teachers.store_format import StoreMismatch
from stillroom.teachers.store_writer import write_store
from stillroom.train.distributed import Topology
from stillroom.train.loop import train

AUG = ["classifier.augment.enabled=true"]
WRITER = r'''
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_image_store import synthetic, store_parts
from stillroom.teachers.store_writer import write_store
header, examples, compute = store_parts({n})
def slow(chunk):
    time.sleep({sleep})
    return compute(chunk)
write_store({folder!r}, header, examples, slow, log=lambda s: None, lengths=[header.views_per_image] * len(examples))
'''


def synthetic(n: int) -> list[ImageExample]:
    g = torch.Generator().manual_seed(0)
    return [ImageExample(torch.rand(1, 8, 8, generator=g), i % 10, f"syn:{i}") for i in range(n)]


def config(*overrides: str):
    return load_config(None, ["domain=classifier", "loss.loss_temperature=2.0", *AUG, *overrides])


def store_parts(n: int, *overrides: str):
    """``(header, examples, compute)`` of a store of ``n`` synthetic images, 3 views, 4 images per shard."""
    cfg = config("classifier.store.views_per_image=3", "classifier.store.k=4", "classifier.store.shard_images=4",
                 *overrides)
    teacher = build_classifier(cfg.classifier.teacher.arch, (1, 8, 8), 10, seed=0).eval()
    examples = synthetic(n)
    sc = cfg.classifier.store
    settings = {"k": sc.k, "logprob_dtype": sc.logprob_dtype, "views_per_image": sc.views_per_image,
                "shard_images": sc.shard_images}
    header = image_header(cfg, examples, teacher, 10, settings)
    return header, examples, view_compute(teacher, header, batch_size=5)


def _write(folder: Path, n: int = 14, *overrides: str) -> None:
    header, examples, compute = store_parts(n, *overrides)
    write_store(folder, header, examples, compute, log=lambda s: None, lengths=[3] * n)


@pytest.mark.parametrize("logprob_dtype", ["float16", "int8", "int4"])
def test_store_holds_the_views_and_the_teachers_topk_on_them(tmp_path, logprob_dtype):
    _write(tmp_path / "s", 14, f"classifier.store.logprob_dtype={logprob_dtype}")
    store = ImageSoftLabels(tmp_path / "s")
    m = store.manifest
    assert (m["kind"], m["views_per_image"], m["sequences"], m["tokens"], m["num_shards"]) == ("images", 3, 14, 42, 4)
    assert m["image_shape"] == [1, 8, 8] and m["crop_scale"] == [0.35, 1.0] and m["k"] == 4
    cfg = config()
    teacher = build_classifier(cfg.classifier.teacher.arch, (1, 8, 8), 10, seed=0).eval()
    examples = synthetic(14)
    uids, view_ids = [e.uid for e in examples[:5]], [0, 1, 2, 1, 0]
    boxes, flips = sample_views(ViewSettings.of(cfg.classifier.augment), cfg.seed, uids, view_ids, (8, 8))
    stored_ids, stored_boxes, stored_flips = StoredViews(store, 0).views(uids, 0)
    got = store.gather(uids, view_ids, ("view_boxes", "view_flips"))
    assert torch.equal(got["view_boxes"].long(), boxes) and torch.equal(got["view_flips"].bool(), flips)
    assert stored_boxes.shape == (5, 4) and stored_ids.max() < 3
    views = apply_view(torch.stack([e.image for e in examples[:5]]), boxes, flips, (8, 8))
    logp = torch.log_softmax(teacher(views).float() / 2.0, -1)
    batch = type("B", (), {"uids": uids, "view_ids": torch.tensor(view_ids), "inputs": views})()
    signal = StoredSoftLabels(store).signal(batch)
    assert signal.topk_ids_btk.shape == (5, 1, 4) and signal.temperature == 2.0
    assert torch.equal(signal.topk_ids_btk[:, 0], logp.topk(4).indices)
    top = logp.topk(4).values
    # float16: rounding; int8 / int4: at most half a step of each row's own range (255 / 15 levels), plus the
    # reader's renormalisation of the k + 1 bins
    atol = {"float16": 2e-3, "int8": 2e-3 + float((top.max(-1).values - top.min(-1).values).max()) / 510,
            "int4": 2e-3 + float((top.max(-1).values - top.min(-1).values).max()) / 30}[logprob_dtype]
    torch.testing.assert_close(signal.topk_logprobs_btk[:, 0], top, atol=atol, rtol=0)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_write_resumed_is_byte_identical(tmp_path):
    n = 24  # 6 shards of 4 images
    _write(tmp_path / "whole", n)
    folder = tmp_path / "killed"
    script = WRITER.format(tests=str(Path(__file__).parent), n=n, sleep=0.4, folder=str(folder))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        manifest = folder / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text()).get("shards", [])) >= 2:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    done = len(json.loads((folder / "manifest.json").read_text())["shards"])
    assert proc.returncode == -9 and 2 <= done < 6, "the writer finished before it could be killed"
    logs = []
    header, examples, compute = store_parts(n)
    write_store(folder, header, examples, compute, log=logs.append, lengths=[3] * n)
    assert any(f"{done}/6 shards done" in line for line in logs)
    assert _files(folder) == _files(tmp_path / "whole")


def test_a_store_for_other_settings_is_refused_naming_each_field(tmp_path):
    _write(tmp_path / "s", 14)
    cfg = config("classifier.store.k=4", "classifier.store.views_per_image=3", "classifier.store.shard_images=4",
                 f"classifier.store.path={tmp_path / 's'}", "classifier.augment.crop_scale=[0.5, 1.0]",
                 "loss.loss_temperature=1.0")
    teacher = build_classifier(cfg.classifier.teacher.arch, (1, 8, 8), 10, seed=0).eval()
    with pytest.raises(StoreMismatch) as err:
        open_store_for_run(cfg, synthetic(14), teacher, 10, log=lambda s: None)
    text = str(err.value)
    assert "crop_scale (store [0.35, 1.0], run [0.5, 1.0])" in text and "loss_temperature (store 2.0" in text
    assert "data_fingerprint" not in text and "teacher (" not in text
    other = build_classifier(cfg.classifier.teacher.arch, (1, 8, 8), 10, seed=1).eval()
    cfg = config(f"classifier.store.path={tmp_path / 's'}", "classifier.store.k=3")
    with pytest.raises(StoreMismatch) as err:
        open_store_for_run(cfg, synthetic(13), other, 10, log=lambda s: None)
    text = str(err.value)
    for name in ("teacher (", "data_fingerprint (", "k (store 4, run 3)"):
        assert name in text, name
    assert "views_per_image" not in text  # left at the default: the store's is used


@pytest.fixture(scope="module")
def digits():
    return build_image_splits("digits", 0.2)


def _losses(tmp_path: Path, digits, name: str, *overrides: str) -> list[float]:
    cfg = config(f"output_dir={tmp_path}", "train.steps=6", "train.warmup_steps=1", "train.micro_batch_size=32",
                 "train.precision=fp32", "loss.terms=[{name: forward_kl}, {name: ce}]", *overrides)
    teacher = build_classifier(cfg.classifier.teacher.arch, (1, 8, 8), 10, seed=0).eval()
    student = build_classifier(cfg.classifier.student, (1, 8, 8), 10, seed=1)
    prep = ClassifierRun(cfg, Topology(), torch.device("cpu"), teacher, student, digits, "test teacher")
    job, _ = prep.job(student, METHODS["kd"], baseline=False, run_dir=tmp_path / name, resume=False,
                      log=lambda s: None)
    train(job)
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records]


def test_store_fed_run_equals_the_online_run_on_the_same_views(tmp_path, digits):
    cfg = config("classifier.store.k=10", "classifier.store.logprob_dtype=float32")
    teacher = build_classifier(cfg.classifier.teacher.arch, (1, 8, 8), 10, seed=0).eval()
    sc = cfg.classifier.store
    header = image_header(cfg, digits.train, teacher, 10, {"k": 10, "logprob_dtype": "float32", "views_per_image": 1,
                                                         "shard_images": 500})
    write_store(tmp_path / "store", header, digits.train, view_compute(teacher, header, batch_size=256),
                log=lambda s: None, lengths=[1] * len(digits.train))
    assert sc.views_per_image == 1
    online = _losses(tmp_path, digits, "online")
    stored = _losses(tmp_path, digits, "stored", "classifier.teacher_source=store",
                     f"classifier.store.path={tmp_path / 'store'}")
    plain = _losses(tmp_path, digits, "plain", "classifier.augment.enabled=false")
    assert len(online) == 6 and online == pytest.approx(stored, abs=1e-5)
    assert abs(plain[0] - online[0]) > 1e-3  # the views change what the student sees


def test_the_teacher_identity_hashes_zero_dimensional_buffers():
    """Batch norm's ``num_batches_tracked`` is a 0-d buffer (every ResNet / ConvNext / EfficientNet teacher has
    them): it is hashed like any other tensor, and a change of it changes the identity."""
    from stillroom.domains.vision.soft_labels import weight_identity

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    before = weight_identity(model)
    model[1].num_batches_tracked += 1
    assert weight_identity(model) != before and before.startswith("classifier:")
