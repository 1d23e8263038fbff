"""The batched VLM sampler (images on the prompt's forward, left-padded prompts of different lengths) gives the
same greedy tokens as the one-prompt KV-cached decoder, on image prompts and on a batch mixing text and images."""

import torch
from vlm_helpers import tiny_vlm, write_tiny_vqa

from stillroom.config.core import DataConfig, DataSource
from stillroom.data import build_splits
from stillroom.domains.vl.vlm_eval import greedy_answers, prompt_and_pixels
from stillroom.domains.vl.vlm_teacher import vlm_encoder
from stillroom.generate.sampling import eos_token_ids, sample_continuations
from stillroom.generate.speculative import autoregressive_generate


def test_batched_greedy_answers_equal_one_at_a_time(tmp_path):
    records = write_tiny_vqa(tmp_path / "scenes", images=4, per_image=3)
    model, tok = tiny_vlm(records, seed=3)
    model.eval()
    data = build_splits(DataConfig(sources=[DataSource(path=str(records))], seq_len=64, heldout_fraction=0.0),
                        tok, 0, vlm_encoder(model, None, "image"))
    examples = data.train[:7]
    assert len({len(prompt_and_pixels(e)[0]) for e in examples}) > 1  # prompts of different lengths: padding
    stops = eos_token_ids(tok, model)
    alone = []
    for ex in examples:
        ids, pixels = prompt_and_pixels(ex)
        out = autoregressive_generate(model, ids, max_new_tokens=6, eos_token_id=stops, pixel_values=pixels)
        alone.append(tok.decode(out.tokens, skip_special_tokens=True).strip())
    assert sum(len(a) > 0 for a in alone) >= 5  # real answers, not empty strings
    assert greedy_answers(model, tok, examples, 6, batch_size=4) == alone

    # a text prompt between image prompts: only the image prompts' pixels are passed, in order
    text = tok("what is this", add_special_tokens=False)["input_ids"]
    first, second = prompt_and_pixels(examples[0]), prompt_and_pixels(examples[1])
    mixed = sample_continuations(model, tok, [first[0], text, second[0]], max_new_tokens=5, greedy=True,
                                 eos_token_id=stops, pixel_values=torch.cat([first[1], second[1]]))
    expected = [autoregressive_generate(model, p, max_new_tokens=5, eos_token_id=stops, pixel_values=px).tokens
                for p, px in ((first[0], first[1]), (text, None), (second[0], second[1]))]
    assert mixed == expected
