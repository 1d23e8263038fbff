"""RemoteTeacher against the real teacher server on loopback: parity with the online teacher,
resume from the cache, generations (stillroom.datagen.remote_complete), API-key hygiene, and the
prompt_logprobs parser."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from helpers import tiny_llama
from loopback import serve, teacher_app
from stillroom.config.schema import RemoteConfig
from stillroom.data.batch import Example, collate
from stillroom.losses.sparse import student_bins, teacher_bins
from stillroom.models.vocab import tokenizer_hash
from stillroom.teachers.signal import OnlineTeacher
from stillroom.datagen.remote_complete import complete_fn, generate, remote_complete
from stillroom.teachers.http import OpenAIClient, RemoteError
from stillroom.teachers.remote import RemoteTeacher, parse_prompt_logprobs
from stillroom.teachers.remote_cache import RemoteCache
from stillroom.teachers.signal import Fingerprint

KEY = "sk-remote-test-5be1d0c4"


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_llama(len(tok), seed=5), tok


@pytest.fixture(scope="module")
def server(tiny):
    with serve(teacher_app(*tiny, max_top_k=16)) as srv:
        yield srv


def batch_of(lengths, vocab, seed=0, domains=None):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        exs.append(Example(input_ids=ids, target=[True] * n, uid=f"u{seed}-{i}",
                           domain=None if domains is None else domains[i]))
    return collate(exs, pad_id=1)


def test_remote_topk_equals_online_topk_of_log_softmax(server, tiny):
    model, tok = tiny
    vocab = len(tok)
    batch = batch_of([12, 7, 3, 1], vocab)
    remote = RemoteTeacher(RemoteConfig(url=server.url, model="tiny", top_k=8, concurrency=3), vocab_size=vocab)
    sig = remote.signal(batch)
    dense = OnlineTeacher(model, vocab_size=vocab).signal(batch).logits_btv
    top = torch.log_softmax(dense.float(), -1).topk(8)
    mask = batch.loss_mask
    assert sig.topk_ids_btk.shape == (4, 12, 8) and sig.temperature == 1.0
    assert torch.equal(sig.topk_ids_btk[mask], top.indices[mask])
    torch.testing.assert_close(sig.topk_logprobs_btk[mask], top.values[mask], atol=1e-5, rtol=0)
    want_tail = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(sig.tail_logmass_bt[mask], want_tail[mask], atol=1e-4, rtol=0)
    # The K+1 bins then give the same teacher distribution the loss would see from the online top-k.
    bins = teacher_bins(sig.topk_logprobs_btk[mask], sig.tail_logmass_bt[mask], torch.float32)
    assert torch.allclose(bins.exp().sum(-1), torch.ones(int(mask.sum())), atol=1e-5)
    s_logp = torch.log_softmax(torch.randn(int(mask.sum()), vocab), -1)
    assert torch.isfinite(student_bins(s_logp, sig.topk_ids_btk[mask])).all()
    assert remote.requests_sent == 3  # the 1-token row needs no request
    remote.close()


def test_cache_resumes_without_asking_again(server, tiny, tmp_path):
    vocab = len(tiny[1])
    batch = batch_of([9, 9, 5], vocab, seed=1)
    cfg = RemoteConfig(url=server.url, model="tiny", top_k=4)
    first = RemoteTeacher(cfg, vocab_size=vocab, cache=tmp_path / "remote.jsonl")
    a = first.signal(batch)
    first.close()
    again = RemoteTeacher(cfg, vocab_size=vocab, cache=tmp_path / "remote.jsonl")
    b = again.signal(batch)
    assert again.requests_sent == 0 and len(again.cache) == 3
    assert torch.equal(a.topk_ids_btk, b.topk_ids_btk) and torch.equal(a.topk_logprobs_btk, b.topk_logprobs_btk)
    # Same uid with other tokens (e.g. another seq_len) is asked again, not served stale.
    changed = collate([Example(input_ids=batch.input_ids[0, :6].tolist(), target=[True] * 6, uid=batch.uids[0])], 1)
    again.signal(changed)
    assert again.requests_sent == 1
    again.close()
    with pytest.raises(RemoteError, match="top_k"):
        RemoteCache(tmp_path / "remote.jsonl", model="tiny", top_k=5)


def test_cache_of_another_teacher_is_refused_in_words_with_the_way_out(tmp_path):
    path = tmp_path / "remote.jsonl"
    RemoteCache(path, model="small", top_k=4).close()
    with pytest.raises(RemoteError) as err:
        RemoteCache(path, model="big", top_k=8)
    msg = str(err.value)
    assert "model 'small' (this run: 'big')" in msg and "top_k 4 (this run: 8)" in msg
    assert "{" not in msg and "teacher.remote.cache=" in msg and f"delete {path}" in msg
    with pytest.raises(RemoteError) as err:  # only what differs is named
        RemoteCache(path, model="small", top_k=8)
    assert "another teacher setting: top_k 4 (this run: 8). " in str(err.value)
    path.write_text('{"some": "other file"}\n')
    with pytest.raises(RemoteError, match="file format None"):
        RemoteCache(path, model="small", top_k=4)


def test_cache_drops_a_torn_tail_and_rejects_corruption(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = RemoteCache(path, model="m", top_k=2)
    rows = np.array([[3, 4]], dtype=np.int32), np.array([[-0.1, -2.0]], dtype=np.float32)
    cache.put("a", [1, 2], *rows)
    cache.put("b", [1, 3], *rows)
    cache.close()
    data = path.read_bytes()
    path.write_bytes(data[:-30])  # crash in the middle of writing "b"
    cache = RemoteCache(path, model="m", top_k=2)
    assert cache.get("a", [1, 2]) is not None and cache.get("b", [1, 3]) is None
    cache.close()
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b"{broken", lines[1], b""]))
    with pytest.raises(RemoteError, match=r"c\.jsonl:2"):
        RemoteCache(path, model="m", top_k=2)


def test_generate_returns_n_texts_per_prompt_and_is_seeded(server):
    client = OpenAIClient(RemoteConfig(url=server.url, model="tiny", concurrency=2))
    prompts = ["one", "two", [{"role": "user", "content": "three"}]]
    a = generate(client, prompts, 2, max_new_tokens=4, seed=7)
    b = generate(client, list(reversed(prompts)), 2, max_new_tokens=4, seed=7)
    assert [len(x) for x in a] == [2, 2, 2] and all(isinstance(t, str) for x in a for t in x)
    assert a == list(reversed(b))  # a prompt's seed does not depend on its position
    raw = generate(client, ["text prompt"], 1, max_new_tokens=3, chat=False, sampling_temperature=0.0)
    assert len(raw) == 1 and len(raw[0]) == 1
    fn = complete_fn(client, max_new_tokens=2, seed=1)
    assert [len(x) for x in fn(["p", "q"], 3)] == [3, 3]
    client.close()


def test_generation_and_logit_teacher_share_one_client(server, tiny):
    fn, client = remote_complete(RemoteConfig(url=server.url, model="tiny", top_k=4), max_new_tokens=2, seed=3)
    assert client.server_checked and client.shown_base == server.url.rstrip("/")
    teacher = RemoteTeacher(client.cfg, vocab_size=len(tiny[1]), client=client)
    before = client.requests_sent
    teacher.signal(batch_of([4], len(tiny[1])))
    assert fn(["hi"], 1)[0] and teacher.generate(["hi"], 1, max_new_tokens=2, seed=3) == fn(["hi"], 1)
    assert teacher.requests_sent == client.requests_sent == before + 4
    teacher.close()  # a handed-in client stays open for its owner
    assert len(fn(["again"], 1)) == 1
    client.close()


def test_fingerprint_is_checked_against_the_served_tokenizer(server, tiny):
    vocab = len(tiny[1])
    batch = batch_of([5], vocab)
    good = Fingerprint(teacher="t", tokenizer_hash=tokenizer_hash(tiny[1]), vocab_size=vocab)
    RemoteTeacher(RemoteConfig(url=server.url, model="tiny", top_k=2), vocab_size=vocab,
                  fingerprint=good).signal(batch)
    bad = Fingerprint(teacher="t", tokenizer_hash="0" * 64, vocab_size=vocab)
    with pytest.raises(RemoteError, match="tokenizer"):
        RemoteTeacher(RemoteConfig(url=server.url, model="tiny", top_k=2), vocab_size=vocab,
                      fingerprint=bad).signal(batch)
    with pytest.raises(RemoteError, match="not served"):
        RemoteTeacher(RemoteConfig(url=server.url, model="nope", top_k=2), vocab_size=vocab,
                      fingerprint=good).signal(batch)


def test_api_key_comes_from_env_and_never_reaches_logs_or_errors(tiny, monkeypatch, caplog):
    model, tok = tiny
    vocab = len(tok)
    with serve(teacher_app(model, tok, api_key=KEY)) as srv:
        cfg = RemoteConfig(url=srv.url, model="tiny", top_k=2, api_key_env="STILLROOM_TEST_KEY")
        with pytest.raises(RemoteError, match="STILLROOM_TEST_KEY") as missing:
            RemoteTeacher(cfg, vocab_size=vocab)
        assert KEY not in str(missing.value)
        caplog.set_level(logging.DEBUG)
        monkeypatch.setenv("STILLROOM_TEST_KEY", KEY)
        remote = RemoteTeacher(cfg, vocab_size=vocab)
        sig = remote.signal(batch_of([6, 4], vocab))
        assert sig.topk_ids_btk.shape[-1] == 2
        monkeypatch.setenv("STILLROOM_TEST_KEY", KEY + "-wrong")
        wrong = RemoteTeacher(cfg, vocab_size=vocab)
        with pytest.raises(RemoteError, match="401") as denied:
            wrong.signal(batch_of([6], vocab))
        assert "api_key_env" in str(denied.value)
    assert KEY not in caplog.text and KEY not in str(denied.value) and KEY not in repr(remote.__dict__.get("cfg"))
    assert any("HTTP Request" in r.getMessage() for r in caplog.records)  # httpx logged, without the key


def test_targets_without_a_teacher_distribution_are_an_error(server, tiny):
    vocab = len(tiny[1])
    batch = batch_of([5], vocab)
    batch.target_ids[0, 4] = 7  # the last real token has no next-token distribution from the server
    remote = RemoteTeacher(RemoteConfig(url=server.url, model="tiny", top_k=2), vocab_size=vocab)
    with pytest.raises(ValueError, match="position 4"):
        remote.signal(batch)


def test_config_errors_are_clear():
    with pytest.raises(RemoteError, match="url is not set"):
        RemoteTeacher(RemoteConfig(), vocab_size=10)
    with pytest.raises(RemoteError, match="http"):
        RemoteTeacher(RemoteConfig(url="ftp://x/v1"), vocab_size=10)
    with pytest.raises(RemoteError, match="exceeds the vocabulary"):
        RemoteTeacher(RemoteConfig(url="http://127.0.0.1:9/v1", top_k=20), vocab_size=10)


def test_client_messages_name_the_section_its_settings_came_from(monkeypatch):
    """The same client serves on-policy rollouts (onpolicy.server): its errors name those keys, not the teacher's."""
    from stillroom.teachers.http import OpenAIClient

    with pytest.raises(RemoteError, match=r"^onpolicy\.server\.url is not set; e\.g\. onpolicy\.server\.url="):
        OpenAIClient(RemoteConfig(), key="onpolicy.server")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(RemoteError, match=r"^onpolicy\.server\.api_key_env names the environment variable"):
        OpenAIClient(RemoteConfig(url="http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY_VAR"), key="onpolicy.server")


