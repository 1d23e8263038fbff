"""Images over the remote-teacher protocol: encoding and parsing of `images`, the server's pixels and placeholder
expansion, a remote VLM teacher against our server on loopback (parity with the online teacher at k = V, a cache
keyed by the image bytes), and the errors that name the request field or the setting to change."""

from __future__ import annotations

import io
import json

import httpx
import pytest
import torch

from loopback import serve, teacher_app
from stillroom.config.schema import RemoteConfig
from stillroom.data.batch import Example, collate
from stillroom.data.images import load_pixels
from stillroom.domains.vl.vlm_model import image_ref, write_preprocessor
from stillroom.teachers.ensemble import log_probs
from stillroom.teachers.http import RemoteError
from stillroom.teachers.remote_images import (ImageInput, ImageRequestError, expand_placeholders, image_input,
                                              image_part, part_bytes, pixels_from_bytes, request_pixels)
from stillroom.teachers.remote_vlm import RemoteVlmTeacher, check_vlm_member, image_files
from stillroom.teachers.signal import OnlineTeacher
from vlm_helpers import IMAGE_SIZE, tiny_vlm, write_tiny_vqa

SPEC = ImageInput(size=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), image_token_id=7, tokens_per_image=3)


def png_bytes(size: int = 16, seed: int = 0) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """``(model, tokenizer, folder, records file, three VLM examples)``: a tiny LLaVA saved with its image settings."""
    tmp = tmp_path_factory.mktemp("rvlm")
    records = write_tiny_vqa(tmp / "vqa")
    model, tok = tiny_vlm(records)
    model.eval()
    folder = tmp / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_preprocessor(folder, IMAGE_SIZE)
    spec = image_input(model, str(folder))
    examples = []
    for i, line in enumerate(records.read_text().splitlines()[:3]):
        rec = json.loads(line)
        text = tok(rec["prompt"] + " " + rec["completion"], add_special_tokens=False)["input_ids"][: 6 + i]
        ids = [tok.bos_token_id] + [spec.image_token_id] * spec.tokens_per_image + text
        target = [False] * (1 + spec.tokens_per_image) + [True] * len(text)
        examples.append(Example(ids, target, uid=f"row{i}", image=image_ref(model, str(records.parent / rec["image"]),
                                                                            folder)))
    return model, tok, folder, records, examples


@pytest.fixture(scope="module")
def server(vlm):
    model, tok, folder, _, _ = vlm
    with serve(teacher_app(model, tok, max_top_k=len(tok), images=image_input(model, str(folder)))) as srv:
        yield srv


# ----------------------------------------------------------------------------- protocol


def test_an_image_part_is_an_openai_data_url_and_parses_back_to_the_same_bytes():
    data = png_bytes()
    part = image_part(data)
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    assert part_bytes(part, "images[0]") == data
    assert part_bytes(part["image_url"]["url"], "images[0]") == data  # a bare data URL is read too


@pytest.mark.parametrize("part, said", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "images[0].image_url.url starts"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,abc"}}, "without ';base64'"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "invalid base64"),
    ({"type": "input_audio", "input_audio": {}}, "images[0].type is 'input_audio'"),
    ({"type": "image_url"}, "images[0].image_url.url is missing"),
])
def test_an_unusable_image_part_is_named(part, said):
    with pytest.raises(ImageRequestError, match=said.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        part_bytes(part, "images[0]")


def test_bytes_that_are_no_image_are_named():
    with pytest.raises(ImageRequestError, match="notes.txt cannot be read as an image"):
        image_part(b"not an image", "image file notes.txt")
    with pytest.raises(ImageRequestError, match=r"images\[1\]: the bytes are not an image"):
        pixels_from_bytes(b"not an image", SPEC, "images[1]")


@pytest.mark.parametrize("size", [16, 4])  # the tower's own size, and a resize (16 -> 4, bicubic)
def test_pixels_from_bytes_equal_the_online_teachers_pixels_of_the_file(tmp_path, size):
    from stillroom.data.images import ImageRef

    data = png_bytes(16, seed=3)
    path = tmp_path / "scene.png"
    path.write_bytes(data)
    spec = ImageInput(size=size, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), image_token_id=1, tokens_per_image=1)
    want = load_pixels(ImageRef(str(path), size, spec.mean, spec.std))
    assert torch.equal(pixels_from_bytes(data, spec, "images[0]"), want)


def test_placeholders_are_expanded_to_the_models_count_or_kept_when_already_expanded():
    assert expand_placeholders([1, 7, 5, 6], SPEC, 1) == [1, 7, 7, 7, 5, 6]
    assert expand_placeholders([1, 7, 7, 7, 5], SPEC, 1) == [1, 7, 7, 7, 5]
    assert expand_placeholders([7, 5, 7, 7, 7], SPEC, 2) == [7, 7, 7, 5, 7, 7, 7]
    with pytest.raises(ImageRequestError, match="1 run.* but `images` has 2 image"):
        expand_placeholders([1, 7, 5], SPEC, 2)
    with pytest.raises(ImageRequestError, match="a run of 2 image tokens; this model fills 3"):
        expand_placeholders([1, 7, 7, 5], SPEC, 1)


