"""The OpenAI-compatible teacher server on a loopback port: prompt log-probs, generations, errors."""

from __future__ import annotations

import httpx
import pytest
import torch

from helpers import tiny_llama, tiny_tokenizer
from loopback import serve, teacher_app, teacher_service
from stillroom.generate.sampling import sample_continuations
from stillroom.models.vocab import tokenizer_hash
from stillroom.teachers.server import LOGPROB_FLOOR, create_app

KEY = "sk-test-server-7f3a9c"


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_llama(len(tok), seed=3), tok


@pytest.fixture(scope="module")
def server(tiny):
    svc = teacher_service(*tiny, max_top_k=8)
    with serve(create_app(svc)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            yield svc, client


def test_binds_loopback_and_answers_health_and_models(server, tiny):
    svc, client = server
    assert str(client.base_url).startswith("http://127.0.0.1:")
    assert client.get(str(client.base_url).rsplit("/v1", 1)[0] + "/health").json() == {"status": "ok"}
    data = client.get("/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny"]
    assert data[0]["vocab_size"] == len(tiny[1]) and data[0]["tokenizer_hash"] == tokenizer_hash(tiny[1])


def test_prompt_logprobs_follow_vllm_format_and_match_the_model(server, tiny):
    model, tok = tiny
    _, client = server
    ids = [5, 17, 42, 99, 7, 250]
    body = client.post("/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 0,
                                             "prompt_logprobs": 4}).json()
    plp = body["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for j in range(1, len(ids)):
        entry = plp[j]
        dist = logp[j - 1]  # the distribution that predicted token j
        top = dist.topk(4)
        ranked = sorted((v["rank"], int(k)) for k, v in entry.items())
        assert [t for r, t in ranked if r <= 4] == top.indices.tolist()
        for i, v in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[str(i)]["logprob"] == pytest.approx(v, abs=1e-5)
            assert entry[str(i)]["decoded_token"] == tok.decode([i])
        actual = entry[str(ids[j])]  # the actual token is always present, with its true rank
        assert actual["logprob"] == pytest.approx(float(dist[ids[j]]), abs=1e-5)
        assert actual["rank"] == int((dist > dist[ids[j]]).sum()) + 1
        assert len(entry) in (4, 5)
    assert body["usage"]["prompt_tokens"] == len(ids) and body["choices"][0]["text"] == ""


def test_string_prompt_is_tokenized_and_batches_of_prompts_give_one_choice_each(server, tiny):
    _, tok = tiny
    _, client = server
    text = "The class statement defines a class"
    one = client.post("/completions", json={"prompt": text, "max_tokens": 0, "prompt_logprobs": 2}).json()
    assert one["choices"][0]["prompt_token_ids"] == tok(text)["input_ids"]
    many = client.post("/completions", json={"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 0,
                                             "prompt_logprobs": 1}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert [len(c["prompt_logprobs"]) for c in many["choices"]] == [3, 2]


def test_generation_is_seeded_and_greedy_matches_the_sampler(server, tiny):
    model, tok = tiny
    _, client = server
    msg = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6, "n": 2, "seed": 11}
    a = client.post("/chat/completions", json=msg).json()
    b = client.post("/chat/completions", json=msg).json()
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    assert len(a["choices"]) == 2 and a["choices"][0]["message"]["role"] == "assistant"
    greedy = client.post("/completions", json={"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0}).json()
    want = sample_continuations(model, tok, [[5, 6, 7]], max_new_tokens=5, greedy=True, eos_token_id=tok.eos_token_id)
    assert greedy["choices"][0]["text"] == tok.decode(want[0], skip_special_tokens=True)


@pytest.mark.parametrize("payload, status, words", [
    ({"prompt": [5, 100000], "prompt_logprobs": 2}, 400, "outside the vocabulary"),
    ({"prompt": [5, 6], "prompt_logprobs": 9}, 400, "--max-top-k"),
    ({"prompt": [5, 6], "model": "other"}, 404, "not served"),
    ({"prompt": [5, 6], "stream": True}, 400, "streaming"),
    ({"prompt": [5, 6], "echo": True}, 400, "prompt_logprobs"),
    ({"prompt": {"x": 1}}, 400, "invalid request"),
    ({"prompt": []}, 400, "empty"),
])
def test_bad_requests_get_openai_style_errors(server, payload, status, words):
    _, client = server
    r = client.post("/completions", json=payload)
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"] and err["code"] == status


def test_logprob_floor_keeps_json_finite():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=1)
    with torch.no_grad():
        model.lm_head.weight[7] = -1e4  # token 7 gets a -inf-like log-prob
    svc = teacher_service(model, tok, model_name="m", max_top_k=4)
    plp = svc.prompt_logprobs([5, 7], 2)
    assert plp[1]["7"]["logprob"] >= LOGPROB_FLOOR


def test_api_key_is_required_when_set(tiny):
    model, tok = tiny
    with serve(teacher_app(model, tok, api_key=KEY)) as srv, httpx.Client(base_url=srv.url) as client:
        assert client.get(srv.url.rsplit("/v1", 1)[0] + "/health").status_code == 200
        assert client.get("/models").status_code == 401
        assert client.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and KEY not in ok.text
