import pytest
from helpers import tiny_llama, tiny_tokenizer
from transformers import AutoTokenizer

from stillroom.models import VocabularyMismatch, check_vocab, logit_width, tokenizer_hash


def test_hash_is_stable_and_ignores_pad_role(tok, tmp_path):
    h = tokenizer_hash(tok)
    assert len(h) == 64 and h == tokenizer_hash(tiny_tokenizer(320))
    tok.save_pretrained(tmp_path)
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path)) == h
    other = tiny_tokenizer(320)
    other.pad_token = None
    assert tokenizer_hash(other) == h  # pad = eos or unset: same token strings and ids
    assert tokenizer_hash(tiny_tokenizer(300)) != h
    other.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    assert tokenizer_hash(other) != h


def test_padding_only_difference_is_fine(tok):
    teacher = tiny_llama(len(tok), layers=1)
    student = tiny_llama(len(tok), layers=1)
    student.resize_token_embeddings(len(tok) + 1, pad_to_multiple_of=64)  # 321 -> 384 rows
    assert logit_width(student) == 384 > len(tok) == logit_width(teacher)
    assert check_vocab(tok, teacher, tok, student) == len(tok)
    assert check_vocab(tok, student, tok, teacher) == len(tok)
    both = tiny_llama(384, layers=1)
    assert check_vocab(tok, both, tok, student) == 384


def test_head_narrower_than_tokenizer_raises(tok):
    teacher = tiny_llama(len(tok), layers=1)
    student = tiny_llama(len(tok) - 5, layers=1)
    with pytest.raises(VocabularyMismatch, match="resize_token_embeddings"):
        check_vocab(tok, teacher, tok, student)


def test_different_tokenizers_name_the_alternatives(tok):
    other = tiny_tokenizer(300, seed_text="zebra quokka " * 50)
    teacher, student = tiny_llama(len(tok), layers=1), tiny_llama(len(other), layers=1)
    with pytest.raises(VocabularyMismatch) as err:
        check_vocab(tok, teacher, other, student)
    msg = str(err.value)
    assert "shared tokenizer" in msg and "id " in msg
    for alternative in ("sequence-level KD", "method: sft", "step-by-step", "MiniPLM", "self-data distillation"):
        assert alternative in msg