def test_request_pixels_refuses_what_it_cannot_read_naming_the_field():
    part = image_part(png_bytes(4))
    with pytest.raises(ImageRequestError, match="`images` was sent, but 'txt' is a text model"):
        request_pixels(None, "txt", [part], [[1, 2]], 0)
    assert request_pixels(None, "txt", None, [[1, 2]], 5) == ([[1, 2]], None)
    with pytest.raises(ImageRequestError, match="holds image tokens .id 7. but the request has no `images`"):
        request_pixels(SPEC, "vlm", None, [[1, 7, 7, 7]], 0)
    with pytest.raises(ImageRequestError, match="one token-id prompt; this request has 2"):
        request_pixels(SPEC, "vlm", [part], [[7], [7]], 0)
    with pytest.raises(ImageRequestError, match="send max_tokens: 0"):
        request_pixels(SPEC, "vlm", [part], [[1, 7]], 1)
    prompts, pixels = request_pixels(SPEC, "vlm", [part], [[1, 7, 2]], 0)
    assert prompts == [[1, 7, 7, 7, 2]] and pixels.shape == (1, 3, 4, 4)


# ----------------------------------------------------------------------------- server


def test_the_server_lists_its_image_input_and_answers_with_the_image(vlm, server):
    model, tok, _, _, examples = vlm
    entry = httpx.get(server.url + "/models").json()["data"][0]
    assert entry["image_input"] == {"field": "images", "image_token_id": model.config.image_token_index,
                                    "tokens_per_image": 4, "image_size": IMAGE_SIZE}
    ex = examples[0]
    data = open(ex.image.path, "rb").read()
    collapsed = [t for i, t in enumerate(ex.input_ids) if not (i > 1 and t == ex.input_ids[1] == ex.input_ids[i - 1])]
    for prompt in (ex.input_ids, collapsed):  # expanded as the student's rows, or one placeholder expanded there
        body = httpx.post(server.url + "/completions", json={"prompt": prompt, "prompt_logprobs": 3, "max_tokens": 0,
                                                             "images": [image_part(data)]}).json()
        choice = body["choices"][0]
        assert choice["prompt_token_ids"] == ex.input_ids and len(choice["prompt_logprobs"]) == len(ex.input_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ex.input_ids]), pixel_values=load_pixels(ex.image)[None]).logits[0]
    want = torch.log_softmax(logits.float(), -1)
    top = choice["prompt_logprobs"][-1]
    best = min(top, key=lambda key: top[key]["rank"])
    assert int(best) == int(want[-2].argmax()) and top[best]["logprob"] == pytest.approx(float(want[-2].max()), abs=1e-5)


def test_a_text_server_asked_with_an_image_names_the_field(tiny_teacher_dir):
    from helpers import load_saved

    model, tok = load_saved(tiny_teacher_dir)
    with serve(teacher_app(model, tok, max_top_k=4)) as srv:
        r = httpx.post(srv.url + "/completions", json={"prompt": [1, 2, 3], "prompt_logprobs": 2, "max_tokens": 0,
                                                       "images": [image_part(png_bytes(4))]})
        assert httpx.get(srv.url + "/models").json()["data"][0]["image_input"] is None
    assert r.status_code == 400 and "`images` was sent" in r.json()["error"]["message"]


def test_serve_teacher_loads_a_llava_folder_with_its_image_settings(vlm):
    from stillroom.config.commands import ServeTeacherConfig
    from stillroom.run.serve import make_service

    _, _, folder, _, _ = vlm
    said = []
    service, _ = make_service(ServeTeacherConfig(model=str(folder), dtype="float32", log_requests=False),
                              log=said.append)
    assert service.images == image_input(service.model, str(folder)) and service.images.tokens_per_image == 4
    assert any("requests may send `images`" in line and "preprocessor_config.json" in line for line in said)


# ----------------------------------------------------------------------------- client