def entry(pairs):
    return {str(t): {"logprob": lp, "rank": r, "decoded_token": "x"} for t, lp, r in pairs}


def test_parser_aligns_positions_and_keeps_the_top_k():
    # position 1: the actual token (9) has rank 5 and is dropped; position 2: bare numbers are accepted.
    entries = [None, entry([(3, -0.5, 1), (4, -1.5, 2), (9, -4.0, 5)]), {"7": -0.2, "8": -2.0, "2": -3.0}]
    ids, lp = parse_prompt_logprobs(entries, 3, 2, 10, "POST /v1/completions")
    assert ids.tolist() == [[3, 4], [7, 8]]
    assert np.allclose(lp, [[-0.5, -1.5], [-0.2, -2.0]])


@pytest.mark.parametrize("entries, n, words", [
    (None, 2, "does not offer prompt log-probabilities"),
    ([None], 2, "1 entries for a prompt of 2 tokens"),
    ([None, entry([(3, -0.5, 1)])], 2, "holds 1 tokens but top_k=2"),
    ([None, entry([(3, -0.5, 1), (12, -1.0, 2)])], 2, "outside the student's vocabulary"),
    ([None, {"3": {"lp": 1}, "4": -1.0}], 2, "cannot be read"),
    ([None, "x"], 2, "expected an object"),
    ([None, {"3": 0.7, "4": -1.0}], 2, "not a log-probability"),
])
def test_parser_errors_name_the_path_and_the_problem(entries, n, words):
    with pytest.raises(RemoteError) as err:
        parse_prompt_logprobs(entries, n, 2, 10, "POST http://127.0.0.1:1/v1/completions")
    assert words in str(err.value) and "/v1/completions" in str(err.value)


