"""VLM teachers that read images over HTTP and in ensembles, through `stillroom run`.

The online run trains the tiny LLaVA teacher once (cached); `serve-teacher`'s service then serves that folder on
loopback. With top_k = V a remote-fed run trains exactly as the online one (each row sends its image with its
token ids), and so do an ensemble of the same VLM teacher twice (the run's, and its folder loaded as a member)
and an average of the online and remote VLM teachers; a changed image is asked again rather than answered from
the resume cache; a text-only server and a text-only ensemble member are refused before training with errors
naming what to change.
"""

import base64
import json

import pytest
from cli_helpers import assert_same_losses, stillroom
from loopback import serve
from test_vlm_cli import _recipe

NO_EVAL = ["eval.before=false"]
V = 300  # TINY's vocabulary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(tmp_path, recipe, the cached teacher folder)`` after an online run (the reference losses)."""
    tmp_path = tmp_path_factory.mktemp("vlm_remote")
    recipe = _recipe(tmp_path, "vr", loss={"terms": [{"name": "forward_kl"}, {"name": "ce", "weight": 0.5}],
                                           "chunk_tokens": 32})
    stillroom("run", str(recipe), "name=online", *NO_EVAL)
    folder = next((tmp_path / "cache" / "vlms").iterdir())
    return tmp_path, recipe, folder


@pytest.fixture(scope="module")
def served(trained):
    """Our server (serve-teacher's service: images on) serving the cached LLaVA folder as "vlm"."""
    from stillroom.config.commands import ServeTeacherConfig
    from stillroom.run.serve import make_service
    from stillroom.teachers.server import create_app

    _, _, folder = trained
    service, _ = make_service(ServeTeacherConfig(model=str(folder), dtype="float32", max_top_k=V,
                                                 served_model_name="vlm", log_requests=False), log=lambda _: None)
    assert service.images is not None and service.images.tokens_per_image == 4
    with serve(create_app(service)) as server:
        yield server


def _assert_cache_equals_online(recipe, folder, cache) -> None:
    """Every row in the remote cache (k = V) holds the online teacher's log-probs of that row with its image (the
    cache file is read directly)."""
    import numpy as np
    import torch

    from stillroom.config.core import ModelSource
    from stillroom.config.load import load_config
    from stillroom.data import build_splits, collate
    from stillroom.domains.vl.vlm_teacher import vlm_data_config, vlm_encoder
    from stillroom.models import load_model
    from stillroom.teachers.remote_cache import ids_digest
    from stillroom.teachers.remote_images import image_digest
    from stillroom.teachers.signal import OnlineTeacher

    cfg = load_config(recipe)
    loaded = load_model(ModelSource(path=str(folder)))
    data = build_splits(vlm_data_config(cfg), loaded.tokenizer, cfg.seed,
                        vlm_encoder(loaded.model, folder, cfg.vlm.image_field))
    rows = {r["uid"]: r for r in map(json.loads, cache.read_text().splitlines()[1:])}
    examples = [ex for ex in data.train if ex.uid in rows]
    assert len(examples) == len(rows)
    online = OnlineTeacher(loaded.model, vocab_size=V)
    worst = 0.0
    for ex in examples:
        row = rows[ex.uid]
        assert row["digest"] == ids_digest(ex.input_ids, image_digest(open(ex.image.path, "rb").read()))
        shape = (int(row["n"]), V)
        ids = torch.from_numpy(np.frombuffer(base64.b64decode(row["ids"]), "<i4").reshape(shape).astype(np.int64))
        lp = torch.from_numpy(np.frombuffer(base64.b64decode(row["logprobs"]), "<f4").reshape(shape).copy())
        want = torch.log_softmax(online.signal(collate([ex], 0)).logits_btv[0, : shape[0]].float(), -1)
        got = torch.empty_like(want).scatter_(-1, ids, lp)
        worst = max(worst, float((got.clamp(min=-50) - want.clamp(min=-50)).abs().max()))
    assert worst < 1e-4, worst


