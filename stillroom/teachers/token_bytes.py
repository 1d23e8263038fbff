"""What text each token id stands for, as bytes: the common ground of two tokenizers.

Cross-tokenizer distillation (``teacher.tokenizer_mode: cross``) compares two models
that cut the same text into different tokens. Everything it does rests on one table
per tokenizer: ``bytes_of[id]``, the UTF-8 bytes the token spells. Two tokens "match"
when their bytes are equal; two positions "align" when the bytes before them are the
same text. Special tokens (``<|im_end|>``, ``<eos>``) are kept apart: they spell no
text and are matched by their content string (or their role: bos, eos).

The table is read from the tokenizer's own vocabulary, by the scheme its decoder uses:

* byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): every character of a token string
  stands for one byte (the GPT-2 ``bytes_to_unicode`` table);
* SentencePiece style (Llama 2, Gemma, Mistral): ``▁`` is a space and ``<0xNN>`` is byte NN;
* anything else (character or word-level vocabularies): the token string in UTF-8.

A tokenizer whose tokens do not spell its input back byte for byte (a normaliser that
lower-cases or rewrites text) cannot be aligned; :func:`check_spelling` finds that on a
probe text and raises :class:`CrossTokenizerError` saying so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from stillroom.data.formats import adds_bos

PROBE = "Cross-tokenizer check: héllo wörld,  2+2=4\n\tdone. ☃ 日本"
"""Text every tokenizer of a cross run must spell back exactly (ASCII, accents, digits, runs of
spaces, newlines, tabs, symbols outside the BMP-common range, CJK)."""


class CrossTokenizerError(ValueError):
    """Two tokenizers cannot be aligned on some text; the message names the record and the place."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-character table, inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _scheme(tok) -> str:
    """``byte_level``, ``sentencepiece`` or ``plain``: how the tokenizer's token strings spell bytes."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise CrossTokenizerError(f"{type(tok).__name__} is not a fast tokenizer; cross-tokenizer distillation "
                                  "reads the vocabulary of a fast (tokenizers-library) tokenizer")
    spec = json.loads(backend.to_str())
    decoders = [spec.get("decoder") or {}]
    if decoders[0].get("type") == "Sequence":
        decoders = decoders[0].get("decoders", [])
    kinds = {d.get("type") for d in decoders}
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Metaspace" in kinds or "ByteFallback" in kinds or any(
            d.get("type") == "Replace" and "▁" in json.dumps(d.get("pattern", "")) for d in decoders):
        return "sentencepiece"
    return "plain"


def _spell(piece: str, scheme: str) -> bytes:
    if scheme == "byte_level":
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:  # an added (non-special) token stored as plain text
            return piece.encode("utf-8")
    if scheme == "sentencepiece":
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")


@dataclass
class TokenBytes:
    """One tokenizer's table: ``spelled[id]`` bytes of each ordinary token, ``special[id]`` the content
    string of each special token, and the ids of its roles."""

    spelled: list[bytes | None]
    """``[V]``: the bytes of token ``id``; None for special tokens."""
    special: dict[int, str]
    """Special token id -> its content string (``<|im_end|>``)."""
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    adds_bos: bool
    """The tokenizer prepends its BOS to plain text (:func:`stillroom.data.formats.adds_bos`)."""
    prefix_space: bool
    """The tokenizer spells a leading space that is not in the text (SentencePiece's ``▁Hello``)."""

    @property
    def fill_id(self) -> int:
        """The id that pads a batch of this tokenizer's sequences: its pad token, else its EOS, else 0."""
        return self.pad_id if self.pad_id is not None else (self.eos_id or 0)

    @property
    def size(self) -> int:
        return len(self.spelled)

    def text_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.spelled[i] or b"" for i in ids)


def token_bytes(tok) -> TokenBytes:
    """The :class:`TokenBytes` of ``tok`` (checked with :func:`check_spelling`)."""
    scheme = _scheme(tok)
    size = len(tok)
    special_ids = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    pieces = tok.convert_ids_to_tokens(list(range(size)))
    spelled: list[bytes | None] = []
    special: dict[int, str] = {}
    for i, piece in enumerate(pieces):
        if i in special_ids or piece is None:
            special[i] = piece if piece is not None else f"<id {i}>"
            spelled.append(None)
        else:
            spelled.append(_spell(piece, scheme))
    table = TokenBytes(spelled, special, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, adds_bos(tok),
                       prefix_space=False)
    table.prefix_space = check_spelling(tok, table)
    return table


def check_spelling(tok, table: TokenBytes, probe: str = PROBE) -> bool:
    """Whether ``tok`` spells a leading space it adds itself; raises when its tokens do not spell ``probe`` back.

    The only tolerated difference is one leading space (SentencePiece's prefix space), which the
    alignment then removes from a sequence's first token.
    """
    ids = tok(probe, add_special_tokens=False)["input_ids"]
    got, want = table.text_bytes(ids), probe.encode("utf-8")
    if got == want:
        return False
    if got == b" " + want:
        return True
    if got.startswith(b" ") and not want.startswith(b" "):
        got = got[1:]
    at = first_difference(got, want)
    raise CrossTokenizerError(
        f"tokenizer {getattr(tok, 'name_or_path', '') or type(tok).__name__}: its tokens do not spell the text back "
        f"(byte {at} of the probe {probe!r}: {got[at:at + 12]!r} instead of {want[at:at + 12]!r}): a normaliser "
        "rewrites text or characters fall outside its vocabulary (no byte fallback), so positions cannot be aligned "
        "across tokenizers. Use a tokenizer that spells any text exactly (byte-level BPE, or byte fallback)")


def first_difference(a: bytes, b: bytes) -> int:
    """Index of the first byte where ``a`` and ``b`` differ (the shorter length when one is a prefix)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def utf8_runs(data: bytes) -> list[tuple[int, int]]:
    """``[(lo, hi)]``: the maximal slices of ``data`` that are whole UTF-8 text, in order.

    Bytes outside them are no text either tokenizer can share: a packed or truncated block that starts or
    ends inside a multi-byte character a byte-level tokenizer split, or a sample the student generated
    that strays into invalid byte sequences.
    """
    runs, lo, i, n = [], 0, 0, len(data)
    while i < n:
        width = _char_width(data, i)
        if width:
            i += width
            continue
        if i > lo:
            runs.append((lo, i))
        i += 1
        lo = i
    if n > lo:
        runs.append((lo, n))
    return runs


def _char_width(data: bytes, i: int) -> int:
    """Bytes of the valid UTF-8 character starting at ``data[i]``, 0 when none starts there."""
    lead = data[i]
    width = 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else \
        4 if 0xF0 <= lead < 0xF5 else 0
    if not width or i + width > len(data):
        return 0
    try:
        data[i:i + width].decode("utf-8")
    except UnicodeDecodeError:
        return 0
    return width