def test_store_written_from_the_server_matches_a_store_of_the_online_model(server, tiny, tmp_path):
    from stillroom.teachers.store_reader import StoreReader, StoreTeacher
    from stillroom.teachers.store_writer import make_header, model_compute, write_store

    model, tok = tiny
    vocab = len(tok)
    g = torch.Generator().manual_seed(4)
    examples = [Example(input_ids=torch.randint(4, vocab, (n,), generator=g).tolist(), target=[True] * n,
                        uid=f"s{i}") for i, n in enumerate([10, 6, 8, 3])]
    header = make_header(examples, teacher_identity="remote:tiny", tokenizer_hash=tokenizer_hash(tok),
                         vocab_size=vocab, k=4, loss_temperature=1.0, logprob_dtype="float32", shard_tokens=1024)
    remote = RemoteTeacher(RemoteConfig(url=server.url, model="tiny", top_k=4), vocab_size=vocab)
    write_store(tmp_path / "remote", header, examples, remote.store_compute(batch_size=2), log=lambda _: None)
    write_store(tmp_path / "online", header, examples,
                model_compute(model, k=4, loss_temperature=1.0, vocab_size=vocab, pad_id=1), log=lambda _: None)
    a, b = StoreReader(tmp_path / "remote"), StoreReader(tmp_path / "online")
    for ex in examples:
        ra, rb = a.sequence(ex.uid), b.sequence(ex.uid)
        n = len(ex.input_ids) - 1  # the last position has no next token on the server side
        assert torch.equal(ra[0][:n].long(), rb[0][:n].long())
        torch.testing.assert_close(ra[1][:n], rb[1][:n], atol=1e-5, rtol=0)
        torch.testing.assert_close(ra[2][:n], rb[2][:n], atol=1e-4, rtol=0)
    batch = collate(examples, pad_id=1)
    from_store = StoreTeacher(a).signal(batch)
    direct = remote.signal(batch)
    mask = batch.loss_mask
    assert torch.equal(from_store.topk_ids_btk[mask], direct.topk_ids_btk[mask])


