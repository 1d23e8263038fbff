"""The tokenizer of a VLM built here: byte-level BPE trained with the `tokenizers` library on the records' text.

Why not SmolLM2's 49k-token tokenizer: the scene questions use a few dozen words, and a 49k-row embedding
and head would dominate a decoder of ~100 hidden units (millions of parameters, ``[B, T, 49152]`` logits),
making the teacher trained here and every test several times slower for no gain. Byte-level BPE still
encodes any text (256 byte symbols), so nothing is ever unknown; the merges learnt from the records make
each scene word one or two tokens. Special tokens: ``<s>`` (BOS), ``</s>`` (EOS, also padding) and
``<image>``, the placeholder the LLaVA model replaces with the projected image features.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS, IMAGE = "<s>", "</s>", "<image>"
SPECIALS = (BOS, EOS, IMAGE)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` (BPE over bytes, ``vocab_size`` tokens at most) that adds BOS to text.

    Deterministic: the same texts give the same tokenizer. ``texts``: every prompt, answer and caption of
    the training records (the tokenizer has then seen each word it will have to produce).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   extra_special_tokens={"image_token": IMAGE})
