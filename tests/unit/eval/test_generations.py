import pytest
import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stillroom.eval import greedy_generations

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    lines = [ln for text in list(topics.values())[:40] for ln in text.splitlines() if ln.strip()][:400]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=64, special_tokens=special))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= 64
    return fast


@pytest.fixture
def model(llama_factory, tokenizer):
    m = llama_factory(7)
    m.config.pad_token_id = tokenizer.pad_token_id
    m.generation_config.pad_token_id = tokenizer.pad_token_id
    m.generation_config.eos_token_id = None  # random weights: never stop early, easier to check lengths
    return m


def test_plain_prompts_match_manual_greedy(model, tokenizer):
    """Prompts of different lengths decode together, left-padded: each gives what greedy decoding of it alone
    gives."""
    prompts = ["the object is", "a function call", "the", "a module is a file of the object"]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 2  # the batch needs padding
    out = greedy_generations(model, tokenizer, prompts, max_new_tokens=5)
    assert len(out) == 4 and all(isinstance(s, str) for s in out)
    for prompt, text in zip(prompts, out):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        # manual greedy decoding: argmax of the last position, 5 times
        with torch.no_grad():
            for _ in range(5):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        expected = tokenizer.decode(ids[0, -5:], skip_special_tokens=True)
        assert text == expected
    assert greedy_generations(model, tokenizer, prompts, max_new_tokens=5) == out  # deterministic


def test_chat_prompts_use_template(model, tokenizer):
    chat = [[{"role": "user", "content": "what is a module"}]]
    text = tokenizer.apply_chat_template(chat[0], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|>")
    out = greedy_generations(model, tokenizer, chat, max_new_tokens=4)
    same = greedy_generations(model, tokenizer, [text], max_new_tokens=4)
    # the plain path adds no extra BOS here (the fast tokenizer has no post-processor), so both agree
    assert out == same


def test_restores_mode_and_validates(model, tokenizer):
    model.train()
    greedy_generations(model, tokenizer, ["the"], max_new_tokens=2)
    assert model.training
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generations(model, tokenizer, ["the"], max_new_tokens=0)
    with pytest.raises(TypeError, match="prompt 0"):
        greedy_generations(model, tokenizer, [123], max_new_tokens=2)
    tokenizer_no_chat = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>")
    with pytest.raises(ValueError, match="chat_template"):
        greedy_generations(model, tokenizer_no_chat, [[{"role": "user", "content": "x"}]], max_new_tokens=2)


def test_a_row_that_ends_early_keeps_its_own_text(model, tokenizer):
    """A row that reaches EOS is padded while the others go on; its text is what it gives alone."""
    prompts = ["the object is", "a module is a file of the object"]
    alone = [greedy_generations(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    second = tokenizer(alone[0].split()[1])["input_ids"][-1]  # the first row's second new token ends it
    model.generation_config.eos_token_id = second
    ended = [greedy_generations(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert len(ended[0].split()) < len(alone[0].split())  # it did stop early
    assert greedy_generations(model, tokenizer, prompts, max_new_tokens=6) == ended