def test_a_remote_vlm_teacher_at_full_k_equals_the_online_teacher_and_caches_by_image(vlm, server, tmp_path):
    model, tok, _, _, examples = vlm
    vocab = len(tok)
    batch = collate(examples, tok.pad_token_id)
    online = torch.log_softmax(OnlineTeacher(model, vocab_size=vocab).signal(batch).logits_btv.float(), -1)
    cfg = RemoteConfig(url=server.url, model="tiny", top_k=vocab)
    teacher = RemoteVlmTeacher(cfg, images=image_files(examples), tokens_per_image=4, vocab_size=vocab,
                               cache=tmp_path / "cache.jsonl")
    try:
        teacher.check_server()
        mask = batch.loss_mask
        got = log_probs(teacher.signal(batch), vocab)
        assert (got[mask] - online[mask]).abs().max() < 1e-5
        sent = teacher.requests_sent
        teacher.signal(batch)
        assert teacher.requests_sent == sent  # every row answered from the cache
    finally:
        teacher.close()
    # another image under the same uid and token ids: asked again, and its answer differs
    moved = dict(image_files(examples))
    other = tmp_path / "other.png"
    other.write_bytes(png_bytes(IMAGE_SIZE, seed=9))
    moved["row0"] = str(other)
    teacher = RemoteVlmTeacher(cfg, images=moved, vocab_size=vocab, cache=tmp_path / "cache.jsonl")
    try:
        changed = log_probs(teacher.signal(batch), vocab)
        assert teacher.requests_sent == 1  # only row 0
        assert (changed[0][mask[0]] - online[0][mask[0]]).abs().max() > 1e-3
        assert torch.equal(changed[1:], got[1:])
    finally:
        teacher.close()


def test_a_server_without_image_input_or_with_another_image_count_is_refused(vlm, server, tiny_teacher_dir):
    from helpers import load_saved

    _, tok, _, _, examples = vlm
    model, text_tok = load_saved(tiny_teacher_dir)
    with serve(teacher_app(model, text_tok, max_top_k=4)) as srv:
        teacher = RemoteVlmTeacher(RemoteConfig(url=srv.url, top_k=4), images={}, vocab_size=len(text_tok))
        with pytest.raises(RemoteError, match="no `image_input`.*serve-teacher FOLDER"):
            teacher.check_server()
        teacher.close()
    teacher = RemoteVlmTeacher(RemoteConfig(url=server.url, top_k=4), images={}, tokens_per_image=9,
                               vocab_size=len(tok))
    with pytest.raises(RemoteError, match="fills 4 image tokens per image but the student's rows hold 9"):
        teacher.check_server()
    teacher.close()


def test_a_row_without_a_known_image_file_is_named(vlm, server):
    _, tok, _, _, examples = vlm
    teacher = RemoteVlmTeacher(RemoteConfig(url=server.url, top_k=4), images={}, vocab_size=len(tok))
    try:
        with pytest.raises(ValueError, match=r"row 0 \(uid row0\) has pixels but no known image file"):
            teacher.signal(collate(examples, tok.pad_token_id))
    finally:
        teacher.close()


def test_image_files_refuses_one_uid_with_two_images(vlm):
    ex = vlm[4][0]
    twin = Example(ex.input_ids, ex.target, uid=ex.uid, image=vlm[4][2].image)  # records 0, 1 share one
    assert image_files([ex, ex]) == {ex.uid: ex.image.path}
    with pytest.raises(ValueError, match=f"uid {ex.uid} names two images"):
        image_files([ex, twin])


def test_an_ensemble_member_must_read_the_runs_pixels(vlm, tiny_teacher_dir):
    from helpers import load_saved

    model, _, folder, _, examples = vlm
    check_vlm_member(model, str(folder), examples, "teacher.ensemble.1")  # the run's own settings: fine
    text_model, _ = load_saved(tiny_teacher_dir)
    with pytest.raises(ValueError, match="teacher.ensemble.1: LlamaForCausalLM is a text model"):
        check_vlm_member(text_model, str(tiny_teacher_dir), examples, "teacher.ensemble.1")
    other = folder.parent / "other"
    other.mkdir()
    write_preprocessor(other, IMAGE_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="teacher.ensemble.2: this VLM reads 16-pixel images normalised by mean"):
        check_vlm_member(model, str(other), examples, "teacher.ensemble.2")



def test_a_routed_ensemble_of_vlm_teachers_gives_each_row_its_members_answer_on_its_image(vlm, server):
    from stillroom.teachers.ensemble import EnsembleTeacher

    model, tok, _, _, examples = vlm
    vocab = len(tok)
    batch = collate(examples, tok.pad_token_id)
    batch.domains = ["1", "0", "1"]  # rows 0 and 2 to the remote member, row 1 to the online one
    online = OnlineTeacher(model, vocab_size=vocab)
    want = torch.log_softmax(online.signal(batch).logits_btv.float(), -1)
    remote = RemoteVlmTeacher(RemoteConfig(url=server.url, model="tiny", top_k=vocab), images=image_files(examples),
                              vocab_size=vocab)
    try:
        got = log_probs(EnsembleTeacher([online, remote], mode="route", vocab_size=vocab).signal(batch), vocab)
        assert remote.requests_sent == 2  # only its two rows were sent, each with its own image
    finally:
        remote.close()
    mask = batch.loss_mask
    assert (got[mask] - want[mask]).abs().max() < 1e-5
