"""Record formats -> token ids with per-token target flags.

* ``text``: ``[BOS] text [EOS]``; every text token and the EOS are targets.
* ``prompt_completion``: ``[BOS] prompt completion [EOS]``. Prompt and
  completion are tokenized **separately** and the ids concatenated, so the
  boundary between prompt (not learned) and completion (learned) is exact. No
  chat template and no separator are inserted: put the whitespace you want in
  the texts themselves.
* ``messages``: the tokenizer's chat template; only assistant turns are
  targets. For assistant turn ``i`` the target tokens are those of
  ``render(messages[:i+1])`` beyond those of
  ``render(messages[:i], add_generation_prompt=True)`` (the turn's content and
  whatever the template closes it with, e.g. ``<|im_end|>``). The prefix
  property (each of these renders is a token prefix of the next and of the full
  conversation) is checked; a template that breaks it is a :class:`DataError`.
  ``add_eos`` does not apply: the template decides how turns end. A turn's
  ``role`` must be ``system``, ``user``, ``assistant`` or ``tool``, or a role the
  template compares a role with (e.g. Llama 3.1's ``"ipython"``); any other
  role (a typo, ``"wizard"``) is a bad record naming it, since many templates
  render unknown roles silently.

``BOS`` is prepended (as a non-target) only when the tokenizer itself adds it
to plain text (``tokenizer(text)`` starts with ``bos_token_id`` and
``tokenizer(text, add_special_tokens=False)`` does not).

A record that lacks a needed field or has a wrong type raises
:class:`BadRecord`; :func:`encode_record` returns ``None`` for a record with no
content at all (empty text), which the pipeline counts as ``dropped_empty``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from stillroom.config.schema import DataSource
from stillroom.data.errors import BadRecord, DataError
from stillroom.data.images import ImageRef

Format = Literal["text", "prompt_completion", "messages"]
CHAT_ROLES = ("system", "user", "assistant", "tool")
"""Message roles every chat record may use (a template may name more, see :meth:`TextEncoder.chat_roles`)."""


@dataclass
class Encoded:
    """Token ids ``[n]`` and target flags ``[n]`` of one record (before truncation/packing); a vision-language
    record's ``image`` and the record fields an encoder keeps for the report (``meta``, merged into
    ``Example.meta``)."""

    input_ids: list[int]
    target: list[bool]
    image: ImageRef | None = None
    meta: dict = field(default_factory=dict)


class TextEncoder:
    """The few tokenizer operations the formats need, with the BOS/EOS rules above."""

    def __init__(self, tokenizer, add_eos: bool) -> None:
        self.tok = tokenizer
        self.add_eos = add_eos
        self.eos_id = tokenizer.eos_token_id
        if add_eos and self.eos_id is None:
            raise DataError("the tokenizer has no eos_token; give it one or set data.add_eos=false")
        self.bos_prefix: list[int] = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        self._roles: frozenset[str] | None = None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        return list(self.tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def eos(self) -> list[int]:
        return [self.eos_id] if self.add_eos else []

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """Token ids of the chat template rendered to text, then tokenized without extra specials."""
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.encode(text)

    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def chat_roles(self) -> frozenset[str]:
        """The roles a message may have: the usual four and those the chat template compares a role with
        (``message['role'] == 'ipython'``, ``message.role in ['user', 'system']``)."""
        if self._roles is None:
            template = getattr(self.tok, "chat_template", None) or ""
            text = " ".join(template.values()) if isinstance(template, dict) else str(template)
            named = set(re.findall(r"""role['"]?\]?\s*[!=]=\s*['"]([\w-]+)['"]""", text))
            for group in re.findall(r"""role['"]?\]?\s+in\s+[\[(]([^\])]*)[\])]""", text):
                named |= set(re.findall(r"""['"]([\w-]+)['"]""", group))
            self._roles = frozenset(CHAT_ROLES) | frozenset(named)
        return self._roles


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` prepends its BOS to plain text by itself (``tokenizer(text)`` starts with
    ``bos_token_id`` and ``tokenizer(text, add_special_tokens=False)`` does not)."""
    bos = tokenizer.bos_token_id
    with_sp = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos is not None and with_sp[:1] == [bos] and without[:1] != [bos]


def infer_format(fields: dict, src: DataSource, label: str, where: str) -> Format:
    """The format of a source from the fields of its first record."""
    if src.messages_field in fields:
        return "messages"
    if src.prompt_field in fields and src.completion_field in fields:
        return "prompt_completion"
    if src.text_field in fields:
        return "text"
    raise DataError(
        f"{label}: cannot infer the record format from the first record ({where}) with fields "
        f"{sorted(fields)}; set data.sources[].format, or the field names: text_field={src.text_field!r}, "
        f"prompt_field={src.prompt_field!r} + completion_field={src.completion_field!r}, "
        f"messages_field={src.messages_field!r}"
    )


def string_field(fields: dict, key: str, fix: str) -> str:
    """``fields[key]`` as a string, or :class:`BadRecord` naming the field and ``fix`` (what to set)."""
    if key not in fields:
        raise BadRecord(f"missing field {key!r} (fields: {sorted(fields)}); {fix}")
    value = fields[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} must be a string, got {type(value).__name__} ({value!r:.60})")
    return value


def encode_record(fields: dict, fmt: Format, src: DataSource, enc: TextEncoder) -> Encoded | None:
    """Encode one record; ``None`` when it has no content (counted as dropped_empty)."""
    if fmt == "text":
        text = string_field(fields, src.text_field, "set data.sources[].text_field")
        if not text.strip():
            return None
        ids = enc.encode(text) + enc.eos()
        return Encoded(enc.bos_prefix + ids, [False] * len(enc.bos_prefix) + [True] * len(ids))
    if fmt == "prompt_completion":
        prompt = string_field(fields, src.prompt_field, "set data.sources[].prompt_field")
        completion = string_field(fields, src.completion_field, "set data.sources[].completion_field")
        if not prompt.strip() and not completion.strip():
            return None
        head = enc.bos_prefix + enc.encode(prompt)
        tail = enc.encode(completion) + enc.eos()
        return Encoded(head + tail, [False] * len(head) + [True] * len(tail))
    if fmt == "messages":
        return _encode_messages(fields, src, enc)
    raise ValueError(f"unknown format {fmt!r}")


def _check_messages(fields: dict, src: DataSource, roles: frozenset[str] = frozenset(CHAT_ROLES)) -> list[dict]:
    key = src.messages_field
    if key not in fields:
        raise BadRecord(f"missing field {key!r} (fields: {sorted(fields)}); set data.sources[].messages_field")
    messages = fields[key]
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"field {key!r} must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRecord(f"{key}[{j}] must be an object with string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in roles:
            extra = sorted(roles - set(CHAT_ROLES))
            also = f" (and {', '.join(extra)}, which the chat template names)" if extra else ""
            raise BadRecord(f"{key}[{j}].role is {m['role']!r}, not a chat role: use one of "
                            f"{', '.join(CHAT_ROLES)}{also}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"{key} has no assistant turn, so nothing would be learned")
    return messages


def _encode_messages(fields: dict, src: DataSource, enc: TextEncoder) -> Encoded:
    if not enc.has_chat_template():
        raise DataError(
            "messages records need a tokenizer with a chat template (tokenizer.chat_template is empty); "
            "use a chat model's tokenizer or convert the data to prompt_completion"
        )
    messages = _check_messages(fields, src, enc.chat_roles())
    try:
        full = enc.render_chat(messages, add_generation_prompt=False)
    except Exception as e:  # jinja errors from the template (e.g. roles it rejects)
        raise BadRecord(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None
    target = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = _render_head(enc, messages[:i])
            through = enc.render_chat(messages[: i + 1], add_generation_prompt=False)
        except Exception as e:
            raise BadRecord(f"the chat template failed on messages[:{i + 1}]: {type(e).__name__}: {e}") from None
        if through[: len(before)] != before or full[: len(through)] != through:
            raise DataError(
                f"the tokenizer's chat template is not prefix-consistent at assistant turn {i}: rendering "
                f"messages[:{i}] with add_generation_prompt=True is not a token prefix of messages[:{i + 1}], "
                "or that is not a prefix of the whole conversation (templates that rewrite earlier turns, e.g. "
                "strip reasoning, do this). Assistant masks cannot be derived; use prompt_completion records"
            )
        for t in range(len(before), len(through)):
            target[t] = True
    return Encoded(full, target, meta={"messages": messages})  # a cross teacher may render them its own way


def _render_head(enc: TextEncoder, head: list[dict]) -> list[int]:
    """Tokens before an assistant turn: ``head`` plus the generation prompt.

    With an empty ``head`` (a conversation that opens with the assistant) a
    template may fail on an empty list; then nothing precedes the turn.
    """
    if head:
        return enc.render_chat(head, add_generation_prompt=True)
    try:
        return enc.render_chat([], add_generation_prompt=True)
    except Exception:
        return []
