"""``specvlm.draft: eagle_head``: the head's training objective (its loss against one computed by hand, the
alignment of head rows with target positions, training lowering the feature loss on a fixed batch with the target
untouched), the checks of its loss terms and settings, and on a tiny LLaVA target: the drafting path gives the
training forward's logits (image features included) and greedy drafting stays lossless on image prompts."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama
from vlm_helpers import tiny_vlm, write_tiny_vqa

from stillroom.config.core import LossConfig
from stillroom.config.schema import RunConfig
from stillroom.data.batch import Example, collate
from stillroom.generate.eagle_draft import EagleDraft
from stillroom.generate.eagle_head import build_head
from stillroom.generate.speculative import _Decoder, autoregressive_generate, speculative_generate
from stillroom.methods.specvlm_eagle import EagleForward, EagleObjective, eagle_mix

def make_llama(vocab: int, layers: int, seed: int):
    return tiny_llama(vocab, layers, 32, seed, tie=False, max_positions=256, bos=None, eos=None, pad=0)


TERMS = [{"name": "soft_ce", "weight": 0.1}, {"name": "hidden_smooth_l1", "weight": 1.0, "params": {"layers": "last"}}]


def _batch(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate([12, 9, 12]):
        ids = torch.randint(1, vocab, (n,), generator=gen).tolist()
        rows.append(Example(ids, [j >= 3 for j in range(n)], uid=f"r{i}"))  # the first 3 tokens are prompt
    return collate(rows, pad_id=0)


def _objective(target, head, terms=TERMS):
    mix = eagle_mix(LossConfig(terms=terms), head, target)
    return EagleObjective(EagleForward(head, target, vocab=target.lm_head.weight.shape[0]), mix)


def test_loss_equals_a_hand_computed_one():
    target = make_llama(64, layers=2, seed=0).eval()
    head = build_head(target, seed=1)
    objective = _objective(target, head)
    batch = _batch(64)
    outputs = objective.forward(batch)
    result = objective.loss(outputs, batch, None)

    with torch.no_grad():  # by hand: head row t reads (f_t, e_{t+1}) and answers for target position t + 1
        out = target(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        f, e, z = out.hidden_states[-1], out.hidden_states[0], out.logits
        pred = head(f[:, :-1], e[:, 1:])
        q = torch.log_softmax(pred @ target.lm_head.weight.T, -1)
        p = torch.softmax(z[:, 1:], -1)
        mask = (batch.target_ids != -100)[:, 1:]
        smooth = torch.nn.functional.smooth_l1_loss(pred, f[:, 1:], reduction="none", beta=1.0).mean(-1)
        want = (smooth[mask].sum() + 0.1 * (-(p * q).sum(-1))[mask].sum())
    # target position 0 is prompt here, so every counted position has its head row
    assert result.count == int(mask.sum()) == int(batch.loss_mask.sum()) == 24
    torch.testing.assert_close(result.total, want, atol=1e-4, rtol=1e-5)
    assert outputs["pred"].shape == (3, 11, 32) and outputs["logits"].shape == (3, 11, 64)


def test_training_lowers_the_feature_loss_on_a_fixed_batch():
    target = make_llama(64, layers=2, seed=0).eval()
    frozen = copy.deepcopy(target.state_dict())
    head = build_head(target, seed=2)
    objective = _objective(target, head)
    batch = _batch(64, seed=3)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    history = []
    for _ in range(60):
        result = objective.loss(objective.forward(batch), batch, None)
        opt.zero_grad()
        (result.total / result.count).backward()
        opt.step()
        history.append(result.parts["hidden_smooth_l1"] / result.count)
    assert history[-1] < 0.4 * history[0], history[::10]
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in frozen.items())  # the target is not trained
    assert all(p.grad is None for p in target.parameters())


def test_loss_terms_are_checked():
    target = make_llama(64, layers=2, seed=0)
    head = build_head(target)
    with pytest.raises(ValueError, match=r"got layer pairs \[\(0, 2\)\]: use params: \{layers: last\}"):
        eagle_mix(LossConfig(terms=[{"name": "hidden_smooth_l1", "params": {"layers": [[0, 2]]}}]), head, target)
    with pytest.raises(ValueError, match="attention loss terms"):
        eagle_mix(LossConfig(terms=[{"name": "attention_mse", "params": {"layers": "last"}}]), head, target)
    assert eagle_mix(LossConfig(terms=[{"name": "hidden_smooth_l1", "params": {"layers": [[1, 2]]}}]), head,
                     target).teacher_hidden_layers == [2]


def test_settings_are_checked():
    base = dict(method="specvlm", vlm={}, student={"from_config": {}}, loss={"terms": TERMS})
    cfg = RunConfig(**base, specvlm={"draft": "eagle_head"})
    assert cfg.specvlm.draft == "eagle_head" and cfg.specvlm.head_layers == 1
    assert RunConfig(**base).specvlm.draft == "model"
    with pytest.raises(ValueError, match="set teacher.source: online"):
        RunConfig(**base, specvlm={"draft": "eagle_head"}, teacher={"source": "store", "store": {"path": "x"}})
    with pytest.raises(ValueError, match="draft"):
        RunConfig(**base, specvlm={"draft": "small"})


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from stillroom.domains.vl.vlm_data import image_prompts

    records = write_tiny_vqa(tmp_path_factory.mktemp("vqa") / "scenes")
    target, tok = tiny_vlm(records)
    ids, pixels = image_prompts(str(records), 3, target, tok, None)
    return target.eval(), ids, pixels


def test_drafting_gives_the_training_forwards_logits_on_an_image_prompt(llava):
    target, ids, pixels = llava
    head = build_head(target, seed=5)
    prompt, proposal = ids[0], 7
    # training path: the whole sequence (image included) through the target, then the head
    batch = collate([Example(prompt + [proposal], [True] * (len(prompt) + 1), uid="x")], pad_id=0)
    batch.pixel_values = pixels[0]
    train_logits = EagleForward(head, target, vocab=300)(batch)["logits"][0, -1]
    # drafting path: the target reads the prompt (with its image) once, the head drafts the next token
    with torch.no_grad():
        tgt = _Decoder(target, pixels[0], len(prompt), features=True)
        tgt.logits(prompt, keep=1)
        drafting = EagleDraft(head, target).speculative_decoder(tgt)
        assert drafting.ready(len(prompt) + 1)
        draft_logits = drafting.logits(prompt + [proposal], keep=1)[0]
    torch.testing.assert_close(draft_logits, train_logits.detach(), atol=1e-4, rtol=1e-4)
    # the image tokens' embeddings the head reads are the image features, not the placeholder token's
    image_rows = [i for i, t in enumerate(prompt) if t == target.config.image_token_index]
    placeholder = target.get_input_embeddings()(torch.tensor(prompt[image_rows[0]]))
    assert not torch.allclose(tgt.embeds[image_rows[0]], placeholder)


def test_greedy_drafting_is_lossless_on_image_prompts(llava):
    target, ids, pixels = llava
    draft = EagleDraft(build_head(target, seed=6), target)
    for prompt, image in zip(ids, pixels):
        want = autoregressive_generate(target, prompt, max_new_tokens=8, pixel_values=image).tokens
        got = speculative_generate(target, draft, prompt, gamma=3, max_new_tokens=8, pixel_values=image)
        assert got.tokens == want and got.stats.proposed > 0