def test_remote_from_run_checks_before_step_0_and_caches_in_the_run_folder(server, tiny, tmp_path):
    from stillroom.config.schema import RunConfig
    from stillroom.teachers.remote import remote_from_run

    vocab = len(tiny[1])
    fp = Fingerprint(teacher="t", tokenizer_hash=tokenizer_hash(tiny[1]), vocab_size=vocab)
    cfg = RunConfig.model_validate({"name": "r", "output_dir": str(tmp_path), "teacher": {
        "source": "remote", "remote": {"url": server.url, "model": "tiny", "top_k": 3}}})
    teacher = remote_from_run(cfg, vocab_size=vocab, fingerprint=fp)
    assert teacher.checked  # recorded by check_server itself; signal does not ask /models again
    teacher.signal(batch_of([5, 4], vocab))
    assert teacher.requests_sent == 1 + 2
    teacher.close()
    assert (tmp_path / "r" / "remote_cache.jsonl").is_file()
    hot = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"loss_temperature": 2.0})})
    with pytest.raises(RemoteError, match="loss_temperature"):
        remote_from_run(hot, vocab_size=vocab, fingerprint=fp)
    bad = Fingerprint(teacher="t", tokenizer_hash="f" * 64, vocab_size=vocab)
    with pytest.raises(RemoteError, match="tokenizer"):
        remote_from_run(cfg, vocab_size=vocab, fingerprint=bad)


def test_cache_path_comes_from_the_config_with_home_expanded(server, tiny, tmp_path, monkeypatch):
    from stillroom.config.schema import RunConfig
    from stillroom.teachers.remote import remote_cache_path, remote_from_run

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    vocab = len(tiny[1])
    remote = {"url": server.url, "model": "tiny", "top_k": 3, "cache": "~/caches/t.jsonl"}
    cfg = RunConfig.model_validate({"name": "r", "output_dir": "~/runs", "teacher": {"source": "remote",
                                                                                     "remote": remote}})
    assert remote_cache_path(cfg) == tmp_path / "home" / "caches" / "t.jsonl"
    teacher = remote_from_run(cfg, vocab_size=vocab, fingerprint=None)
    teacher.signal(batch_of([4], vocab))
    teacher.close()
    assert (tmp_path / "home" / "caches" / "t.jsonl").is_file()
    default = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(
        update={"remote": cfg.teacher.remote.model_copy(update={"cache": None})})})
    assert remote_cache_path(default) == tmp_path / "home" / "runs" / "r" / "remote_cache.jsonl"
    # A RemoteTeacher built from the config alone uses the configured cache too.
    again = RemoteTeacher(cfg.teacher.remote, vocab_size=vocab)
    assert again.cache is not None and len(again.cache) == 1
    again.close()