def _remote(url: str) -> list[str]:
    return ["teacher.source=remote", f"teacher.remote.url={url}", "teacher.remote.model=vlm",
            f"teacher.remote.top_k={V}"]


def test_a_remote_vlm_teacher_at_full_k_trains_like_the_online_one(trained, served):
    tmp_path, recipe, folder = trained
    stillroom("run", str(recipe), "name=remote", *_remote(served.url), *NO_EVAL)
    assert_same_losses(tmp_path / "runs" / "remote", tmp_path / "runs" / "online", abs=1e-5, steps=3)
    cache = tmp_path / "runs" / "remote" / "remote_cache.jsonl"
    rows = cache.read_text().splitlines()[1:]
    assert rows and len({json.loads(r)["uid"] for r in rows}) == len(rows)
    # the losses barely move with the image (a 6-step teacher): the answers themselves must equal the online ones
    _assert_cache_equals_online(recipe, folder, cache)

    # every image changed (rotated): the same rows are asked again, none is answered from the cache (the same
    # cache file: the first run closed its teacher, so its lock is free for a second run in this process)
    again = cache
    images = sorted((next((tmp_path / "cache" / "vqa").iterdir()) / "images").glob("*.png"))
    originals = {p: p.read_bytes() for p in images}
    from PIL import Image

    try:
        for p in images:
            with Image.open(p) as img:
                rotated = img.rotate(180)
            rotated.save(p)
        stillroom("run", str(recipe), "name=remote2", *_remote(served.url), f"teacher.remote.cache={again}", *NO_EVAL)
    finally:
        for p, data in originals.items():  # the other tests compare with the online run on the original images
            p.write_bytes(data)
    assert len(again.read_text().splitlines()) - 1 == 2 * len(rows)


def test_ensembles_of_vlm_teachers_train_like_the_online_one(trained, served):
    tmp_path, recipe, folder = trained
    online = "{source: online, dtype: float32}"
    loaded = f"{{source: online, dtype: float32, model: {{path: {folder}}}}}"  # loaded again as a member's own
    stillroom("run", str(recipe), "name=ens", "teacher.source=ensemble", f"teacher.ensemble=[{online}, {loaded}]",
              *NO_EVAL)
    assert_same_losses(tmp_path / "runs" / "ens", tmp_path / "runs" / "online", abs=1e-5, steps=3)
    remote = (f"{{source: remote, remote: {{url: {served.url}, model: vlm, top_k: {V}, "
              f"cache: {tmp_path / 'member_cache.jsonl'}}}}}")
    stillroom("run", str(recipe), "name=mixed", "teacher.source=ensemble", f"teacher.ensemble=[{online}, {remote}]",
              *NO_EVAL)
    assert_same_losses(tmp_path / "runs" / "mixed", tmp_path / "runs" / "online", abs=1e-4, steps=3)


def test_text_only_teachers_are_refused_in_a_vlm_run(trained, tiny_teacher_dir):
    from helpers import load_saved
    from loopback import teacher_app

    tmp_path, recipe, _ = trained
    model, text_tok = load_saved(tiny_teacher_dir)
    with serve(teacher_app(model, text_tok, max_top_k=8)) as text_server:
        bad = stillroom("run", str(recipe), "name=textserver", "teacher.source=remote",
                        f"teacher.remote.url={text_server.url}", "teacher.remote.model=tiny", "teacher.remote.top_k=8",
                        *NO_EVAL, check=False)
    said = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "image_input" in said and "serve-teacher" in said, said
    member = f"{{source: online, model: {{gguf: {tmp_path / 'text.gguf'}}}}}"
    bad = stillroom("run", str(recipe), "name=textmember", "teacher.source=ensemble",
                    f"teacher.ensemble=[{{source: online}}, {member}]", *NO_EVAL, check=False)
    said = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "teacher.ensemble.1.model names a text model" in said, said
    assert not (tmp_path / "runs" / "textmember" / "checkpoints").exists()
